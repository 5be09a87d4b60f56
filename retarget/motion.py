"""Turning the driver's tracked 55-d vectors into the actor's: relative mode, gains, time ranges.

Vector layout (SPEC.md §3/§5): expression [0:50], eyelids [50:52] (0 open .. 1 closed),
jaw [52:55] (jaw[0] = opening >= 0, jaw[1:3] in [-0.2, 0.2]).
"""

from __future__ import annotations

import numpy as np

from render.errors import RetargetError

EXPRESSION = slice(0, 50)
EYELIDS = slice(50, 52)
JAW = slice(52, 55)
PARTS = {"expression": EXPRESSION, "eyelids": EYELIDS, "jaw": JAW}
DIM = 55


def parse_gain(spec: str | None) -> dict[str, float]:
    """'jaw=1.2,eyelids=0.8' -> {'expression': 1.0, 'eyelids': 0.8, 'jaw': 1.2} (unnamed parts 1.0)."""
    gain = {k: 1.0 for k in PARTS}
    if not spec:
        return gain
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in PARTS:
            raise RetargetError(f"--gain: expected NAME=VALUE with NAME in {', '.join(PARTS)}, got {item!r}")
        try:
            gain[name] = float(value)
        except ValueError:
            raise RetargetError(f"--gain: {value!r} is not a number (in {item!r})") from None
        if not np.isfinite(gain[name]):
            raise RetargetError(f"--gain: {item!r} is not finite")
    return gain


def clamp_to_valid_range(params: np.ndarray) -> np.ndarray:
    """Clamp eyelids to [0, 1], jaw opening to >= 0 and jaw sideways/forward to [-0.2, 0.2],
    the ranges the SMIRK encoder produces (SPEC.md §5), so gains cannot leave the training domain."""
    out = params.astype(np.float32, copy=True)
    out[..., EYELIDS] = np.clip(out[..., EYELIDS], 0.0, 1.0)
    out[..., 52] = np.maximum(out[..., 52], 0.0)
    out[..., 53:55] = np.clip(out[..., 53:55], -0.2, 0.2)
    return out


def apply_gain(params: np.ndarray, gain: dict[str, float]) -> np.ndarray:
    """Scale each part of (T, 55) `params` by its gain; returns a new float32 array (not clamped)."""
    out = params.astype(np.float32, copy=True)
    for name, sl in PARTS.items():
        out[..., sl] *= gain[name]
    return out


def pick_neutral_frame(params: np.ndarray, valid: np.ndarray | None = None) -> int:
    """Index of the least expressive valid frame: smallest norm of the 55-d vector with the jaw
    opening and eyelids weighted as strongly as the whole expression block."""
    p = np.asarray(params, np.float64)
    score = (np.linalg.norm(p[:, EXPRESSION], axis=1) + 3.0 * np.abs(p[:, 52])
             + np.linalg.norm(p[:, EYELIDS], axis=1))
    if valid is not None:
        if not np.any(valid):
            raise RetargetError("no valid frame to take the neutral expression from")
        score = np.where(valid, score, np.inf)
    return int(np.argmin(score))


def retarget_params(driver: np.ndarray, gain: dict[str, float], *, relative: bool = False,
                    driver_neutral: np.ndarray | None = None, actor_neutral: np.ndarray | None = None) -> np.ndarray:
    """The actor's per-frame 55-d vectors from the driver's (T, 55).

    Absolute mode: gain * driver. Relative mode: actor_neutral + gain * (driver - driver_neutral),
    so the actor keeps their resting face and only the performance transfers. Both clamp to the
    encoder's ranges. Returns float32 (T, 55).
    """
    driver = np.asarray(driver, np.float32)
    if driver.ndim != 2 or driver.shape[1] != DIM:
        raise RetargetError(f"expected expression vectors of shape (T, {DIM}), got {driver.shape}")
    if not relative:
        return clamp_to_valid_range(apply_gain(driver, gain))
    if driver_neutral is None or actor_neutral is None:
        raise RetargetError("relative mode needs the driver's neutral and the actor's own expression")
    delta = apply_gain(driver - np.asarray(driver_neutral, np.float32)[None], gain)
    return clamp_to_valid_range(np.asarray(actor_neutral, np.float32)[None] + delta)


def output_times(times: np.ndarray, *, start: float | None, end: float | None,
                 fps: float | None, source_fps: float) -> np.ndarray:
    """Times (seconds) of the output frames: the driving frames inside [start, end), or, with
    `fps`, a regular grid at that rate over the same range."""
    t = np.asarray(times, np.float64)
    lo = t[0] if start is None else float(start)
    hi = t[-1] + 1.0 / source_fps if end is None else float(end)  # the last frame lasts 1/fps
    if hi <= lo:
        raise RetargetError(f"empty time range: start {lo:.3f}s >= end {hi:.3f}s")
    if lo > t[-1]:
        raise RetargetError(f"--start {lo:.3f}s is after the last driving frame ({t[-1]:.3f}s)")
    if fps is None:
        sel = t[(t >= lo - 1e-6) & (t < hi - 1e-6)]
        if sel.size == 0:
            raise RetargetError(f"no driving frame between {lo:.3f}s and {hi:.3f}s")
        return sel
    if fps <= 0:
        raise RetargetError(f"--fps must be positive, got {fps}")
    n = max(1, int(np.floor((min(hi, t[-1] + 1.0 / source_fps) - lo) * fps + 1e-6)))
    return lo + np.arange(n) / fps


def sample_params(times: np.ndarray, params: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Linear interpolation of (T, D) `params` given at `times` to the times `at` (held at the ends)."""
    params = np.asarray(params, np.float32)
    return np.stack([np.interp(at, times, params[:, d]) for d in range(params.shape[1])], axis=1).astype(np.float32)


def nearest_frames(times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Index of the driving frame nearest in time to each of `at` (for previews)."""
    idx = np.clip(np.searchsorted(times, at), 1, len(times) - 1)
    left = times[idx - 1]
    right = times[idx]
    return np.where(np.abs(at - left) <= np.abs(right - at), idx - 1, idx)
