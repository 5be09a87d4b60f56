"""End to end on tiny weights (CPU): `retarget run` output, audio, resume, relative mode, bad inputs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.run import RunOptions, run

REPO = Path(__file__).resolve().parents[2]
SECONDS, FPS = 2.0, 25.0


@pytest.fixture(scope="module")
def inputs(sample_inputs):
    """The sample driving clip (2 s, 25 fps, AAC audio) and the actor photo."""
    return sample_inputs(SECONDS, fps=FPS)


@pytest.fixture(scope="module")
def track_file(inputs, track_of):
    return track_of(inputs[0])


def _opts(track_file, **kw) -> RunOptions:
    base = dict(steps=2, batch=8, device="cpu", track=str(track_file))
    base.update(kw)
    return RunOptions(**base)


def _read_video(path: Path):
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
        a = c.streams.audio[0] if c.streams.audio else None
        info = dict(rate=float(v.average_rate), duration=float(c.duration) / 1e6 if c.duration else 0.0,
                    audio=None if a is None else dict(codec=a.codec_context.name,
                                                      duration=float(a.duration * a.time_base) if a.duration else None))
    return frames, info


def test_output_matches_driving_clip(inputs, track_file, tiny_weights, tmp_path):
    drive, actor = inputs
    out = tmp_path / "out.mp4"
    summary = run(drive, actor, out, _opts(track_file, preview="side-by-side"), weights=tiny_weights, log=lambda *_: None)
    frames, info = _read_video(out)
    assert len(frames) == round(SECONDS * FPS) == summary.frames
    assert info["rate"] == pytest.approx(FPS)
    assert info["duration"] == pytest.approx(SECONDS, abs=0.1)
    assert info["audio"] is not None and info["audio"]["codec"] == "aac"
    assert frames[0].shape[:2] == (512, 512)  # pasted back into the 512x512 actor photo
    assert summary.preview and summary.preview.is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp or work files left


def test_paste_back_keeps_background(inputs, track_file, tiny_weights, tmp_path):
    from retarget.run import read_image

    drive, actor = inputs
    out = tmp_path / "out.mp4"
    run(drive, actor, out, _opts(track_file, end=0.2, frames_dir=str(tmp_path / "frames")),
        weights=tiny_weights, log=lambda *_: None)
    frame = read_image(tmp_path / "frames" / "000000.png")
    photo = read_image(actor)
    # Corners are far from the face: bit-identical to the photo (PNG frames, no video codec).
    for sl in (np.s_[:40, :40], np.s_[-40:, -40:], np.s_[-40:, :40]):
        np.testing.assert_array_equal(frame[sl], photo[sl])
    assert np.abs(frame.astype(int) - photo.astype(int)).max() > 30  # and the face did change


def test_time_range_and_fps(inputs, track_file, tiny_weights, tmp_path):
    drive, actor = inputs
    out = tmp_path / "cut.mp4"
    run(drive, actor, out, _opts(track_file, start=0.4, end=1.4, fps=10, paste_back=False),
        weights=tiny_weights, log=lambda *_: None)
    frames, info = _read_video(out)
    assert len(frames) == 10 and info["rate"] == pytest.approx(10)
    assert info["audio"] is not None and info["audio"]["duration"] == pytest.approx(1.0, abs=0.1)


def test_relative_with_equal_neutrals_matches_absolute(inputs, tiny_weights, tmp_path):
    """The actor photo is driving frame k, and k is the driver's neutral: relative == absolute."""
    from render.storyboard import save_image
    from render.video import open_video
    from tracking.tracker import TrackOptions, track_video

    drive, _ = inputs
    k = 7
    frame = next(f for f in open_video(drive) if f.index == k)
    actor = tmp_path / "frame7.png"
    save_image(actor, frame.rgb)
    # Unsmoothed, and full detection on every frame as for a photo (between detections the
    # tracker finds the face in a window, which moves landmarks by a fraction of a pixel and
    # the random tiny encoder amplifies that), so frame k's vector is the photo's own.
    raw_track = tmp_path / "raw.track.npz"
    track_video(drive, smirk_path=tiny_weights / "smirk/SMIRK_em1.pt",
                options=TrackOptions(smoothing="none", redetect_every=1), progress=False).save(raw_track)
    common = dict(end=0.6, paste_back=False)
    a = run(drive, actor, tmp_path / "abs.mp4", _opts(raw_track, **common), weights=tiny_weights, log=lambda *_: None)
    b = run(drive, actor, tmp_path / "rel.mp4", _opts(raw_track, relative=True, neutral_frame=k, **common),
            weights=tiny_weights, log=lambda *_: None)
    # The photo's vector comes from a batch of 1, frame k's from a batch of 8: float32 convolutions
    # of another batch shape round differently (~3e-6 relative seen, on values up to ~190 from the
    # random tiny encoder), so the tolerance is relative, with an absolute floor for values near 0.
    np.testing.assert_allclose(b.params, a.params, rtol=2e-5, atol=1e-4)
    assert np.abs(a.params).max() > 0.01  # not trivially zero


def test_resume_after_kill_gives_identical_video(inputs, track_file, tiny_weights, tmp_path, kill_pipeline):
    drive, actor = inputs
    full = tmp_path / "full.mp4"
    run(drive, actor, full, _opts(track_file, end=1.0), weights=tiny_weights, log=lambda *_: None)

    out = tmp_path / "resumed.mp4"
    kill_pipeline(3)
    with pytest.raises(kill_pipeline.Killed):
        run(drive, actor, out, _opts(track_file, end=1.0), weights=tiny_weights, log=lambda *_: None)
    assert not out.exists()
    work = tmp_path / f".{out.name}.work" / "frames"
    assert len(list(work.glob("*.png"))) == 16  # two batches of 8 survived the kill
    kill_pipeline.revive()
    summary = run(drive, actor, out, _opts(track_file, end=1.0, resume=True), weights=tiny_weights,
                  log=lambda *_: None)
    assert summary.rendered == 25 - 16
    a, _ = _read_video(full)
    b, _ = _read_video(out)
    assert len(a) == len(b) == 25
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_resume_refuses_other_settings(inputs, track_file, tiny_weights, tmp_path):
    drive, actor = inputs
    out = tmp_path / "o.mp4"
    run(drive, actor, out, _opts(track_file, end=0.2, keep_work=True), weights=tiny_weights, log=lambda *_: None)
    with pytest.raises(RetargetError, match="other settings"):
        run(drive, actor, out, _opts(track_file, end=0.2, seed=5, resume=True), weights=tiny_weights,
            log=lambda *_: None)


# --------------------------------------------------------------------------- bad inputs via the CLI

def _cli(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("RETARGET_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "retarget.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def _assert_clean_failure(r: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_bad_inputs_fail_cleanly(inputs, track_file, tiny_weights, tmp_path):
    drive, actor = inputs
    out = tmp_path / "out.mp4"
    w = ["--weights", tiny_weights, "--steps", "1", "--device", "cpu"]
    _assert_clean_failure(_cli("run", tmp_path / "nope.mp4", actor, "-o", out, *w), out, "nope.mp4")
    _assert_clean_failure(_cli("run", drive, tmp_path / "nope.jpg", "-o", out, *w), out, "nope.jpg")
    not_image = tmp_path / "actor.jpg"
    not_image.write_text("this is not a JPEG")
    _assert_clean_failure(_cli("run", drive, not_image, "-o", out, *w), out, "actor.jpg")
    audio_only = tmp_path / "tone.wav"
    from retarget.samples import write_tone

    write_tone(audio_only, 1.0)
    _assert_clean_failure(_cli("run", audio_only, actor, "-o", out, *w), out, "tone.wav")
    blank = tmp_path / "blank.png"
    from render.storyboard import save_image

    save_image(blank, np.full((256, 256, 3), 128, np.uint8))
    _assert_clean_failure(_cli("run", drive, blank, "-o", out, "--track", track_file, *w), out, "face")
    folder_is_file = tmp_path / "file"
    folder_is_file.write_text("x")
    _assert_clean_failure(_cli("run", drive, actor, "-o", folder_is_file / "out.mp4", *w),
                          folder_is_file / "out.mp4", "not writable")


def test_unwritable_output_folder(inputs, tiny_weights, tmp_path):
    drive, actor = inputs
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out.mp4"  # its folder is a file: cannot be created, whoever we are
    with pytest.raises(RetargetError, match="not writable"):
        run(drive, actor, out, RunOptions(device="cpu"), weights=tiny_weights, log=lambda *_: None)


@pytest.mark.parametrize("in_process", [False, True], ids=["writer-threads", "writer-process"])
def test_disk_full_leaves_no_output(inputs, track_file, tiny_weights, tmp_path, monkeypatch, in_process):
    """The disk fills at frame 3: in the encoder (writer threads), or as the writer process's error
    arrives (retarget.sink_process re-raises the child's OSError; test_sink_process checks it comes
    back with its errno)."""
    import render.video as video
    import retarget.run as run_mod
    from retarget.sink_process import SinkProcess

    drive, actor = inputs
    out = tmp_path / "out.mp4"
    monkeypatch.setattr(run_mod, "WRITER_PROCESS", in_process)
    cls = SinkProcess if in_process else video.VideoWriter
    real_write, count = cls.write, [0]

    def full_disk(self, *a, **kw):
        count[0] += 1
        if count[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device", "out.mp4")
        return real_write(self, *a, **kw)

    monkeypatch.setattr(cls, "write", full_disk)
    with pytest.raises(OSError):
        run(drive, actor, out, _opts(track_file, end=0.4), weights=tiny_weights, log=lambda *_: None)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    from retarget.cli import _describe_unexpected

    assert "disk full" in _describe_unexpected(OSError(errno.ENOSPC, "No space left on device", "x"))
