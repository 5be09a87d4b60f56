"""Nothing lost: an output that is an input is refused with nothing touched; a folder of the
user's is never deleted as a work folder; a short or full disk gives one clear error, keeps
the work folder, and `--resume` then gives the same video as an uninterrupted run."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.cli import main
from retarget.run import RunOptions, run


@pytest.fixture(scope="module")
def inputs(sample_inputs):
    """A 0.4 s sample clip (10 frames at 25 fps, with audio) and the actor photo."""
    return sample_inputs(0.4)


@pytest.fixture(scope="module")
def track_file(inputs, track_of):
    return track_of(inputs[0])


@pytest.fixture
def no_work(monkeypatch):
    """Reading a video, tracking and loading models all raise: a refusal must come first."""
    import render.video
    import tracking.tracker
    from retarget import pipeline

    def forbidden(*a, **kw):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(render.video, "open_video", forbidden)
    monkeypatch.setattr(tracking.tracker, "track_video", forbidden)
    monkeypatch.setattr(pipeline.RetargetPipeline, "from_weights", classmethod(forbidden))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _refused(capsys, argv, *words) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert rc != 0 and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


W = ("--device", "cpu", "--steps", "1")


def test_run_refuses_its_driving_video_as_output(inputs, tiny_weights, tmp_path, capsys, no_work):
    drive = _copy(inputs[0], tmp_path / "clip.mp4")
    before = _digest(drive)
    _refused(capsys, ["run", drive, inputs[1], "-o", drive, "--weights", tiny_weights, *W],
             "-o", "clip.mp4", "is the input")
    # the same file spelled another way
    _refused(capsys, ["run", drive, inputs[1], "-o", tmp_path / "sub" / ".." / "clip.mp4", "--weights", tiny_weights,
                      *W], "is the input")
    assert _digest(drive) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no work folder, no partial file


def test_run_refuses_a_hard_or_symbolic_link_to_an_input(inputs, tiny_weights, tmp_path, capsys, no_work):
    drive = _copy(inputs[0], tmp_path / "clip.mp4")
    before = _digest(drive)
    hard = tmp_path / "out.mp4"
    os.link(drive, hard)
    _refused(capsys, ["run", drive, inputs[1], "-o", hard, "--weights", tiny_weights, *W], "hard link")
    soft = tmp_path / "soft.mp4"
    soft.symlink_to(drive)
    _refused(capsys, ["run", drive, inputs[1], "-o", soft, "--weights", tiny_weights, *W], "symbolic link")
    # the input given through a link, the output by its real name
    _refused(capsys, ["run", soft, inputs[1], "-o", drive, "--weights", tiny_weights, *W], "is the input")
    assert _digest(drive) == before


def test_run_refuses_preview_frames_and_work_that_hit_inputs(inputs, tiny_weights, tmp_path, capsys, no_work):
    drive = _copy(inputs[0], tmp_path / "take.preview.mp4")
    _refused(capsys, ["run", drive, inputs[1], "-o", tmp_path / "take.mp4", "--preview", "side-by-side",
                      "--weights", tiny_weights, *W], "--preview", "is the input")
    frames = tmp_path / "frames"
    actor = _copy(inputs[1], frames / "000003.png")  # the actor photo sits where frame 3 would be kept
    _refused(capsys, ["run", inputs[0], actor, "-o", tmp_path / "o.mp4", "--frames-dir", frames,
                      "--weights", tiny_weights, *W], "--frames-dir", "000003.png")
    _refused(capsys, ["run", inputs[0], actor, "-o", tmp_path / "o.mp4", "--work", frames,
                      "--weights", tiny_weights, *W], "--work")
    assert _digest(actor) == _digest(inputs[1])


def test_work_folder_of_the_users_is_never_deleted(inputs, tiny_weights, tmp_path, capsys, no_work):
    mine = tmp_path / "project"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _refused(capsys, ["run", inputs[0], inputs[1], "-o", tmp_path / "o.mp4", "--work", mine,
                      "--weights", tiny_weights, *W], "--work", "notes.txt", "would delete them")
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["ahead", "frames"])
def test_a_users_folder_with_a_work_folders_name_is_never_emptied(name, inputs, tiny_weights, tmp_path, capsys,
                                                                   no_work):
    """`ahead/` and `frames/` are the work folder's own names; a user's folder of that name in a
    --work folder (not frame PNGs alone) must be refused, not emptied (render-ahead clears ahead/,
    starting over clears frames/)."""
    mine = tmp_path / "project"
    (mine / name).mkdir(parents=True)
    (mine / name / "storyboard.txt").write_text("keep me")
    (mine / name / "000001.png").write_bytes(b"not ours either")
    _refused(capsys, ["run", inputs[0], inputs[1], "-o", tmp_path / "o.mp4", "--work", mine,
                      "--weights", tiny_weights, *W], "--work", name, "would delete them")
    assert (mine / name / "storyboard.txt").read_text() == "keep me"


def test_storyboard_refuses_the_actor_photo_and_its_sources(inputs, tiny_weights, tmp_path, capsys, no_work):
    actor = _copy(inputs[1], tmp_path / "actor.png")
    before = _digest(actor)
    _refused(capsys, ["storyboard", actor, "-o", actor, "--presets", "neutral", "--weights", tiny_weights, *W],
             "-o", "is the input")
    keys = tmp_path / "keys.png"  # a keyframe file with an image's name: still an input
    keys.write_text('[{"time": 0, "preset": "neutral"}]')
    _refused(capsys, ["storyboard", actor, "-o", keys, "--keyframes", keys, "--weights", tiny_weights, *W],
             "is the input")
    assert _digest(actor) == before


def test_track_refuses_outputs_inside_its_input(inputs, tiny_weights, tmp_path, capsys, no_work):
    from render.storyboard import save_image

    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        save_image(folder / f"{i:04d}.png", np.full((32, 32, 3), 40 * i, np.uint8))
    before = _digest(folder / "0001.png")
    _refused(capsys, ["track", folder, "--plot", folder / "0001.png", "--weights", tiny_weights],
             "--plot", "input folder")
    clip = _copy(inputs[0], tmp_path / "c.mp4")
    _refused(capsys, ["track", clip, "--csv", clip, "--weights", tiny_weights], "--csv", "is the input")
    assert _digest(folder / "0001.png") == before


def test_transition_refuses_frames_dir_over_the_actor(inputs, tiny_weights, tmp_path, capsys, no_work):
    actor = _copy(inputs[1], tmp_path / "000000.png")
    _refused(capsys, ["transition", actor, '[{"time": 0, "preset": "neutral"}]', "-o", tmp_path / "t.mp4",
                      "--frames-dir", tmp_path, "--weights", tiny_weights, *W], "--frames-dir", "000000.png")


def test_demo_never_replaces_a_users_files(tmp_path, capsys, no_work):
    (tmp_path / "drive.mp4").write_bytes(b"my own footage")
    _refused(capsys, ["demo", "--out", tmp_path], "drive.mp4", "not written by the demo")
    assert (tmp_path / "drive.mp4").read_bytes() == b"my own footage"


def test_check_not_input_contract(tmp_path):
    from render.files import check_not_input

    a = tmp_path / "a.txt"
    a.write_text("x")
    check_not_input(tmp_path / "b.txt", [a, None])            # another name: fine
    check_not_input(tmp_path / "a.txt.bak", [a])
    with pytest.raises(RetargetError, match=r"^--out .*a\.txt is the input"):
        check_not_input(a, [a], option="--out")
    os.link(a, tmp_path / "h.txt")
    with pytest.raises(RetargetError, match="hard link"):
        check_not_input(tmp_path / "h.txt", [a])
    check_not_input(tmp_path / "new" / "a.txt", [tmp_path])  # a new file beside a folder input is no input


def test_replacing_an_earlier_output_is_allowed_and_said(inputs, track_file, tiny_weights, tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an old render")
    opts = RunOptions(steps=1, batch=8, device="cpu", track=str(track_file), end=0.12)
    summary = run(inputs[0], inputs[1], out, opts, weights=tiny_weights, log=lambda *_: None)
    assert summary.replaced and "(replaced the existing file)" in summary.line()
    assert out.read_bytes() != b"an old render"


def test_short_disk_is_refused_before_tracking(inputs, tiny_weights, tmp_path, monkeypatch, capsys):
    import shutil

    import retarget.diskspace as ds
    import tracking.tracker
    from retarget import pipeline

    def forbidden(*a, **kw):  # the video's header is read (for the frame count), nothing more
        raise AssertionError("tracking or model loading started before the disk check")

    monkeypatch.setattr(tracking.tracker, "track_video", forbidden)
    monkeypatch.setattr(pipeline.RetargetPipeline, "from_weights", classmethod(forbidden))
    monkeypatch.setattr(ds.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 5 << 20))
    line = _refused(capsys, ["run", inputs[0], inputs[1], "-o", tmp_path / "o.mp4", "--weights", tiny_weights, *W],
                    "not enough free disk space", "5.0 MB free")
    assert "--work" in line
    assert not any(tmp_path.iterdir())


def test_disk_space_estimate_adds_up_per_filesystem(tmp_path):
    from retarget.diskspace import estimate_run_bytes

    needs = estimate_run_bytes(100, crop_size=512, out_size=(1920, 1080), work=tmp_path / "w", out=tmp_path / "o.mp4",
                               preview=True, frames_dir=tmp_path / "f")
    assert needs[tmp_path / "w"] >= 100 * 512 * 512 * 3
    assert needs[tmp_path] == int(100 * 1920 * 1080 * 0.5) + int(100 * 3 * 1920 * 1080 * 0.5)
    assert needs[tmp_path / "f"] == 100 * 1920 * 1080 * 3


def test_disk_full_mid_render_then_resume_gives_the_same_video(inputs, track_file, tiny_weights, tmp_path,
                                                               monkeypatch, capsys):
    """ENOSPC injected at the file layer (render.files' open) while the 5th work frame is written."""
    import av

    import render.files as files

    drive, actor = inputs
    common = ["--weights", tiny_weights, "--track", track_file, "--device", "cpu", "--steps", "1", "--batch", "2"]
    full = tmp_path / "full.mp4"
    assert main([str(a) for a in ["run", drive, actor, "-o", full, *common]]) == 0

    out = tmp_path / "out.mp4"
    real_open = open
    state = {"frames": 0}

    class _FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])  # part of the file reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device", self.f.name)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def filling_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if Path(path).name.startswith(".0") and Path(path).suffix == ".png":
            state["frames"] += 1
            if state["frames"] == 5:  # frame 4 or 5: a batch's two PNGs are saved at once
                state["failed"] = int(re.search(r"\d{6}", Path(path).name).group())
                return _FullDisk(f)
        return f

    monkeypatch.setattr(files, "open", filling_open, raising=False)
    line = _refused(capsys, ["run", drive, actor, "-o", out, *common], "disk full while writing", "--resume")
    assert f"{state['failed']:06d}.png" in line and state["failed"] in (4, 5)
    assert not out.exists()
    work = tmp_path / ".out.mp4.work"
    assert (work / "manifest.json").is_file()
    kept = sorted(p.name for p in (work / "frames").iterdir())
    # whole frames only, no partial file: 0-3, and the failed frame's batch-mate if it was saved
    assert kept in ([f"{i:06d}.png" for i in range(4)],
                    [f"{i:06d}.png" for i in (0, 1, 2, 3, 9 - state["failed"])]), kept
    assert "Traceback" not in line

    monkeypatch.setattr(files, "open", real_open, raising=False)
    assert main([str(a) for a in ["run", drive, actor, "-o", out, *common, "--resume"]]) == 0
    assert "resuming: 4 of 10 frames already rendered" in capsys.readouterr().out

    def frames(p):
        with av.open(str(p)) as c:
            return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]

    a, b = frames(full), frames(out)
    assert len(a) == len(b) == 10
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # same batch shapes on both runs: exact by design


def test_more_bad_inputs_fail_before_any_model_loads(inputs, track_file, tiny_weights, tmp_path, monkeypatch, capsys):
    """Input errors found before loading a model: each one `error:` line, exit 1, nothing written."""
    from retarget import pipeline

    def forbidden(*a, **kw):
        raise AssertionError("models loaded before the inputs were checked")

    monkeypatch.setattr(pipeline.RetargetPipeline, "from_weights", classmethod(forbidden))
    drive, actor = inputs
    keys = tmp_path / "keys.json"
    keys.write_text('[{"time": 0, "preset": "neutral"}]')
    w = ["--weights", tiny_weights, *W]
    cases = [
        (["run", drive, actor, "-o", tmp_path / "out.avi", *w], "output", "use a .mp4, .mov or .mkv name"),
        (["run", drive, actor, "-o", tmp_path / "o.mp4", "--track", track_file, "--start", "5", *w],
         "empty time range: start 5.000s"),
        (["run", drive, actor, "-o", tmp_path / "o.mp4", "--track", keys, *w], "keys.json is not a track file"),
        (["storyboard", actor, "-o", tmp_path / "s.png", "--presets", "grin", *w], "--presets: unknown preset 'grin'"),
        (["storyboard", actor, "-o", tmp_path / "s.gif", "--presets", "neutral", *w], "use a .png or .jpg name"),
        (["transition", actor, '[{"time": -1}]', "-o", tmp_path / "t.mp4", *w], "time must be a number of seconds >= 0, got -1"),
        (["run", drive, actor, "-o", tmp_path / "o.mp4", "--weights", tmp_path / "empty", *W],
         "missing", "arc2face", "FoivosPar/Arc2Face", "licence"),
    ]
    for argv, *words in cases:
        _refused(capsys, argv, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]
