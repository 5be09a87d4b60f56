"""Transitions from pictures on tiny weights: keys from any source, holds, the track file beside the video."""

from __future__ import annotations

import json

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, astronaut_rgb):
    from render.storyboard import save_image
    from retarget.samples import sample_actor, write_sample_drive

    d = tmp_path_factory.mktemp("keys")
    save_image(d / "actor.png", sample_actor())
    save_image(d / "face.png", astronaut_rgb)
    save_image(d / "blank.png", np.full((96, 96, 3), 30, np.uint8))
    write_sample_drive(d / "clip.mp4", seconds=1.0, fps=25, size=160)
    return d


KEYS = """
- {time: 0, source: face.png, hold: 0.4}
- {time: 1.0, source: clip.mp4@0.5, eyelids: 1}
- {time: 1.6, preset: jaw_open}
"""


def test_transition_from_pictures_writes_video_and_track(inputs, tiny_weights, tmp_path, capsys):
    from render.video import open_video
    from retarget.sources import parse_source, resolve_sources
    from retarget.weights import WeightsLayout
    from tracking.track import Track

    keys = inputs / "keys.yaml"
    keys.write_text(KEYS)
    out = tmp_path / "smile.mp4"
    assert main(["transition", str(inputs / "actor.png"), str(keys), "-o", str(out), "--fps", "5",
                 "--steps", "2", "--device", "cpu", "--weights", str(tiny_weights)]) == 0
    printed = capsys.readouterr().out
    assert "keys.yaml: 3 keyframes, 0-1.6 s (1 with a hold)" in printed
    assert "keys.yaml: keyframe 1: face.png: 1 face found" in printed
    reader = open_video(out)
    assert reader.frame_count == 9
    track = Track.load(tmp_path / "smile.track.npz")
    assert len(track) == 9 and track.valid.all() and track.backend == "keyframes" and track.fps == 5
    np.testing.assert_allclose(track.times, np.arange(9) / 5, atol=1e-12)
    layout = WeightsLayout(tiny_weights)
    want = resolve_sources([parse_source(s, base=inputs) for s in ("face.png", "clip.mp4@0.5", "jaw_open")],
                           layout=layout)
    want[1, 50:52] = 1.0
    # Exact at every key and flat through the 0.4 s hold (frames 0, 1, 2 = 0, 0.2, 0.4 s).
    np.testing.assert_array_equal(track.params[[0, 1, 2]], np.repeat(want[:1], 3, 0))
    np.testing.assert_array_equal(track.params[5], want[1])
    np.testing.assert_array_equal(track.params[8], want[2])
    assert not np.array_equal(track.params[3], want[0])


@pytest.mark.parametrize("keys, message", [
    ('[{"time": 0, "source": "blank.png"}]', "keyframe 1: blank.png: no face found in the photo"),
    ('[{"time": 0}, {"time": 1, "source": "clip.mp4@4"}]', "keyframe 2: clip.mp4@4: time 4 s is beyond the clip"),
    ('[{"time": 0, "source": "clip.mp4#300"}]', "keyframe 1: clip.mp4#300: frame 300 is out of range"),
    ('[{"time": 0, "preset": "nobody_made_this"}]', "keyframe 1: nobody_made_this: unknown preset"),
    ('[{"time": 0, "hold": 1}, {"time": 0.5}]', "keyframe 2: time 0.5s is not after keyframe 1 (0s + its hold 1s)"),
    ('[{"time": 0, "source": "a.jpg", "preset": "neutral"}]', "keyframe 1: give \"source\" or \"preset\""),
    ('[{"time": 0, "jaw": -1}]', "keyframe 1: jaw opening must be >= 0"),
    ('[{"time": 0, "smile": 1}]', "keyframe 1: unknown field(s) smile"),
    ('[{"time": 0,, }]', "not valid JSON/YAML at line 1"),
])
def test_bad_keys_fail_in_one_line_before_the_pipeline_loads(keys, message, inputs, tiny_weights, tmp_path, capsys,
                                                              monkeypatch):
    from retarget.pipeline import RetargetPipeline

    def never(*a, **k):
        raise AssertionError("the pipeline was constructed")

    monkeypatch.setattr(RetargetPipeline, "from_weights", never)
    monkeypatch.setenv("RETARGET_PRESETS", str(tmp_path / "presets"))
    path = inputs / "bad.json"
    path.write_text(keys)
    assert main(["transition", str(inputs / "actor.png"), str(path), "-o", str(tmp_path / "x.mp4"),
                 "--weights", str(tiny_weights)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.track.npz").exists()


def test_old_keyframe_files_parse_to_the_same_numbers():
    from retarget.transitions import parse_keys, resolve_keys
    from tracking.keyframes import parse_keyframes

    spec = [{"time": 0.0, "preset": "neutral"}, {"time": 1.0, "jaw": 0.3, "expression": {"3": 1.5}},
            {"time": 2.0, "preset": "eyes_closed", "eyelids": [0.2, 0.4]}]
    old = parse_keyframes(json.dumps(spec))
    new = resolve_keys(parse_keys(spec))
    for a, b in zip(old, new):
        assert a.time_s == b.time_s
        np.testing.assert_array_equal(a.params, b.params)
    with pytest.raises(RetargetError, match="non-empty list"):
        parse_keys([])
