"""Validation renders at checkpoints: a fixed set of (identity, expression) pairs rendered with the
adapters as they are at that step, beside the frame whose expression is asked for.

Expression mode: the identity of one item, the expression of another (no Reference Adapter).
Reference mode: Reference Adapter pairs of the dataset (reference frame -> identity and bank, target frame
-> expression). Same seed every time, so the sheets of successive checkpoints differ only by training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VAL_SEED = 0


def choose(data, mode: str, count: int) -> list[tuple[int, int]]:
    """(identity item, expression item) indices: `count` evenly spread pairs, fixed for a dataset."""
    if mode == "reference":
        rows = np.linspace(0, len(data.pairs) - 1, min(count, len(data.pairs))).round().astype(int)
        return [(int(data.pairs[r][0]), int(data.pairs[r][1])) for r in dict.fromkeys(rows.tolist())]
    n = len(data)
    ids = np.linspace(0, n - 1, min(count, n)).round().astype(int)
    return [(int(i), int((i + n // 2) % n)) for i in dict.fromkeys(ids.tolist())]


def render(model, ds, pairs: list[tuple[int, int]], path: Path, *, steps: int, title: str,
           ref_strength: float = 0.8) -> Path:
    """Render `pairs` of dataset `ds` (a TrainData) with `model.pipe` and write a storyboard PNG at `path`:
    for each pair the expression frame ("target") and the render. Returns the path."""
    from render.storyboard import save_image, storyboard

    pipe = model.pipe
    images, labels = [], []
    for id_i, exp_i in pairs:
        who, what = ds[id_i], ds[exp_i]
        if model.mode == "reference":
            actor = pipe.make_actor(who["arcface"], who["image"], seed=VAL_SEED)
            out = pipe(actor, what["exp"][None], seed=VAL_SEED, steps=steps, ref_strength=ref_strength)
        else:
            actor = pipe.make_actor(who["arcface"], None)
            out = pipe(actor, what["exp"][None], seed=VAL_SEED, steps=steps, ref_strength=0.0)
        images += [what["image"], out[0]]
        labels += [f"target {what['meta']['key']}", f"id {who['meta']['key']}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    cell = max(64, min(256, pipe.image_size * 2))
    return save_image(path, storyboard(images, labels, columns=4, cell=cell, title=title))

