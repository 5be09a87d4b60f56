"""`retarget run --start/--end` tracks only the range (plus the smoothing's margin), renders the
parameters a whole-clip track gives there, reports what it tracked, and --resume reuses the
cached track of the work folder when it covers the range (tiny weights, CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from retarget.run import RunOptions, run

START, END, OUT_FPS = 2.02, 2.5, 10.0  # output frames at 2.02, 2.12, ... between driving frames


@pytest.fixture(scope="module")
def inputs(sample_inputs):
    return sample_inputs(4.0)


@pytest.fixture(scope="module")
def whole(inputs, tiny_weights):
    """The whole clip's track (run's default smoothing), to compare the trimmed runs with."""
    from tracking.tracker import track_video

    return track_video(inputs[0], smirk_path=tiny_weights / "smirk/SMIRK_em1.pt", progress=False)


def test_trimmed_run_tracks_the_range_and_resume_reuses_its_track(inputs, tiny_weights, whole, tmp_path):
    from render.video import open_video
    from retarget.motion import nearest_frames, output_times, parse_gain, retarget_params, sample_params
    from retarget.run import _driving_frames
    from tracking.track import Track

    drive, actor = inputs
    out = tmp_path / "cut.mp4"
    opts = RunOptions(steps=1, batch=8, device="cpu", start=START, end=END, fps=OUT_FPS, paste_back=False,
                      keep_work=True)
    logs: list[str] = []
    first = run(drive, actor, out, opts, weights=tiny_weights, log=logs.append)
    assert first.frames == first.rendered == 4
    # Driving frames 50-62 (the range widened by one frame each side for --fps), 6 frames of
    # smoothing margin each side, at most 9 more back to a detection frame (every 10): not 100.
    assert 13 + 12 <= first.tracked <= 13 + 12 + 9
    assert f"{first.tracked} driving frames tracked" in first.line()

    at = output_times(whole.times, start=START, end=END, fps=OUT_FPS, source_fps=whole.fps)
    expected = retarget_params(sample_params(whole.times, whole.params, at), parse_gain(None))
    # Other encoder batch shapes: float32 rounding, 2e-5 of the largest value (see tests/tracking/test_range.py).
    np.testing.assert_allclose(first.params, expected, rtol=0, atol=2e-5 * np.abs(whole.params).max())

    cached = Track.load(tmp_path / ".cut.mp4.work" / "drive.track.npz")
    assert cached.covers(START, END) and not cached.covers(0.0, END) and cached.times[0] == pytest.approx(2.0)
    # The preview's driving frames come from the track's own frames, not the clip's start.
    reader = open_video(drive)
    got = next(_driving_frames(reader, nearest_frames(cached.times, at), start_s=float(cached.times[0])))
    want = next(f.rgb for f in reader if abs(f.time_s - 2.0) < 1e-6)
    np.testing.assert_array_equal(got, want)

    logs.clear()
    again = run(drive, actor, out, dataclasses.replace(opts, resume=True), weights=tiny_weights, log=logs.append)
    assert again.tracked == 0 and again.rendered == 0 and any("resuming with the track" in m for m in logs)
    np.testing.assert_array_equal(again.params, first.params)


def test_bad_ranges_fail_before_tracking(inputs, tiny_weights, tmp_path):
    from render.errors import RetargetError

    drive, actor = inputs
    # (the first is the option check, before any work; the second needs the clip's length)
    for kw, message in ((dict(start=3.0, end=2.0), "--end 2 must be after --start 3"),
                        (dict(start=9.0), "--start 9s is at or after the end of")):
        with pytest.raises(RetargetError, match=message):
            run(drive, actor, tmp_path / "x.mp4", RunOptions(steps=1, device="cpu", **kw), weights=tiny_weights,
                log=lambda *_: None)


def test_relative_neutral_frame_outside_the_range(inputs, tiny_weights, whole, tmp_path):
    """--neutral-frame N names a frame of the driving video; outside --start/--end it is
    tracked alone, with the value the whole clip's track has there."""
    from retarget.motion import output_times, parse_gain, retarget_params, sample_params
    from retarget.run import track_still
    from retarget.weights import WeightsLayout

    drive, actor = inputs
    logs: list[str] = []
    s = run(drive, actor, tmp_path / "rel.mp4", RunOptions(steps=1, batch=8, device="cpu", start=2.0, end=2.2,
                                                           relative=True, neutral_frame=5, paste_back=False),
            weights=tiny_weights, log=logs.append)
    assert "relative mode: driver neutral = frame 5 (0.20s)" in logs
    at = output_times(whole.times, start=2.0, end=2.2, fps=None, source_fps=whole.fps)
    expected = retarget_params(sample_params(whole.times, whole.params, at), parse_gain(None), relative=True,
                               driver_neutral=whole.params[5],
                               actor_neutral=track_still(actor, WeightsLayout(tiny_weights), "cpu"))
    np.testing.assert_allclose(s.params, expected, rtol=0, atol=2e-5 * np.abs(whole.params).max())
