"""Rendering ahead while the driving clip is tracked (retarget.ahead): the margin that says a frame's
params are final is right (prefix vs whole clip, bit for bit), and a run that rendered frames ahead
writes the frames of a run that did not, also when the margin is made wrong on purpose."""

from __future__ import annotations

import re
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from retarget.run import RunOptions, run


# --------------------------------------------------------------------------- the margin, on numbers


def _rows(n: int, seed: int, gaps: list[tuple[int, int]]):
    rng = np.random.default_rng(seed)
    times = np.arange(n) / 25.0
    rows = np.cumsum(rng.standard_normal((n, 55)) * 0.1, axis=0).astype(np.float32)
    valid = np.ones(n, bool)
    for a, b in gaps:
        valid[a:b] = False
    rows[~valid] = np.nan
    return times, rows, valid


@pytest.mark.parametrize("kw", [dict(), dict(smooth="one_euro"), dict(smooth="none"), dict(fps=30.0),
                                dict(start=0.5, end=2.9), dict(fps=12.5, start=0.33)],
                         ids=["zero_phase", "one_euro", "none", "fps30", "start-end", "fps12.5-start"])
def test_frames_called_final_get_the_whole_clips_params_bit_for_bit(kw):
    from retarget.motion import parse_gain
    from retarget.run import _rows_to_params

    opts = RunOptions(device="cpu", **kw)
    params_of = _rows_to_params(opts, types.SimpleNamespace(fps=25.0), parse_gain(None))
    times, rows, valid = _rows(90, seed=3, gaps=[(20, 27), (51, 53)])
    whole, n_whole = params_of(times, rows, valid)
    checked = 0
    for upto in range(1, len(times)):
        # All frames, and windows of 8 frames (only the rows around them are smoothed) from several starts.
        for first, count in [(0, None), (0, 8), (5, 8), (17, 8), (30, 8), (41, 12)]:
            got = params_of(times[:upto], rows[:upto], valid[:upto], first=first, count=count)
            if got is None:
                continue
            params, final = got
            assert final <= len(params) <= len(whole) and (count is None or final <= first + count)
            # Final rows must not move when the rest of the clip is tracked: exactly equal.
            np.testing.assert_array_equal(params[first:final], whole[first:final],
                                          err_msg=f"prefix of {upto} rows, frames {first}+{count}")
            checked += max(0, final - first)
    assert checked > 500
    # Without the margin, the last rows of a prefix do move (so the test above can fail).
    params, _ = params_of(times[:40], rows[:40], valid[:40])
    if opts.smooth == "zero_phase" and opts.fps is None:  # one_euro is causal: its last row is final
        assert not np.array_equal(params[-1], whole[len(params) - 1])


def test_nothing_is_final_before_a_face_or_in_relative_mode():
    from retarget.ahead import final_frames
    from retarget.run import _rows_to_params

    times, rows, valid = _rows(30, seed=1, gaps=[(0, 30)])
    assert final_frames(times, times, valid, 6) == 0
    times, rows, valid = _rows(30, seed=1, gaps=[])
    assert final_frames(times, times, valid, 6) == 30 - 6 - 2
    assert _rows_to_params(RunOptions(relative=True), types.SimpleNamespace(fps=25.0), {})(times, rows, valid) is None


# --------------------------------------------------------------------------- whole runs

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def inputs(sample_inputs):
    return sample_inputs(1.2)  # 30 frames: the tracker reports rows 8 at a time on the CPU


def _opts(tmp_path, name, **kw) -> RunOptions:
    return RunOptions(**{**dict(steps=2, batch=4, device="cpu", keep_work=True, paste_back=False), **kw})


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    from retarget.run import read_image

    return {p.name: read_image(p) for p in sorted(Path(folder).glob("*.png"))}


def _work(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


@pytest.fixture(scope="module")
def after_run(inputs, tiny_weights, tmp_path_factory) -> Path:
    """out.mp4 of a run that renders only once the clip is tracked (RENDER_AHEAD off), its work kept."""
    import retarget.run as rr

    out = tmp_path_factory.mktemp("after") / "out.mp4"
    saved, rr.RENDER_AHEAD = rr.RENDER_AHEAD, False
    try:
        s = run(*inputs, out, _opts(out.parent, "after"), weights=tiny_weights, **QUIET)
    finally:
        rr.RENDER_AHEAD = saved
    assert s.frames == 30
    return out


@pytest.fixture(scope="module")
def after_tracking(after_run):
    """The frames of that run."""
    return _pngs(_work(after_run) / "frames")


def _decoded(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(frames (N, H, W, 3) uint8, audio samples (channels, S) float32) of a written video, decoded."""
    import av

    from render.video import open_video

    frames = np.stack([f.rgb for f in open_video(path)])
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    return frames, audio


def _gate(monkeypatch, frames_first: int):
    """Hold the tracker (in its observe call, once it has passed 16 rows) until `frames_first`
    frames rendered ahead are saved: then frames surely render while tracking, whatever the speed."""
    import retarget.ahead as ra
    import retarget.run as rr

    saved, enough = [0], threading.Event()
    save, observe = rr._save_png, ra.RenderAhead.observe

    def counting_save(path, rgb):
        save(path, rgb)
        saved[0] += 1
        if saved[0] >= frames_first:
            enough.set()

    def gated(self, times, rows, valid):
        observe(self, times, rows, valid)
        if len(times) >= 16:
            for _ in range(1200):  # 120 s at most; a failed job cancels the wait
                if enough.wait(0.1) or self._cancelled:
                    return
            raise AssertionError("nothing was rendered ahead while the tracker waited")

    monkeypatch.setattr(rr, "_save_png", counting_save)
    monkeypatch.setattr(ra.RenderAhead, "observe", gated)
    monkeypatch.setattr("tracking.tracker._auto_workers", lambda *_: 0)  # the tracker in this process


def test_frames_rendered_while_tracking_are_the_frames_rendered_after(inputs, tiny_weights, tmp_path, monkeypatch,
                                                                      after_tracking):
    _gate(monkeypatch, frames_first=4)
    lines = []
    out = tmp_path / "out.mp4"
    s = run(*inputs, out, _opts(tmp_path, "ahead"), weights=tiny_weights, log=lines.append)
    said = [l for l in lines if "while tracking (" in l]
    assert len(said) == 1, lines
    rendered, kept = map(int, re.search(r"rendered (\d+) frames while tracking .*kept (\d+)", said[0]).groups())
    assert rendered >= 4 and kept == rendered  # the real margin: nothing had to be redone
    assert s.rendered == 30 and not any("resuming" in l for l in lines)
    frames = _pngs(_work(out) / "frames")
    assert sorted(frames) == sorted(after_tracking)
    for k in frames:
        np.testing.assert_array_equal(frames[k], after_tracking[k], err_msg=k)  # same batches: exact by design
    assert not (_work(out) / "ahead").exists()


def _run_with_a_wrong_margin(inputs, tiny_weights, tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """(out.mp4, log lines) of a run whose margin is wrong: every frame tracked so far is called
    final, so the last ones get params that the rows still to come change."""
    import retarget.ahead as ra

    monkeypatch.setattr(ra, "final_frames", lambda at, times, valid, reach: len(at))
    _gate(monkeypatch, frames_first=16)
    lines = []
    out = tmp_path / "out.mp4"
    run(*inputs, out, _opts(tmp_path, "wrong"), weights=tiny_weights, log=lines.append)
    return out, lines


def test_frames_rendered_with_params_that_changed_are_rendered_again(inputs, tiny_weights, tmp_path, monkeypatch,
                                                                     after_tracking):
    out, lines = _run_with_a_wrong_margin(inputs, tiny_weights, tmp_path, monkeypatch)
    said = [l for l in lines if "while tracking (" in l][0]
    rendered, kept = map(int, re.search(r"rendered (\d+) frames while tracking .*kept (\d+)", said).groups())
    assert rendered >= 16 and kept < rendered and "to render again" in said
    frames = _pngs(_work(out) / "frames")
    assert sorted(frames) == sorted(after_tracking)
    for k in frames:
        np.testing.assert_array_equal(frames[k], after_tracking[k], err_msg=k)


def test_a_failure_while_tracking_stops_the_tracker_and_leaves_no_frames_ahead(inputs, tiny_weights, tmp_path,
                                                                               monkeypatch):
    import retarget.run as rr
    from render.errors import RetargetError
    from render.storyboard import save_image

    blank = tmp_path / "blank.png"
    save_image(blank, np.full((256, 256, 3), 128, np.uint8))  # no face: preparing the actor fails
    seen = []
    observe = rr.RenderAhead.observe

    def watch(self, times, rows, valid):
        seen.append(len(times))
        observe(self, times, rows, valid)

    monkeypatch.setattr(rr.RenderAhead, "observe", watch)
    monkeypatch.setattr("tracking.tracker._auto_workers", lambda *_: 0)
    out = tmp_path / "out.mp4"
    with pytest.raises(RetargetError, match="face"):
        run(inputs[0], blank, out, _opts(tmp_path, "fail"), weights=tiny_weights, **QUIET)
    assert not out.exists() and not (_work(out) / "ahead").exists()
    assert not [t for t in threading.enumerate() if t.name == "retarget-track" and t.is_alive()]


# --------------------------------------------------------------------------- the video written while tracking


def _written_early(lines: list[str]) -> int:
    said = [l for l in lines if "while tracking (" in l]
    assert len(said) == 1, lines
    m = re.search(r"; (\d+) written to the video", said[0])
    return int(m.group(1)) if m else 0


def _same_video(got: Path, want: Path) -> None:
    (fg, ag), (fw, aw) = _decoded(got), _decoded(want)
    assert fg.shape == fw.shape and fg.shape[0] == 30
    np.testing.assert_array_equal(fg, fw)  # the same frames through the same encoder: the same decoded pixels
    np.testing.assert_array_equal(ag, aw)  # the same audio range through the same AAC encoding


def test_the_video_written_while_tracking_is_the_video_written_after(inputs, tiny_weights, tmp_path, monkeypatch,
                                                                     after_run):
    _gate(monkeypatch, frames_first=8)
    lines = []
    out = tmp_path / "out.mp4"
    run(*inputs, out, _opts(tmp_path, "early"), weights=tiny_weights, log=lines.append)
    assert _written_early(lines) >= 1, lines  # the video did start while the clip was being tracked
    _same_video(out, after_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.mp4.work", "out.mp4"]  # no temporary file left


def test_a_video_written_with_params_that_changed_is_written_again(inputs, tiny_weights, tmp_path, monkeypatch,
                                                                    after_run):
    # The first batches' params change once more rows come: the frames written from them must not
    # stay in the video.
    out, lines = _run_with_a_wrong_margin(inputs, tiny_weights, tmp_path, monkeypatch)
    again = [l for l in lines if "written to the video while tracking are written again" in l]
    assert len(again) == 1 and "params changed" in again[0], lines
    assert _written_early(lines) == 0
    _same_video(out, after_run)


WRITERS = [pytest.param(False, id="writer-threads"), pytest.param(True, id="writer-process")]


def _writer_class(monkeypatch, in_process: bool):
    """The class whose `write` takes each frame of the video in this process: the encoder's
    (writer threads) or the one that hands it to the writer process."""
    import retarget.run as run_mod
    from render.video import VideoWriter
    from retarget.sink_process import SinkProcess

    monkeypatch.setattr(run_mod, "WRITER_PROCESS", in_process)
    return SinkProcess if in_process else VideoWriter


@pytest.mark.parametrize("in_process", WRITERS)
def test_a_failure_after_the_video_started_leaves_no_video(inputs, tiny_weights, tmp_path, monkeypatch, in_process):
    from retarget.sink_process import running

    import retarget.ahead as ra

    writer_cls = _writer_class(monkeypatch, in_process)
    wrote = threading.Event()
    write, observe = writer_cls.write, ra.RenderAhead.observe

    def counting_write(self, *frame):
        write(self, *frame)
        wrote.set()

    def failing(self, times, rows, valid):
        observe(self, times, rows, valid)
        if len(times) >= 16:  # the tracker breaks once the early video has a frame
            assert wrote.wait(120), "nothing was written to the video while the tracker waited"
            raise OSError("the driving clip's disk went away")

    monkeypatch.setattr(writer_cls, "write", counting_write)
    monkeypatch.setattr(ra.RenderAhead, "observe", failing)
    monkeypatch.setattr("tracking.tracker._auto_workers", lambda *_: 0)
    out = tmp_path / "out.mp4"
    with pytest.raises(OSError, match="disk went away"):
        run(*inputs, out, _opts(tmp_path, "broken"), weights=tiny_weights, **QUIET)
    assert wrote.is_set()
    assert [p.name for p in tmp_path.iterdir() if p.name != ".out.mp4.work"] == []  # no out.mp4, no partial file
    assert not [t for t in threading.enumerate() if t.name.startswith("retarget-write") and t.is_alive()]
    assert not running()  # no writer process left


@pytest.mark.parametrize("in_process", WRITERS)
def test_a_failure_after_tracking_in_a_video_started_early_leaves_no_video(inputs, tiny_weights, tmp_path,
                                                                          monkeypatch, in_process):
    from retarget.sink_process import running

    from render.errors import RetargetError

    writer_cls = _writer_class(monkeypatch, in_process)
    _gate(monkeypatch, frames_first=8)
    write, count = writer_cls.write, [0]

    def failing_write(self, *frame):
        count[0] += 1
        if count[0] == 27:  # after tracking: the job's writer goes on with the early video's sink
            raise RetargetError("cannot write out.mp4: disk full")
        write(self, *frame)

    monkeypatch.setattr(writer_cls, "write", failing_write)
    lines = []
    out = tmp_path / "out.mp4"
    with pytest.raises(RetargetError, match="disk full"):
        run(*inputs, out, _opts(tmp_path, "late-fail"), weights=tiny_weights, log=lines.append)
    assert _written_early(lines) >= 1, lines
    assert [p.name for p in tmp_path.iterdir() if p.name != ".out.mp4.work"] == []  # no out.mp4, no partial file
    assert not [t for t in threading.enumerate()
                if t.name.startswith(("retarget-write", "retarget-paste", "retarget-save")) and t.is_alive()]
    assert not running()  # no writer process left
