"""Keyframe transitions and the keyframe file format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from render.errors import RetargetError
from tracking.keyframes import (
    PRESETS, Keyframe, evaluate_keyframes, interpolate_keyframes, parse_keyframes, slerp_jaw,
)

EASINGS = ("smoothstep", "linear", "cubic")


def random_keyframes(n=5, seed=0):
    rng = np.random.default_rng(seed)
    times = np.array([0.0, 0.4, 1.0, 1.2, 2.0])[:n]
    return [Keyframe(t, rng.normal(0, 1, 55)) for t in times]


@pytest.mark.parametrize("easing", EASINGS)
def test_exact_at_keyframes_and_hold_at_ends(easing):
    kfs = random_keyframes()
    # Keyframe times are multiples of 1/10 s, so 10 fps frames land on them.
    times, params = interpolate_keyframes(kfs, 10, easing=easing, duration=2.5)
    assert times.shape == (26,) and params.shape == (26, 55) and params.dtype == np.float32
    np.testing.assert_allclose(np.diff(times), 0.1, atol=1e-12)
    for kf in kfs:
        i = int(round(kf.time_s * 10))
        np.testing.assert_array_equal(params[i], kf.params)
    # After the last keyframe the values hold.
    np.testing.assert_array_equal(params[20:], np.repeat(kfs[-1].params[None], 6, 0))
    # A keyframe after t = 0: the first one holds before it.
    late = [Keyframe(1.0, np.ones(55)), Keyframe(2.0, np.zeros(55))]
    _, p = interpolate_keyframes(late, 4, easing=easing)
    np.testing.assert_array_equal(p[:5], np.ones((5, 55), np.float32))


@pytest.mark.parametrize("easing", EASINGS)
def test_monotone_and_bounded_between_keyframes(easing):
    kfs = random_keyframes()
    knots = np.array([k.time_s for k in kfs])
    values = np.stack([k.params for k in kfs]).astype(np.float64)
    t = np.linspace(0, 2, 801)
    # Expression and eyelids move per coefficient (the jaw is a rotation: test_jaw_* below).
    p = evaluate_keyframes(kfs, t, easing=easing).astype(np.float64)[:, :52]
    values = values[:, :52]
    for i in range(len(kfs) - 1):
        seg = (t >= knots[i]) & (t <= knots[i + 1])
        d = np.diff(p[seg], axis=0)
        rising = values[i + 1] >= values[i]
        # Within each segment every coefficient moves one way only, from one keyframe's
        # value to the next: no overshoot (eyelids stay in [0, 1], jaw never negative).
        assert np.all(d[:, rising] >= -1e-6) and np.all(d[:, ~rising] <= 1e-6)
        lo, hi = np.minimum(values[i], values[i + 1]), np.maximum(values[i], values[i + 1])
        assert np.all(p[seg] >= lo - 1e-6) and np.all(p[seg] <= hi + 1e-6)


def test_easing_shapes_differ_as_documented():
    kfs = [Keyframe(0.0, np.zeros(55)), Keyframe(1.0, np.ones(55)), Keyframe(2.0, np.full(55, 3.0))]
    t = np.array([0.25, 0.5, 0.999, 1.0, 1.001])
    lin = evaluate_keyframes(kfs, t, easing="linear")[:, 0]
    smooth = evaluate_keyframes(kfs, t, easing="smoothstep")[:, 0]
    cubic = evaluate_keyframes(kfs, t, easing="cubic")[:, 0]
    np.testing.assert_allclose(lin[:2], [0.25, 0.5], atol=1e-6)
    np.testing.assert_allclose(smooth[:2], [0.15625, 0.5], atol=1e-6)  # 3u^2 - 2u^3
    # Smoothstep stops at the keyframe; cubic passes through it at speed (C1), with equal
    # slopes on both sides.
    slope = lambda v: ((v[3] - v[2]) / 0.001, (v[4] - v[3]) / 0.001)  # noqa: E731
    assert max(abs(s) for s in slope(smooth)) < 0.05
    left, right = slope(cubic)
    assert left > 0.5 and abs(left - right) / left < 0.05


def test_single_keyframe_and_bad_calls():
    kf = Keyframe(0.5, np.arange(55))
    times, p = interpolate_keyframes([kf], 30, duration=1.0)
    assert len(times) == 31 and np.all(p == kf.params)
    with pytest.raises(RetargetError, match="easing"):
        evaluate_keyframes([kf], [0.0], easing="bounce")
    with pytest.raises(RetargetError, match="same time"):
        evaluate_keyframes([kf, Keyframe(0.5, np.zeros(55))], [0.0])
    with pytest.raises(RetargetError, match="fps"):
        interpolate_keyframes([kf], 0)
    with pytest.raises(RetargetError, match="55"):
        Keyframe(0.0, np.zeros(54))
    with pytest.raises(RetargetError, match="time"):
        Keyframe(-1.0, np.zeros(55))
    with pytest.raises(RetargetError, match="at least one"):
        interpolate_keyframes([], 30)


def test_parse_file_presets_and_fields(tmp_path):
    spec = [
        {"time": 0.0, "preset": "neutral"},
        {"time": 1.0, "jaw": 0.3, "eyelids": [0.0, 0.5], "expression": {"3": 1.5, "49": -2}},
        {"time": 2.0, "preset": "eyes_closed", "expression": [0.1, 0.2]},
        {"time": 2.5, "preset": "jaw_open", "jaw": [0.1, 0.05, -0.2], "eyelids": 1},
    ]
    path = tmp_path / "kf.json"
    path.write_text(json.dumps(spec))
    kfs = parse_keyframes(path)
    assert [k.time_s for k in kfs] == [0.0, 1.0, 2.0, 2.5]
    np.testing.assert_array_equal(kfs[0].params, np.zeros(55))
    p = kfs[1].params
    assert p[3] == 1.5 and p[49] == -2 and p[52] == np.float32(0.3) and list(p[50:52]) == [0.0, 0.5]
    assert np.count_nonzero(p) == 4
    p = kfs[2].params
    assert list(p[50:52]) == [1.0, 1.0] and p[0] == np.float32(0.1) and p[1] == np.float32(0.2)
    np.testing.assert_allclose(kfs[3].params[52:], [0.1, 0.05, -0.2], atol=1e-7)
    assert list(kfs[3].params[50:52]) == [1.0, 1.0]
    # The same spec as JSON text, and wrapped in an object.
    text_kfs = parse_keyframes(json.dumps({"keyframes": spec}))
    for a, b in zip(kfs, text_kfs):
        np.testing.assert_array_equal(a.params, b.params)
    assert PRESETS["jaw_open"][52] == 0.25


@pytest.mark.parametrize("spec, message", [
    ("[]", "non-empty"),
    ('[{"preset": "neutral"}]', "missing \"time\""),
    ('[{"time": -1}]', ">= 0"),
    ('[{"time": "soon"}]', "number"),
    ('[{"time": true}]', "number"),
    ('[{"time": 0, "smile": 1}]', "unknown field"),
    ('[{"time": 0, "preset": "smile"}]', "unknown preset"),
    ('[{"time": 0, "expression": {"50": 1}}]', "0-49"),
    ('[{"time": 0, "expression": {"x": 1}}]', "0-49"),
    ('[{"time": 0, "expression": [0.0]}, {"time": 0.0}]', "strictly increase"),
    ('[{"time": 1}, {"time": 0.5}]', "strictly increase"),
    ('[{"time": 0, "eyelids": [1.2, 0]}]', "\\[0, 1\\]"),
    ('[{"time": 0, "eyelids": [1, 0, 0]}]', "left, right"),
    ('[{"time": 0, "jaw": -0.1}]', ">= 0 radians"),
    ('[{"time": 0, "jaw": [0.1, 0.5, 0]}]', "0.2"),
    ('[{"time": 0, "jaw": [0.1, 0]}]', "3 values"),
    ('{"frames": []}', "keyframes"),
    ('[{"time": 0,}]', "not valid JSON \\(line 1"),
])
def test_bad_specs_rejected(spec, message):
    with pytest.raises(RetargetError, match=message):
        parse_keyframes(spec)


def test_bad_file_named_in_error(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(RetargetError, match="none.json"):
        parse_keyframes(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"time": 0, "eyelids": 3}]')
    with pytest.raises(RetargetError, match=r"bad\.json: keyframe 0"):
        parse_keyframes(bad)


def _jaw(open_, side, fwd):
    p = np.zeros(55)
    p[52:55] = [open_, side, fwd]
    return p


@pytest.mark.parametrize("easing", EASINGS)
def test_jaw_moves_along_the_geodesic_through_its_midpoint(easing):
    from scipy.spatial.transform import Rotation

    a, b = np.array([0.05, 0.2, -0.2]), np.array([0.6, -0.2, 0.15])
    kfs = [Keyframe(0.0, _jaw(*a)), Keyframe(1.0, _jaw(*b))]
    ra, rb = Rotation.from_rotvec(a), Rotation.from_rotvec(b)
    total = (ra.inv() * rb).magnitude()
    # The geodesic midpoint: a rotated by half of the relative rotation.
    mid = (ra * Rotation.from_rotvec((ra.inv() * rb).as_rotvec() / 2)).as_rotvec()
    got = evaluate_keyframes(kfs, [0.5], easing=easing)[0, 52:55]  # every easing is symmetric: w(0.5) = 0.5
    np.testing.assert_allclose(got, mid, atol=1e-6)
    assert np.abs(mid - (a + b) / 2).max() > 1e-3  # ... which is not the per-component average
    t = np.linspace(0, 1, 101)
    jaw = evaluate_keyframes(kfs, t, easing=easing)[:, 52:55].astype(np.float64)
    r = Rotation.from_rotvec(jaw)
    to_a, to_b = (ra.inv() * r).magnitude(), (r.inv() * rb).magnitude()
    np.testing.assert_allclose(to_a + to_b, total, atol=1e-5)  # on the geodesic, never off it
    assert np.all(np.diff(to_a) >= -1e-6)  # and moving one way
    np.testing.assert_array_equal(jaw[[0, -1]], np.float32([a, b]))


def test_slerp_jaw_ends_and_equal_rotations():
    a, b = np.array([0.1, 0.0, 0.1]), np.array([0.3, 0.1, -0.1])
    np.testing.assert_allclose(slerp_jaw(a, b, np.array([0.0, 1.0])), [a, b], atol=1e-12)
    np.testing.assert_array_equal(slerp_jaw(a, a, np.array([0.3, 0.7])), [a, a])


@pytest.mark.parametrize("easing", EASINGS)
def test_hold_keeps_the_keyframe_flat_then_moves(easing):
    rng = np.random.default_rng(3)
    p0, p1, p2 = (np.clip(rng.normal(0, 0.3, 55), -0.2, 0.2) for _ in range(3))
    kfs = [Keyframe(0.0, p0), Keyframe(1.0, p1, hold_s=0.5), Keyframe(2.0, p2)]
    times, params = interpolate_keyframes(kfs, 10, easing=easing)
    assert len(times) == 21
    # 1.0 .. 1.5 s: exactly the keyframe's values, every frame.
    np.testing.assert_array_equal(params[10:16], np.repeat(np.float32(p1)[None], 6, 0))
    np.testing.assert_array_equal(params[0], np.float32(p0))
    np.testing.assert_array_equal(params[20], np.float32(p2))
    assert not np.array_equal(params[16], params[15]) and not np.array_equal(params[9], params[10])
    # A hold on the last keyframe lengthens the clip.
    times, _ = interpolate_keyframes([Keyframe(0.0, p0), Keyframe(1.0, p1, hold_s=1.0)], 10, easing=easing)
    assert times[-1] == pytest.approx(2.0)
    with pytest.raises(RetargetError, match="holds until 1.5s, past the next keyframe at 1.2s"):
        evaluate_keyframes([Keyframe(1.0, p1, hold_s=0.5), Keyframe(1.2, p2)], [0.0])
