"""Small statistics over per-frame series, NaN-aware (NaN marks a frame without a face)."""

from __future__ import annotations

import numpy as np


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two (T,) series over the frames where both are finite.

    None when fewer than 3 such frames remain or either series is constant there (a
    correlation is undefined, and reporting 0 would read as "unrelated").
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return None
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    if den <= 1e-12 * max(len(a), 1):
        return None
    return float(np.clip((a * b).sum() / den, -1.0, 1.0))


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean |a - b| over the frames (and columns) where both are finite; None if none."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    d = d[np.isfinite(d)]
    return float(d.mean()) if d.size else None


def summary(values: np.ndarray) -> dict:
    """{"mean", "median", "p5", "p95", "min", "max", "frames"} of the finite values (None when empty)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"mean": None, "median": None, "p5": None, "p95": None, "min": None, "max": None, "frames": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p5": float(np.percentile(v, 5)),
            "p95": float(np.percentile(v, 95)), "min": float(v.min()), "max": float(v.max()),
            "frames": int(v.size)}


def nanmean(values) -> float | None:
    """Mean of the finite entries (None-safe: None entries are ignored); None when there are none."""
    v = np.array([np.nan if x is None else x for x in np.ravel(values)], np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def second_difference_rms(series: np.ndarray) -> float | None:
    """High-pass energy of a regularly sampled (T,) or (T, D) series: the RMS of
    x[t+1] - 2 x[t] + x[t-1] over the triples of consecutive finite rows (all columns).

    A smooth motion (constant velocity) gives 0; frame-to-frame jitter of amplitude e gives
    about 2.4 e. None when no triple is finite.
    """
    x = np.asarray(series, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if len(x) < 3:
        return None
    d2 = x[2:] - 2 * x[1:-1] + x[:-2]
    ok = np.isfinite(d2).all(axis=tuple(range(1, d2.ndim)))
    if not ok.any():
        return None
    return float(np.sqrt(np.mean(d2[ok] ** 2)))


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None when either is missing or den is 0."""
    if num is None or den is None or den <= 0:
        return None
    return float(num / den)
