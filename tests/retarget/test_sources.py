"""Expression sources: parsing, cheap checks, and resolution to the same numbers as tracking directly."""

from __future__ import annotations

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.sources import CLIP, NUMBERS, PHOTO, PRESET, TRACK, check_sources, parse_source, resolve_sources

# Pictures are encoded in one batch here and one at a time (or 8 at a time) by `retarget
# track`: fp32 moves with the batch shape by ~2e-5 of a parameter's size (GUIDE.md); the tiny
# random encoder's outputs reach ~200 (seen: 6.5e-5 on values of 10-20), so the tolerance is
# relative to the largest value compared, with 5e-5 as its floor.
BATCH_RTOL = 2e-5


def assert_tracked_equal(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=max(5e-5, BATCH_RTOL * float(np.abs(want).max())))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, astronaut_rgb):
    """A photo with a face, a photo without one, a 1 s 25 fps clip and its track file."""
    from render.storyboard import save_image
    from retarget.samples import write_sample_drive

    d = tmp_path_factory.mktemp("pictures")
    save_image(d / "face.png", astronaut_rgb)
    save_image(d / "blank.png", np.full((128, 128, 3), 90, np.uint8))
    write_sample_drive(d / "clip.mp4", seconds=1.0, fps=25, size=160)
    return d


@pytest.fixture(scope="module")
def layout(tiny_weights):
    from retarget.weights import WeightsLayout

    return WeightsLayout(tiny_weights)


@pytest.fixture(scope="module")
def clip_track(pictures, layout):
    """The clip tracked directly, unsmoothed (raw = params), saved beside it. redetect_every=1: a
    full detection on every frame, as a single picture gets (between detections the tracker
    re-finds the face near its last landmarks, which moves them by a fraction of a pixel)."""
    from tracking.tracker import TrackOptions, track_video

    track = track_video(pictures / "clip.mp4", smirk_path=layout.smirk_ckpt, progress=False,
                        options=TrackOptions(smoothing="none", device="cpu", detect_workers=0, redetect_every=1))
    track.save(pictures / "clip.track.npz")
    return track


def test_parse_every_kind(tmp_path):
    s = parse_source("smile.jpg", where="panel 1", base=tmp_path)
    assert (s.kind, s.path) == (PHOTO, tmp_path / "smile.jpg")
    s = parse_source("clips/a.mp4@1.25", where="panel 2")
    assert (s.kind, s.time_s, s.frame) == (CLIP, 1.25, None)
    assert parse_source("a.mov@2s", where="x").time_s == 2.0
    s = parse_source("a.mp4#40", where="x")
    assert (s.kind, s.frame, s.time_s) == (CLIP, 40, None)
    s = parse_source("drive.track.npz#7", where="x")
    assert (s.kind, s.frame, s.path.name) == (TRACK, 7, "drive.track.npz")
    assert parse_source("drive.track.npz@0.5", where="x").time_s == 0.5
    s = parse_source("jaw_open", where="x")
    assert (s.kind, s.name) == (PRESET, "jaw_open")
    s = parse_source({"jaw": 0.2, "expression": {"3": 1.5}}, where="x")
    assert s.kind == NUMBERS and s.params[52] == np.float32(0.2) and s.params[3] == 1.5
    assert np.count_nonzero(s.params) == 2
    s = parse_source('{"eyelids": 1}', where="x")
    assert s.kind == NUMBERS and (s.params[50:52] == 1).all()
    s = parse_source({"preset": "jaw_open", "eyelids": 1}, where="x")
    assert (s.kind, s.name, s.overrides) == (PRESET, "jaw_open", {"eyelids": 1})
    full = list(np.linspace(-1, 1, 55))
    assert np.array_equal(parse_source({"params": full}).params, np.float32(full))


@pytest.mark.parametrize("spec, message", [
    ("clip.mp4", "which moment"),
    ("drive.track.npz", "which row"),
    ("clip.mp4@soon", "expected seconds"),
    ("clip.mp4#1.5", "expected a frame number"),
    ("face.jpg@1", "a photo has no time"),
    ("what is this?", "not an expression source"),
    ({"jaw": -1}, "jaw opening must be >= 0"),
    ({"smile": 1}, "unknown field"),
    ({"params": [1, 2]}, "55 finite numbers"),
    ({"preset": "jaw_open", "params": [0] * 55}, "not both"),
    ({"preset": "../x"}, "must be a preset name"),
    ("{bad json", "not valid JSON"),
    ("", "empty source"),
])
def test_parse_errors_name_where(spec, message):
    with pytest.raises(RetargetError, match=message) as e:
        parse_source(spec, where="keyframe 2")
    assert str(e.value).startswith("keyframe 2")


def test_every_kind_resolves_to_the_numbers_of_tracking_directly(pictures, layout, clip_track, tmp_path):
    from retarget.presets import PresetLibrary
    from tracking.tracker import TrackOptions, track_video

    direct_photo = track_video(pictures / "face.png", smirk_path=layout.smirk_ckpt,
                               options=TrackOptions(device="cpu"), progress=False).params[0]
    lib = PresetLibrary(tmp_path / "presets")
    lib.add("mine", direct_photo, source="face.png")
    t = float(clip_track.times[13])
    specs = ["face.png", f"clip.mp4@{t + 0.01:.3f}", "clip.mp4#5", "clip.track.npz#5", f"clip.track.npz@{t}",
             "eyes_closed", "mine", {"jaw": 0.2, "expression": {"3": 1.5}}, {"preset": "mine", "eyelids": 0.5}]
    sources = [parse_source(s, where=f"panel {i + 1}", base=pictures) for i, s in enumerate(specs)]
    lines: list[str] = []
    got = resolve_sources(sources, layout=layout, presets=lib, log=lines.append)
    assert got.shape == (9, 55) and got.dtype == np.float32
    np.testing.assert_array_equal(got[8][:50], direct_photo[:50])
    np.testing.assert_array_equal(got[8][50:52], [0.5, 0.5])
    assert_tracked_equal(got[0], direct_photo)
    assert_tracked_equal(got[1], clip_track.raw[13])
    assert_tracked_equal(got[2], clip_track.raw[5])
    np.testing.assert_array_equal(got[3], clip_track.params[5])
    np.testing.assert_array_equal(got[4], clip_track.params[13])
    np.testing.assert_array_equal(got[5][50:52], [1, 1])
    np.testing.assert_array_equal(got[6], direct_photo)
    assert got[7][52] == np.float32(0.2) and got[7][3] == 1.5
    # Different moments give different numbers (the check above could not pass by accident).
    assert np.abs(got[1] - got[2]).max() > 1e-4
    assert [ln.split(":")[0] for ln in lines] == ["panel 1", "panel 2", "panel 3"]
    assert "1 face found" in lines[0]


@pytest.mark.parametrize("spec, message", [
    ("blank.png", "no face found in the photo"),
    ("missing.png", "does not exist"),
    ("clip.mp4@5", "beyond the clip's end"),
    ("clip.mp4#25", "frame 25 is out of range"),
    ("clip.track.npz#99", "frame 99 is out of range"),
    ("clip.track.npz@9", "beyond the track's end"),
    ("no_such_preset", "unknown preset"),
])
def test_bad_sources_fail_naming_the_panel(spec, message, pictures, layout, clip_track, tmp_path):
    from retarget.presets import PresetLibrary

    src = parse_source(spec, where="panel 4", base=pictures)
    with pytest.raises(RetargetError, match=message) as e:
        resolve_sources([src], layout=layout, presets=PresetLibrary(tmp_path))
    assert str(e.value).startswith(f"panel 4: {spec}")


def test_checks_need_no_model(pictures, clip_track, tmp_path, monkeypatch):
    """check_sources opens files only: the SMIRK loader is never called."""
    import tracking.smirk
    from retarget.presets import PresetLibrary

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(tracking.smirk, "load_smirk_encoder", boom)
    ok = [parse_source(s, where="k", base=pictures) for s in ("face.png", "clip.mp4@0.5", "clip.track.npz#3",
                                                                "neutral")]
    check_sources(ok, presets=PresetLibrary(tmp_path))
    with pytest.raises(RetargetError, match="keyframe 9: clip.mp4@3"):
        check_sources([parse_source("clip.mp4@3", where="keyframe 9", base=pictures)])
