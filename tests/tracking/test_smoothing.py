"""tracking.smoothing: filling invalid frames, zero-phase and One Euro smoothing, and the
quality numbers of the defaults on synthetic facial-motion curves (known clean curve + noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from render.errors import RetargetError
from tracking import smoothing as sm
from tracking.smoothing import (OneEuroFilter, fill_invalid, lag_frames, one_euro, smooth, still_jitter,
                                synthetic_motion, zero_phase)

NOISE_SD = 0.05  # on curves spanning [-1, 1]


def noisy_motion(fps: int, seconds: int = 30, seed: int = 0):
    t, clean, still = synthetic_motion(fps * seconds, fps, dims=8, seed=seed)
    noisy = clean + NOISE_SD * np.random.default_rng(seed + 100).standard_normal(clean.shape)
    return t, clean, still, noisy


def test_fill_invalid_interpolates_in_time_and_holds_the_ends():
    times = np.array([0.0, 0.1, 0.3, 0.4, 0.5, 0.9])
    values = np.array([[9.0], [1.0], [9.0], [4.0], [9.0], [7.0]], np.float32)
    valid = np.array([False, True, False, True, False, True])
    out = fill_invalid(values, valid, times)
    # frame 2 at t=0.3 lies 2/3 of the way from (0.1, 1) to (0.4, 4); frame 4 at 0.5: 1/5 of the way from 4 to 7.
    np.testing.assert_allclose(out[:, 0], [1.0, 1.0, 3.0, 4.0, 4.6, 7.0], rtol=1e-6)
    assert out.dtype == np.float32 and values[2, 0] == 9.0  # input untouched
    with pytest.raises(RetargetError):
        fill_invalid(values, np.zeros(6, bool), times)


def test_zero_phase_keeps_lines_exactly_even_with_irregular_times():
    t = np.sort(np.random.default_rng(1).uniform(0, 3, 40))
    line = np.stack([2.0 * t - 1.0, -0.5 * t + 0.25], axis=1)
    np.testing.assert_allclose(zero_phase(line, t), line, atol=1e-4)
    for n in (1, 2, 3):  # shorter than the kernel: still defined, still exact on a line
        np.testing.assert_allclose(zero_phase(line[:n], t[:n]), line[:n], atol=1e-4)


def test_zero_phase_meets_jitter_and_lag_targets():
    for fps in (25, 30):
        t, clean, still, noisy = noisy_motion(fps)
        out = smooth(noisy, t, "zero_phase")
        margin = int(0.3 * fps)
        reduction = still_jitter(noisy, still, margin) / still_jitter(out, still, margin)
        lag = lag_frames(out, clean)
        assert reduction >= 5.0, (fps, reduction)
        assert abs(lag) < 0.5, (fps, lag)
        assert np.sqrt(np.mean((out - clean) ** 2)) < NOISE_SD  # closer to the truth than the input


def test_one_euro_meets_jitter_and_lag_targets():
    for fps in (25, 30):
        t, clean, still, noisy = noisy_motion(fps)
        out = smooth(noisy, t, "one_euro")
        margin = int(0.3 * fps)
        reduction = still_jitter(noisy, still, margin) / still_jitter(out, still, margin)
        lag = lag_frames(out, clean)
        assert reduction >= 5.0, (fps, reduction)
        assert 0.0 < lag <= 1.0, (fps, lag)  # causal: some lag, but at most one frame


def test_one_euro_follows_the_paper_formula_with_real_time_steps():
    # beta = 0: a plain exponential filter with alpha = 1 / (1 + tau / Te), tau = 1 / (2 pi fc),
    # Te the real time step (a dropped frame doubles it).
    t = np.array([0.0, 0.04, 0.12, 0.16])
    x = np.array([[0.0], [1.0], [1.0], [1.0]])
    out = one_euro(x, t, min_cutoff=2.0, beta=0.0)
    tau = 1 / (2 * math.pi * 2.0)
    y, expected = 0.0, [0.0]
    for k in range(1, 4):
        a = 1 / (1 + tau / (t[k] - t[k - 1]))
        y = a * x[k, 0] + (1 - a) * y
        expected.append(y)
    np.testing.assert_allclose(out[:, 0], expected, rtol=1e-6)


def test_one_euro_speed_raises_the_cutoff_and_is_causal():
    t, clean, _, noisy = noisy_motion(25, seconds=4)
    slow = one_euro(noisy, t, beta=0.0)
    fast = one_euro(noisy, t, beta=5.0)
    assert np.mean(np.abs(fast - clean)) < np.mean(np.abs(slow - clean))  # less lag in motion
    changed = noisy.copy()
    changed[50:] += 3.0
    np.testing.assert_array_equal(one_euro(changed, t)[:50], one_euro(noisy, t)[:50])
    f = OneEuroFilter()
    first = f(np.array([1.0, 2.0]), 0.0)
    np.testing.assert_array_equal(first, [1.0, 2.0])


def test_smooth_dispatch_and_errors():
    t = np.arange(10) / 25
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float64)
    np.testing.assert_array_equal(smooth(x, t, "none"), x.astype(np.float32))
    assert smooth(x, t).dtype == np.float32
    np.testing.assert_allclose(smooth(x, t, "zero_phase", cutoff_hz=4.0), zero_phase(x, t, 4.0))
    with pytest.raises(RetargetError, match="unknown smoothing"):
        smooth(x, t, "kalman")
    with pytest.raises(RetargetError, match="takes"):
        smooth(x, t, "one_euro", cutoff_hz=3.0)
    with pytest.raises(RetargetError, match="positive"):
        smooth(x, t, "zero_phase", cutoff_hz=0)
    with pytest.raises(RetargetError, match="min_cutoff"):
        smooth(x, t, "one_euro", min_cutoff=-1)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(RetargetError, match="non-finite"):
        smooth(bad, t)


def test_margin_frames_make_a_cut_range_equal_the_whole_clip():
    """Smoothing a range plus `margin_frames` on each side and cutting gives the whole clip's
    values: exactly for zero_phase (samples beyond 4 sigma weigh 0), within the stated 1e-3 of
    the curve's span for One Euro (seen: 2e-9 on this moving curve); one frame less of
    margin already changes zero_phase's edge rows, and none at all changes them by ~0.05."""
    t, x, _ = sm.synthetic_motion(400, 25.0, dims=6, seed=3)
    x = x + np.random.default_rng(0).normal(0.0, 0.05, x.shape)
    lo, hi = 200, 240
    assert sm.margin_frames("zero_phase", 25.0) == (6, 6)
    assert sm.margin_frames("zero_phase", 25.0, cutoff_hz=5.0) == (3, 3)
    assert sm.margin_frames("none", 25.0) == (0, 0)

    def cut(method, before, after):
        part = sm.smooth(x[lo - before:hi + after], t[lo - before:hi + after], method)
        return part[before:before + hi - lo]

    whole = sm.smooth(x, t, "zero_phase")[lo:hi]
    np.testing.assert_array_equal(cut("zero_phase", 6, 6), whole)
    assert np.abs(cut("zero_phase", 5, 5) - whole)[[0, -1]].max() > 0
    assert np.abs(cut("zero_phase", 0, 0) - whole).max() > 0.01

    before, after = sm.margin_frames("one_euro", 25.0)
    assert after == 0 and before == 96  # 3.8 s: 1e-3 of a still face's start state left
    whole = sm.smooth(x, t, "one_euro")[lo:hi]
    np.testing.assert_allclose(cut("one_euro", before, 0), whole, rtol=0, atol=1e-3 * 2)
    assert np.abs(cut("one_euro", 0, 0) - whole).max() > 0.02
