"""retarget.sink_process: the writer stage in a process of its own writes what the same stage
writes in this process; an error there, an error here and a killed writer process each end
clearly, with no output and no temporary file left, and the process gone."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.run import read_image
from retarget.sink_process import SinkProcess
from retarget.video_sink import VideoSink

# A 600 px square of the 512 px astronaut photo around her face, as a 512 px crop: faces of 128 px.
M = np.array([[512 / 300, 0.0, -120 * 512 / 300], [0.0, 512 / 300, -20 * 512 / 300]])


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (128, 128, 3)).astype(np.float32)
    return [np.clip(base + 12 * k, 0, 255).astype(np.uint8) for k in range(7)]  # 7: not a multiple of PASTE_AHEAD


def _spec(tmp: Path, name: str, actor_rgb=None, **kw) -> VideoSink:
    (tmp / f"{name}.frames").mkdir(exist_ok=True)
    return VideoSink(tmp / f"{name}.mp4", 10.0, frames_dir=tmp / f"{name}.frames", actor_rgb=actor_rgb,
                     M=M if actor_rgb is not None else None, crop_size=512, **kw)


def _write(sink, faces, audio_range=None) -> None:
    with sink as write:
        for i, face in enumerate(faces):
            write(i, face)
        if audio_range:
            sink.video.set_audio_range(*audio_range)


def _decoded(path: Path):
    import av

    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].rate
        audio = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    return frames, audio, rate


def _leftovers(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("*") if ".partial-" in p.name]


def _writer_processes() -> list[int]:
    from retarget.sink_process import running

    return running()


def test_the_writer_process_writes_what_this_process_writes(tmp_path, astronaut_rgb, faces, sample_inputs):
    drive, _ = sample_inputs(1.0)
    audio = (drive, None, None)  # the range comes later, as in a job that writes while tracking
    here, there = (_spec(tmp_path, n, astronaut_rgb, audio=audio) for n in ("here", "there"))
    _write(here.open(), faces, audio_range=(0.1, 0.8))
    _write(SinkProcess(there), faces, audio_range=(0.1, 0.8))

    for i in range(len(faces)):  # the pasted frames, lossless: the same code on the same input
        a, b = (read_image(s.frames_dir / f"{i:06d}.png") for s in (here, there))
        np.testing.assert_array_equal(a, b, err_msg=f"frame {i}")
        assert a.shape == astronaut_rgb.shape  # pasted into the photo, not the crop
    (fa, aa, rate), (fb, ab, _) = _decoded(here.out), _decoded(there.out)
    assert fa.shape == fb.shape == (len(faces), 512, 512, 3)
    # libx264 decided a few macroblocks differently across two encodes on CI's CPU (test_video.py):
    # the same input planes, so a bound, not equality; a wrong frame or colour moves every pixel.
    assert np.abs(fa.astype(int) - fb.astype(int)).mean() < 1.0
    np.testing.assert_array_equal(aa, ab)  # the same audio range through the same AAC encoding
    assert abs(aa.shape[1] / rate - 0.7) < 2048 / rate  # the range set through `video`: 0.7 s, to an AAC frame or two
    assert not _leftovers(tmp_path) and not _writer_processes()


def test_an_error_in_the_writer_process_is_raised_here_and_leaves_nothing(tmp_path, faces):
    spec = _spec(tmp_path, "bad")  # crop-only: the faces are the frames
    sink = SinkProcess(spec)
    odd = [faces[0], faces[1], np.zeros((130, 130, 3), np.uint8)] + faces[3:]
    with pytest.raises(RetargetError, match="the first was 128x128"):
        _write(sink, odd)
    assert not spec.out.exists() and not _leftovers(tmp_path) and not _writer_processes()
    assert sink._proc.poll() == 0  # it ended by itself


def test_an_error_in_the_job_drops_the_video_and_ends_the_process(tmp_path, faces):
    spec = _spec(tmp_path, "dropped")
    sink = SinkProcess(spec)
    with pytest.raises(ValueError, match="renderer failed"):
        with sink as write:
            for i, face in enumerate(faces[:4]):
                write(i, face)
            raise ValueError("renderer failed")
    assert not spec.out.exists() and not _leftovers(tmp_path) and not _writer_processes()
    assert sorted(p.name for p in spec.frames_dir.iterdir()) <= [f"{i:06d}.png" for i in range(4)]


def test_a_killed_writer_process_is_one_clear_error_and_leaves_nothing(tmp_path, faces):
    spec = _spec(tmp_path, "killed")
    sink = SinkProcess(spec)
    with pytest.raises(RetargetError, match=r"video writer process ended unexpectedly \(exit code -9\)"):
        with sink as write:
            # x264 holds its first ~40 frames (lookahead): the file appears with the first packets
            i, deadline = 0, time.monotonic() + 60
            while not _leftovers(tmp_path) and time.monotonic() < deadline:
                write(i, faces[i % len(faces)])
                i += 1
                time.sleep(0.02)
            assert _leftovers(tmp_path), "the writer process never opened its temporary file"
            os.kill(sink._proc.pid, signal.SIGKILL)
            sink._proc.wait(30)
            for k in range(len(faces)):
                write(i + k, faces[k])
    assert not spec.out.exists() and not _leftovers(tmp_path) and not _writer_processes()


def test_a_bad_output_fails_in_the_writer_process_before_any_frame(tmp_path, faces):
    spec = VideoSink(tmp_path / "missing" / "out.mp4", 10.0)
    with pytest.raises(RetargetError, match="does not exist"):
        _write(SinkProcess(spec), faces[:2])
    assert not _writer_processes()


def test_the_writer_process_yields_the_cpu_to_the_render_loop(tmp_path, faces):
    """It runs WRITER_NICE steps nicer than the job (x264's threads with it): the render loop's
    thread gets a core first."""
    from retarget import sink_process

    spec = _spec(tmp_path, "nice")
    sink = SinkProcess(spec)
    want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + sink_process.WRITER_NICE)
    with sink as write:
        write(0, faces[0])
        deadline = time.monotonic() + 30
        while os.getpriority(os.PRIO_PROCESS, sink._proc.pid) != want and time.monotonic() < deadline:
            time.sleep(0.02)
        assert os.getpriority(os.PRIO_PROCESS, sink._proc.pid) == want
    assert spec.out.is_file()


def test_the_writer_process_errors_come_back_as_they_were_raised():
    """What the child sends: an OSError keeps its errno (the CLI says "disk full" from it); an
    error that cannot be pickled comes back as one RetargetError naming it."""
    import errno

    from retarget.sink_process import _exception, _picklable

    back = _exception(_picklable(OSError(errno.ENOSPC, "No space left on device", "out.mp4")))
    assert isinstance(back, OSError) and back.errno == errno.ENOSPC and back.filename == "out.mp4"

    class Local(Exception):  # defined here: the parent could not import it by name
        pass

    back = _exception(_picklable(Local("x264 broke")))
    assert isinstance(back, RetargetError) and "Local: x264 broke" in str(back)


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """The writer process is a fresh interpreter, not multiprocessing's spawn (which re-runs the
    caller's main script in the child: an unguarded script's job ran again inside the writer)."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(
        "import numpy as np\n"
        "from retarget.sink_process import SinkProcess\n"
        "from retarget.video_sink import VideoSink\n"
        "print('top level ran', flush=True)\n"
        "with SinkProcess(VideoSink('out.mp4', 10.0)) as write:\n"
        "    for i in range(3):\n"
        "        write(i, np.full((64, 64, 3), 40 * i, np.uint8))\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("top level ran") == 1
    assert (tmp_path / "out.mp4").is_file()
