"""Out of GPU memory: recognise it, and render a batch in halves when it happens.

Shared by `retarget run` (retarget.run), compiled batches (retarget.compiling), actor videos
(retarget.retake) and Ray workers (through retarget.run's Rendering); imports torch only when an
out-of-memory is met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from render.errors import RetargetError


def is_oom(e: BaseException) -> bool:
    """True for CUDA's out-of-memory error (by name, so no torch import) or a message saying so."""
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


@dataclass
class FitSize:
    """The most frames per call known to fit since an out-of-memory (None: none seen yet)."""

    frames: int | None = None


def split_on_oom(render: Callable[[list[int]], Iterable[np.ndarray]], idx: list[int],
                 fit: FitSize | None = None) -> list[np.ndarray]:
    """`render(idx)` -> one image per index; on out-of-GPU-memory, the two halves of `idx` apart
    (recursively), so a batch too large for the card still renders. With `fit` (kept across
    calls), later batches go straight to the size that fitted instead of failing again first.
    RetargetError when even one frame does not fit."""
    if fit is not None and fit.frames and len(idx) > fit.frames:
        step = fit.frames  # read once: a chunk that runs out of memory lowers fit.frames meanwhile
        return [img for s in range(0, len(idx), step) for img in split_on_oom(render, idx[s:s + step], fit)]
    try:
        return list(render(idx))
    except Exception as e:
        if not is_oom(e):
            raise
    # Out of the `except` block before anything else: while the error is being handled, its
    # traceback keeps the failed call's frames, and their tensors, alive; retried in there, every
    # half ran out of memory too (H200, bench/run.py's check: 32 -> 16 -> ... -> 1 frame, where its
    # figures left room for half the batch).
    import gc

    import torch

    gc.collect()  # frames caught in reference cycles
    torch.cuda.empty_cache()
    if len(idx) == 1:
        raise RetargetError("out of GPU memory even for one frame: try --fast, --dtype fp16, or free the GPU")
    half = len(idx) // 2
    if fit is not None:
        fit.frames = len(idx) - half  # the larger half is tried next
    return split_on_oom(render, idx[:half], fit) + split_on_oom(render, idx[half:], fit)
