"""Temporal smoothing of per-frame parameter curves, and filling of frames without a face.

Three methods, all working on real (possibly irregular) timestamps:
- ``zero_phase`` (default, offline): local-linear regression with a Gaussian kernel in time.
  The kernel is symmetric, so the result has no lag; the local line (rather than a plain
  weighted mean) keeps the ends of the clip and steady ramps unbiased. Any length works,
  including clips shorter than the kernel.
- ``one_euro`` (causal, for streaming): the One Euro filter of Casiez, Roussel and Vogel
  (CHI 2012): an exponential low-pass whose cutoff rises with the filtered speed,
  ``cutoff = min_cutoff + beta * |dx/dt|``; the derivative is itself low-passed at
  ``d_cutoff``. Each column is filtered independently.
- ``none``: values returned unchanged (as float32).
"""

from __future__ import annotations

import math

import numpy as np

from render.errors import RetargetError

METHODS = ("zero_phase", "one_euro", "none")

# Defaults chosen on the synthetic hold-and-move curves below (`synthetic_motion`, measured by
# bench/tracking.py and tests/tracking/test_smoothing.py): both cut the jitter of a still face
# by more than 5x at 25 and 30 fps, zero-phase with no lag, One Euro with under one frame of lag
# (at noise sd 0.05 on curves spanning [-1, 1]; with more noise the One Euro filter gives less:
# beta reacts to the noise's own speed). A 2.5 Hz half-power cutoff halves 4 Hz (syllable-rate)
# motion: raise `cutoff_hz` for crisper lip motion from a clean track.
ZERO_PHASE_CUTOFF_HZ = 2.5
ONE_EURO_MIN_CUTOFF = 0.3   # Hz, the cutoff when still
ONE_EURO_BETA = 2.0         # Hz per (unit/s): how fast the cutoff rises with speed
ONE_EURO_D_CUTOFF = 1.0     # Hz, the low-pass on the speed estimate


def fill_invalid(values: np.ndarray, valid: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Fill invalid rows by linear interpolation in time between the nearest valid rows;
    before the first / after the last valid row the nearest valid row is held.

    values: (T, D) float; valid: (T,) bool; times: (T,) seconds, non-decreasing.
    Returns a new (T, D) float32 array; valid rows are unchanged. Raises RetargetError if no
    row is valid.
    """
    values = np.asarray(values, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if not valid.any():
        raise RetargetError("no valid frame to fill from")
    out = values.copy()
    if valid.all():
        return out
    t = np.asarray(times, dtype=np.float64)
    for d in range(values.shape[1]):
        # np.interp holds the end values outside the valid range: the edge hold.
        out[~valid, d] = np.interp(t[~valid], t[valid], values[valid, d])
    return out


def _gaussian_sigma_s(cutoff_hz: float) -> float:
    """Gaussian kernel width (s) whose frequency response exp(-2 pi^2 sigma^2 f^2) falls to
    1/sqrt(2) (half power) at `cutoff_hz`."""
    return math.sqrt(math.log(2.0)) / (2.0 * math.pi * cutoff_hz)


# The zero-phase kernel is cut at this many sigmas: a sample there weighs exp(-8) = 3.4e-4 of
# the centre one, and samples beyond it weigh exactly nothing.
KERNEL_REACH_SIGMAS = 4.0


def _zero_phase_reach(sigma_s: float, step_s: float) -> int:
    """Frames on each side that the zero-phase window spans (at least 1)."""
    return max(1, math.ceil(KERNEL_REACH_SIGMAS * sigma_s / step_s - 1e-9))


def zero_phase(values: np.ndarray, times: np.ndarray, cutoff_hz: float = ZERO_PHASE_CUTOFF_HZ) -> np.ndarray:
    """Zero-lag smoothing: at each time, the value of a Gaussian-weighted least-squares line
    fitted to the samples around it (kernel sigma from `cutoff_hz`, half-power frequency).

    values: (T, D); times: (T,) seconds, non-decreasing (irregular spacing is fine).
    Returns (T, D) float32.
    """
    x = np.asarray(values, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    T = x.shape[0]
    if T < 2:
        return x.astype(np.float32)
    sigma = _gaussian_sigma_s(cutoff_hz)
    dt = np.diff(t)
    step = float(np.median(dt[dt > 0])) if np.any(dt > 0) else 1.0
    half = int(min(T - 1, _zero_phase_reach(sigma, step)))
    s0 = np.zeros(T)
    s1 = np.zeros(T)
    s2 = np.zeros(T)
    y0 = np.zeros_like(x)
    y1 = np.zeros_like(x)
    for k in range(-half, half + 1):
        lo, hi = max(0, -k), min(T, T - k)  # rows i whose neighbour i+k exists
        i = np.arange(lo, hi)
        d = t[i + k] - t[i]
        w = np.exp(-0.5 * (d / sigma) ** 2)
        s0[i] += w
        s1[i] += w * d
        s2[i] += w * d * d
        y0[i] += w[:, None] * x[i + k]
        y1[i] += (w * d)[:, None] * x[i + k]
    det = s0 * s2 - s1 * s1
    # Where the line is ill-determined (one sample in reach), fall back to the weighted mean.
    ok = det > 1e-12 * np.maximum(s0 * s2, 1e-300)
    out = y0 / s0[:, None]
    out[ok] = (s2[ok, None] * y0[ok] - s1[ok, None] * y1[ok]) / det[ok, None]
    return out.astype(np.float32)


# One Euro: the margin before a range is where a still face's starting state has decayed to this
# fraction of its weight (the filter is causal, its memory exponential).
ONE_EURO_SETTLED = 1e-3


def margin_frames(method: str, fps: float, **params) -> tuple[int, int]:
    """Frames of context the smoothing needs (before, after) a range so that, smoothing a
    longer run of frames and cutting it to the range, the range gets the values it would get
    within the whole clip: its settling time at its cutoff, in frames at `fps`.

    - ``zero_phase``: the kernel's reach, ceil(4 sigma * fps) frames on each side, where
      sigma = sqrt(ln 2) / (2 pi cutoff_hz) (0.053 s at the default 2.5 Hz: 4 sigma =
      0.212 s, 6 frames at 25 fps, 7 at 30, 13 at 60). Samples farther away weigh exactly 0,
      so with this margin the range's values equal the whole clip's (same input rows).
    - ``one_euro``: causal, so nothing after; before, the frames until a still face's initial
      state weighs below ONE_EURO_SETTLED (1e-3): ln(1e-3) / ln(1 - alpha(min_cutoff)) (96
      frames, 3.8 s, at 0.3 Hz and 25 fps). The filter opens up with speed, so in motion it
      settles sooner: the values agree to about 1e-3 of the jump at the range's start.
    - ``none``: (0, 0).
    """
    if not fps > 0:
        raise RetargetError(f"margin_frames needs a positive fps, got {fps}")
    if method == "none":
        return 0, 0
    if method == "zero_phase":
        cutoff = params.get("cutoff_hz", ZERO_PHASE_CUTOFF_HZ)
        if not cutoff > 0:
            raise RetargetError(f"zero_phase cutoff_hz must be positive, got {cutoff}")
        n = _zero_phase_reach(_gaussian_sigma_s(cutoff), 1.0 / fps)
        return n, n
    if method == "one_euro":
        min_cutoff = params.get("min_cutoff", ONE_EURO_MIN_CUTOFF)
        if not min_cutoff > 0:
            raise RetargetError(f"one_euro min_cutoff must be positive, got {min_cutoff}")
        a = _alpha(min_cutoff, 1.0 / fps)
        return int(math.ceil(math.log(ONE_EURO_SETTLED) / math.log(1.0 - a))), 0
    raise RetargetError(f"unknown smoothing method {method!r}; choose one of {', '.join(METHODS)}")


def _alpha(cutoff: np.ndarray | float, te: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / te)


class OneEuroFilter:
    """Causal One Euro filter over D-dimensional samples (Casiez et al. 2012), one step per
    call: ``y = f(x, t)`` with x (D,) and t seconds. State is per column."""

    def __init__(self, min_cutoff: float = ONE_EURO_MIN_CUTOFF, beta: float = ONE_EURO_BETA,
                 d_cutoff: float = ONE_EURO_D_CUTOFF, *, default_rate: float = 25.0):
        if min_cutoff <= 0 or d_cutoff <= 0 or beta < 0:
            raise RetargetError(f"one euro parameters must be min_cutoff > 0, d_cutoff > 0, beta >= 0; "
                                f"got {min_cutoff}, {d_cutoff}, {beta}")
        self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
        self.default_te = 1.0 / default_rate
        self.reset()

    def reset(self) -> None:
        self._x_raw = None   # last raw sample (the paper differentiates raw values)
        self._x_hat = None   # last filtered value
        self._dx_hat = None  # last filtered derivative
        self._t = None

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self._x_hat is None:
            self._x_raw, self._x_hat, self._dx_hat, self._t = x.copy(), x.copy(), np.zeros_like(x), t
            return x.copy()
        te = t - self._t
        if not te > 0:  # repeated or missing timestamp: assume the nominal frame step
            te = self.default_te
        dx = (x - self._x_raw) / te
        a_d = _alpha(self.d_cutoff, te)
        self._dx_hat = a_d * dx + (1.0 - a_d) * self._dx_hat
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx_hat)
        a = _alpha(cutoff, te)
        self._x_hat = a * x + (1.0 - a) * self._x_hat
        self._x_raw, self._t = x, t
        return self._x_hat.copy()


def one_euro(values: np.ndarray, times: np.ndarray, min_cutoff: float = ONE_EURO_MIN_CUTOFF,
             beta: float = ONE_EURO_BETA, d_cutoff: float = ONE_EURO_D_CUTOFF) -> np.ndarray:
    """Run `OneEuroFilter` over a whole (T, D) curve with real times (T,) seconds.
    Returns (T, D) float32; row i depends only on rows <= i."""
    x = np.asarray(values, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    dt = np.diff(t)
    rate = 1.0 / float(np.median(dt[dt > 0])) if np.any(dt > 0) else 25.0
    f = OneEuroFilter(min_cutoff, beta, d_cutoff, default_rate=rate)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = f(x[i], float(t[i]))
    return out.astype(np.float32)


def smooth(values: np.ndarray, times: np.ndarray, method: str = "zero_phase", **params) -> np.ndarray:
    """Smooth a (T, D) curve sampled at times (T,) seconds with `method` ("zero_phase",
    "one_euro" or "none"); `params` go to that method (zero_phase: cutoff_hz; one_euro:
    min_cutoff, beta, d_cutoff). Values must be finite (fill invalid frames first).
    Returns (T, D) float32.
    """
    values = np.asarray(values)
    times = np.asarray(times, dtype=np.float64)
    if values.ndim != 2 or times.shape != (values.shape[0],):
        raise RetargetError(f"smooth expects values (T, D) and times (T,), got {values.shape} and {times.shape}")
    if not np.all(np.isfinite(values)):
        raise RetargetError("smooth got non-finite values; fill invalid frames first")
    if method == "none":
        return values.astype(np.float32)
    if method == "zero_phase":
        allowed = {"cutoff_hz"}
        fn = zero_phase
    elif method == "one_euro":
        allowed = {"min_cutoff", "beta", "d_cutoff"}
        fn = one_euro
    else:
        raise RetargetError(f"unknown smoothing method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(params) - allowed
    if unknown:
        raise RetargetError(f"smoothing {method!r} takes {sorted(allowed)}, not {sorted(unknown)}")
    if method == "zero_phase" and params.get("cutoff_hz", ZERO_PHASE_CUTOFF_HZ) <= 0:
        raise RetargetError(f"zero_phase cutoff_hz must be positive, got {params['cutoff_hz']}")
    return fn(values, times, **params)


# -- Evaluation helpers (used by the benchmark and the tests) ------------------------------

def synthetic_motion(n_frames: int, fps: float, dims: int = 8, seed: int = 0, *,
                     hold_s: tuple[float, float] = (0.4, 1.5),
                     move_s: tuple[float, float] = (0.2, 0.6)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A clean facial-motion-like curve: each column holds a level in [-1, 1] for a random
    `hold_s` time, then moves to a new level along a half-cosine of random `move_s` duration
    (expressions hold, then change within a few hundred ms).

    Returns times (T,) seconds, clean values (T, dims) float64 and `still` (T, dims) bool,
    True where the column is holding.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames) / fps
    x = np.zeros((n_frames, dims))
    still = np.zeros((n_frames, dims), dtype=bool)
    for d in range(dims):
        pos, level = 0.0, rng.uniform(-1, 1)
        while pos <= t[-1]:
            hold, move, new = rng.uniform(*hold_s), rng.uniform(*move_s), rng.uniform(-1, 1)
            sel = (t >= pos) & (t < pos + hold)
            x[sel, d], still[sel, d] = level, True
            sel = (t >= pos + hold) & (t < pos + hold + move)
            u = (t[sel] - pos - hold) / move
            x[sel, d] = level + (new - level) * (0.5 - 0.5 * np.cos(np.pi * u))
            pos, level = pos + hold + move, new
    return t, x, still


def still_jitter(values: np.ndarray, still: np.ndarray, margin: int) -> float:
    """Jitter: RMS of frame-to-frame differences over the frames where the clean curve holds
    still, at least `margin` frames away from any movement (so a filter's response to the
    movement itself is not counted). values, still: (T, D)."""
    from scipy.ndimage import binary_erosion

    inner = np.zeros_like(still)
    for d in range(still.shape[1]):
        inner[:, d] = binary_erosion(still[:, d], np.ones(2 * margin + 1, dtype=bool))
    pairs = inner[1:] & inner[:-1]
    if not pairs.any():
        raise ValueError("no still stretch longer than the margin")
    return float(np.sqrt(np.mean(np.diff(values, axis=0)[pairs] ** 2)))


def lag_frames(values: np.ndarray, clean: np.ndarray, max_lag: int = 20) -> float:
    """Delay of `values` behind `clean` in frames (positive: late), from the peak of their
    cross-correlation summed over columns, refined to sub-frame by a parabola. (T, D) each."""
    y = values - values.mean(axis=0)
    c = clean - clean.mean(axis=0)
    n = y.shape[0]
    lags = np.arange(-max_lag, max_lag + 1)
    corr = np.array([np.sum(y[k:] * c[: n - k]) if k >= 0 else np.sum(y[: n + k] * c[-k:]) for k in lags])
    i = int(np.argmax(corr))
    if 0 < i < len(lags) - 1:
        den = corr[i - 1] - 2 * corr[i] + corr[i + 1]
        if den != 0:
            return float(lags[i] + 0.5 * (corr[i - 1] - corr[i + 1]) / den)
    return float(lags[i])
