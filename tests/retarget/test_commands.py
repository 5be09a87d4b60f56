"""CLI subcommands on tiny weights: track, storyboard, transition (outputs and clean failures)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retarget.cli import main


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    from retarget.samples import write_sample_drive

    return write_sample_drive(tmp_path_factory.mktemp("d") / "drive.mp4", seconds=1.0, fps=25, size=160)


@pytest.fixture(scope="module")
def actor(tmp_path_factory):
    from render.storyboard import save_image
    from retarget.samples import sample_actor

    path = tmp_path_factory.mktemp("a") / "actor.png"
    save_image(path, sample_actor())
    return path


def test_track_writes_track_plot_and_csv(drive, tiny_weights, tmp_path, capsys):
    from tracking.track import Track

    out = tmp_path / "d.track.npz"
    assert main(["track", str(drive), "-o", str(out), "--plot", "--csv", "--weights", str(tiny_weights)]) == 0
    track = Track.load(out)
    assert track.params.shape == (25, 55) and track.valid.all()
    assert out.with_suffix(".png").stat().st_size > 1000
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert len(rows) == 26 and rows[0].startswith("time,frame,valid,exp_0")
    assert "face in 25/25" in capsys.readouterr().out


def test_track_single_image(actor, tiny_weights, tmp_path):
    from tracking.track import Track

    out = tmp_path / "actor.track.npz"
    assert main(["track", str(actor), "-o", str(out), "--weights", str(tiny_weights)]) == 0
    assert Track.load(out).params.shape == (1, 55)


def test_track_corrupt_video_fails_cleanly(tiny_weights, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    out = tmp_path / "broken.track.npz"
    assert main(["track", str(bad), "-o", str(out), "--weights", str(tiny_weights)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.mp4" in err[0]
    assert not out.exists()


def test_storyboard_from_presets(actor, tiny_weights, tmp_path):
    from retarget.run import read_image

    out = tmp_path / "sheet.png"
    assert main(["storyboard", str(actor), "-o", str(out), "--presets", "neutral,jaw_open,eyes_closed",
                 "--columns", "3", "--cell", "128", "--steps", "2", "--device", "cpu",
                 "--weights", str(tiny_weights)]) == 0
    sheet = read_image(out)
    assert sheet.shape[1] > 3 * 128 and sheet.shape[0] > 128
    cells = [sheet[:, i * sheet.shape[1] // 3:(i + 1) * sheet.shape[1] // 3] for i in range(3)]
    assert not np.array_equal(cells[0], cells[1])  # different expressions, different faces


def test_storyboard_needs_something_to_draw(actor, tiny_weights, tmp_path, capsys):
    assert main(["storyboard", str(actor), "-o", str(tmp_path / "s.png"), "--weights", str(tiny_weights)]) != 0
    assert "nothing to draw" in capsys.readouterr().err


def test_transition_video(actor, tiny_weights, tmp_path):
    import av

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"time": 0, "preset": "neutral"}, {"time": 0.4, "jaw": 0.3},
                                {"time": 0.8, "eyelids": 1.0}]))
    out = tmp_path / "t.mp4"
    assert main(["transition", str(actor), str(keys), "-o", str(out), "--fps", "10", "--steps", "2",
                 "--device", "cpu", "--crop-only", "--weights", str(tiny_weights)]) == 0
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
        assert float(c.streams.video[0].average_rate) == pytest.approx(10)
    assert len(frames) == 9  # 0.0 .. 0.8 s at 10 fps
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
