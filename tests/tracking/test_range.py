"""Tracking a time range alone (tracking.tracker.track_range / TrackOptions.start/end): on a
6 s generated clip (the sample performance: the astronaut moving, the mouth opening and
closing once a second), the tracker decodes and tracks only about the range, and the range's
parameters equal those of tracking the whole clip and cutting it."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tracking import smoothing as sm
from tracking.track import Track
from tracking.tracker import TrackOptions, track_range, track_video

FPS, SECONDS, GOP = 25, 6.0, 25
N = int(SECONDS * FPS)
START, END = 3.0, 4.2  # frames 75-104


@pytest.fixture(scope="module")
def smirk_path(tmp_path_factory) -> Path:
    from retarget.tiny import smirk_state_dict

    path = tmp_path_factory.mktemp("smirk") / "SMIRK_em1.pt"
    torch.save(smirk_state_dict(seed=7), path)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The sample driving performance, H.264 with a keyframe every GOP frames (as cameras and
    most encoders write them), so a seek lands at most GOP frames before the wanted one."""
    from retarget.samples import sample_driving_frames

    path = tmp_path_factory.mktemp("clip") / "long.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width = s.height = 160
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "12", "g": str(GOP)}
        for i, (_, rgb) in enumerate(sample_driving_frames(SECONDS, FPS, 160)):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, FPS)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def whole(clip, smirk_path):
    stats: dict = {}
    track = track_video(clip, smirk_path=smirk_path, progress=False, stats=stats)
    return track, stats


def test_range_tracks_only_about_the_range_with_the_whole_clips_params(clip, smirk_path, whole):
    full, full_stats = whole
    assert full_stats["frames_tracked"] == full_stats["frames_decoded"] == N and full.valid.all()
    stats: dict = {}
    part = track_range(clip, START, END, smirk_path=smirk_path, stats=stats)
    sel = (full.times >= START - 1e-6) & (full.times < END)
    assert len(part) == sel.sum() == 30
    np.testing.assert_array_equal(part.times, full.times[sel])
    np.testing.assert_array_equal(part.valid, full.valid[sel])

    # Seen by the tracker: the range, the smoothing's margin on each side (6 frames at 25 fps)
    # and at most 9 frames back to a detection frame of the whole clip's cadence (every 10).
    before, after = stats["margin_frames"]
    assert (before, after) == sm.margin_frames("zero_phase", FPS) == (6, 6)
    assert len(part) + before + after <= stats["frames_tracked"] <= len(part) + before + after + 9
    # Decoded: those, plus what lies between the keyframe before and the span (< GOP frames).
    assert stats["frames_tracked"] <= stats["frames_decoded"] < stats["frames_tracked"] + GOP
    assert stats["frames_decoded"] < N / 2

    # The encoder sees the same crops in batches of other shapes: float32 convolutions sum in
    # another order (seen: 2e-5 on parameters of order 1 on other CPUs; bit-equal here), so
    # compare within 2e-5 of the largest value; the smoothing itself is exact with its margin.
    tol = 2e-5 * np.abs(full.params).max()
    np.testing.assert_allclose(part.raw, full.raw[sel], rtol=0, atol=tol)
    np.testing.assert_allclose(part.params, full.params[sel], rtol=0, atol=tol)
    # Without the margin the range's ends would differ far beyond that: the margin is needed.
    alone = sm.smooth(full.raw[sel], full.times[sel], "zero_phase", cutoff_hz=sm.ZERO_PHASE_CUTOFF_HZ)
    edge_error = np.abs(alone - full.params[sel]).max(axis=1)
    assert edge_error[0] > 100 * tol and edge_error[-1] > 100 * tol

    # The recorded range: every source frame in [3.0, 4.2) s; the whole clip's reaches the end.
    assert (part.range_start, part.range_end) == (START, pytest.approx(END))
    assert part.covers(START, END) and part.covers(3.5, 4.0)
    assert not part.covers(2.9, 4.0) and not part.covers(3.0, 4.3) and not part.covers(3.0, None)
    assert full.covers(0.0, None) and full.covers(2.0, 5.0) and full.range_end == np.inf


def test_one_moment_of_a_clip(clip, smirk_path, whole):
    """What an expression source `clip.mp4@t` needs: the frame at t, smoothed as in the clip."""
    full, _ = whole
    stats: dict = {}
    t = 2.0
    one = track_range(clip, t, t + 1 / FPS, smirk_path=smirk_path, stats=stats)
    k = int(np.flatnonzero(np.isclose(full.times, t))[0])
    assert len(one) == 1 and one.times[0] == pytest.approx(t)
    np.testing.assert_allclose(one.params[0], full.params[k], rtol=0, atol=2e-5 * np.abs(full.params).max())
    assert stats["frames_tracked"] <= 1 + 12 + 9 and stats["frames_decoded"] < 1 + 12 + 9 + GOP


def test_range_round_trips_and_old_files_still_load(clip, smirk_path, whole, tmp_path):
    full, _ = whole
    part = Track(raw=full.raw[10:20], params=full.params[10:20], valid=full.valid[10:20], times=full.times[10:20],
                 fps=FPS, smoothing=full.smoothing, range_start=0.4, range_end=0.8)
    back = Track.load(part.save(tmp_path / "p.track.npz"))
    assert (back.range_start, back.range_end) == (0.4, 0.8)
    # A file of before the range fields: loads; covers only what lies between its frames.
    with np.load(tmp_path / "p.track.npz") as data:
        old = {k: data[k] for k in data.files if not k.startswith("range_")}
    np.savez(tmp_path / "old.track.npz", **old)
    legacy = Track.load(tmp_path / "old.track.npz")
    assert legacy.range_start is None and legacy.covers(0.4, 0.76) and not legacy.covers(0.4, 0.8)
    assert not legacy.covers(0.4, None)


def test_range_errors(clip, smirk_path):
    from render.errors import RetargetError

    with pytest.raises(RetargetError, match="--end 2s must be after --start 3s"):
        track_range(clip, 3.0, 2.0, smirk_path=smirk_path)
    with pytest.raises(RetargetError, match="--start 7s is at or after the end of"):
        track_range(clip, 7.0, None, smirk_path=smirk_path)
