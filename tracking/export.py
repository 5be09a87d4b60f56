"""Track exports for people: a CSV table and a PNG plot of the main curves over time.

Both are written atomically (temporary file in the same folder, then renamed). matplotlib is
imported only when a plot is drawn, with the non-interactive Agg backend.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from render.files import atomic_open
from tracking.track import COLUMN_NAMES, Track

CSV_WHICH = ("params", "raw", "both")


_atomic = atomic_open


def write_csv(track: Track, path: str | os.PathLike, which: str = "params") -> Path:
    """One row per frame: `time` (s), `frame`, `valid` (1/0), then the 55 values named
    exp_0..exp_49, eyelid_l, eyelid_r, jaw_0..jaw_2.

    which: "params" (default: the filled, smoothed values the pipeline uses), "raw" (encoder
    output, empty cells where no face was found) or "both" (params columns, then the raw ones
    prefixed `raw_`). Returns the path.
    """
    if which not in CSV_WHICH:
        raise RetargetError(f"CSV columns {which!r}: choose one of {', '.join(CSV_WHICH)}")
    path = Path(path)
    header = ["time", "frame", "valid"]
    blocks = []
    if which in ("params", "both"):
        header += COLUMN_NAMES
        blocks.append(track.params)
    if which in ("raw", "both"):
        header += COLUMN_NAMES if which == "raw" else [f"raw_{c}" for c in COLUMN_NAMES]
        blocks.append(track.raw)
    values = np.concatenate(blocks, axis=1)
    with _atomic(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(track)):
            cells = ["" if not np.isfinite(v) else f"{v:.6g}" for v in values[i]]
            w.writerow([f"{track.times[i]:.6f}", i, int(track.valid[i])] + cells)
    return path


def plot_track(track: Track, path_png: str | os.PathLike, *, dpi: int = 110) -> Path:
    """PNG of jaw opening, both eyelids and expression coefficients 0-2 against time (s):
    the smoothed `params` as lines, the raw values as faint dots, invalid (filled) stretches
    shaded. Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path_png)
    t = track.times
    panels = [
        ("jaw opening", [(52, "jaw_0")]),
        ("eyelids", [(50, "eyelid_l"), (51, "eyelid_r")]),
        ("expression 0-2", [(0, "exp_0"), (1, "exp_1"), (2, "exp_2")]),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    spans = [(t[a], t[b]) for a, b in track.invalid_ranges()]
    step = 1.0 / track.fps
    for ax, (title, cols) in zip(axes, panels):
        for col, name in cols:
            (line,) = ax.plot(t, track.params[:, col], lw=1.4, label=name)
            ax.plot(t, track.raw[:, col], ".", ms=2.5, alpha=0.35, color=line.get_color())
        for a, b in spans:
            ax.axvspan(a - step / 2, b + step / 2, color="0.85", lw=0, zorder=0)
        ax.set_ylabel(title)
        ax.legend(loc="upper right", fontsize=8, ncol=len(cols))
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s)")
    title = f"{Path(track.source).name}: {len(track)} frames, smoothing {track.smoothing.get('method')}"
    if track.n_invalid:
        title += f", {track.n_invalid} without a face (shaded)"
    axes[0].set_title(title, fontsize=10)
    try:
        with _atomic(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return path
