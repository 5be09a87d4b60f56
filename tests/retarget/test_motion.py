"""Relative retargeting, gains, neutral-frame choice and time resampling."""

from __future__ import annotations

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.motion import (
    clamp_to_valid_range, nearest_frames, output_times, parse_gain, pick_neutral_frame, retarget_params,
    sample_params,
)


def _params(t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((t, 55)).astype(np.float32)
    return clamp_to_valid_range(p)


def test_relative_with_equal_neutrals_is_absolute():
    drive = _params(30)
    neutral = drive[7]
    gain = parse_gain(None)
    rel = retarget_params(drive, gain, relative=True, driver_neutral=neutral, actor_neutral=neutral)
    np.testing.assert_allclose(rel, retarget_params(drive, gain), atol=1e-6)


def test_relative_keeps_actor_rest_face():
    drive = _params(10, 1)
    actor = _params(1, 2)[0]
    out = retarget_params(drive, parse_gain(None), relative=True, driver_neutral=drive[3], actor_neutral=actor)
    np.testing.assert_allclose(out[3], clamp_to_valid_range(actor[None])[0], atol=1e-6)
    assert not np.allclose(out[4], out[3])


def test_gain_scales_only_its_part():
    drive = _params(5, 3)
    out = retarget_params(drive, parse_gain("expression=2"))
    np.testing.assert_allclose(out[:, :50], 2 * drive[:, :50], rtol=1e-6)
    np.testing.assert_allclose(out[:, 50:], drive[:, 50:], rtol=1e-6)
    jaw = retarget_params(drive, parse_gain("jaw=10"))
    assert jaw[:, 53:55].max() <= 0.2 and jaw[:, 53:55].min() >= -0.2  # clamped to the encoder range


@pytest.mark.parametrize("bad", ["jaw", "mouth=1", "jaw=x", "jaw=nan"])
def test_bad_gain_is_a_clear_error(bad):
    with pytest.raises(RetargetError, match="--gain"):
        parse_gain(bad)


def test_neutral_frame_is_least_expressive_valid_one():
    p = _params(20, 4) + 0.5
    p[12] = 0.0
    p[5] = 0.0
    valid = np.ones(20, bool)
    valid[5] = False
    assert pick_neutral_frame(p, valid) == 12


def test_output_times_range_and_resample():
    t = np.arange(50) / 25.0
    sel = output_times(t, start=0.4, end=1.0, fps=None, source_fps=25)
    assert sel[0] == pytest.approx(0.4) and len(sel) == 15
    res = output_times(t, start=None, end=None, fps=10, source_fps=25)
    assert len(res) == 20 and res[1] - res[0] == pytest.approx(0.1)
    with pytest.raises(RetargetError):
        output_times(t, start=3.0, end=None, fps=None, source_fps=25)


def test_sample_and_nearest():
    t = np.array([0.0, 1.0, 2.0])
    p = np.array([[0.0], [1.0], [4.0]], np.float32)
    np.testing.assert_allclose(sample_params(t, p, np.array([0.5, 1.5, 9.0]))[:, 0], [0.5, 2.5, 4.0])
    assert list(nearest_frames(t, np.array([0.4, 0.6, 1.9]))) == [0, 1, 2]
