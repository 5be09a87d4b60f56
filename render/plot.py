"""Line plots for training runs (the loss curve), written atomically as PNG. matplotlib, Agg backend."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from render.files import atomic_open


def plot_loss(losses, path: str | os.PathLike, *, title: str = "training loss", smooth: int = 0,
              dpi: int = 110) -> Path:
    """Plot per-step losses (step 1..N) and a moving average (window `smooth`, default N / 10, at least 2) to the
    PNG `path`; log scale on y when all values are positive. Returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    y = np.asarray(losses, dtype=np.float64)
    x = np.arange(1, len(y) + 1)
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    try:
        ax.plot(x, y, lw=0.8, alpha=0.5, label="loss per step")
        w = smooth or max(2, len(y) // 10)
        if len(y) >= 2 * w > 2:
            avg = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(x[w - 1:], avg, lw=1.8, label=f"moving average ({w} steps)")
        if len(y) and np.all(y > 0):
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("noise-prediction MSE")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
    return path
