"""`retarget run` with rendering, PNG saving and writing overlapped (retarget.overlap), on tiny
weights (CPU): the same frames as the serial stages, any batch order, errors, the model load
overlapped with tracking."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.run import RunOptions, run

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def inputs(sample_inputs):
    return sample_inputs(0.6)


@pytest.fixture(scope="module")
def track_file(inputs, track_of):
    return track_of(inputs[0])


def _opts(track_file, tmp_path, name, **kw) -> RunOptions:
    base = dict(steps=2, batch=4, device="cpu", track=str(track_file), keep_work=True,
                frames_dir=str(tmp_path / f"{name}.frames"))
    base.update(kw)
    return RunOptions(**base)


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    from retarget.run import read_image

    return {p.name: read_image(p) for p in sorted(Path(folder).glob("*.png"))}


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # same batch shapes: exact by design


@pytest.fixture(scope="module")
def serial(inputs, track_file, tiny_weights, tmp_path_factory):
    """The stages one after the other, as before the overlap: render every frame into the work
    folder, then write the video from the PNGs (batch 4 does not divide the 15 frames)."""
    from retarget.motion import output_times, parse_gain, retarget_params, sample_params
    from retarget.run import WorkFolder, prepare_rendering, render_to_work, write_video
    from retarget.weights import WeightsLayout
    from tracking.track import Track

    drive, actor = inputs
    tmp = tmp_path_factory.mktemp("serial")
    opts = _opts(track_file, tmp, "serial")
    layout = WeightsLayout(tiny_weights)
    track = Track.load(track_file)
    at = output_times(track.times, start=None, end=None, fps=None, source_fps=track.fps)
    params = retarget_params(sample_params(track.times, track.params, at), parse_gain(None))
    r = prepare_rendering(layout, actor, opts, **QUIET)
    work = WorkFolder(tmp / "work")
    render_to_work(r, params, work, opts, layout, actor, {"drive": "x"}, **QUIET)
    write_video(r, params, work, tmp / "serial.mp4", track.fps, opts)
    return {"work": _pngs(work.frames), "frames": _pngs(tmp / "serial.frames"), "n": len(params),
            "video": _decoded(tmp / "serial.mp4")}


def _work(out: Path) -> Path:
    return out.parent / f".{out.name}.work" / "frames"


def test_overlapped_run_gives_the_serial_frames_and_its_stages(inputs, track_file, tiny_weights, tmp_path, serial):
    out = tmp_path / "out.mp4"
    s = run(*inputs, out, _opts(track_file, tmp_path, "out"), weights=tiny_weights, **QUIET)
    _assert_same(_pngs(_work(out)), serial["work"])
    _assert_same(_pngs(tmp_path / "out.frames"), serial["frames"])
    assert s.frames == serial["n"] == 15 and out.is_file()
    assert set(s.stages) == {"open", "track", "load", "prepare", "render", "write_tail", "total", "gpu_busy"}
    assert 0 < s.stages["gpu_busy"] <= s.stages["render"] + 1e-6 and s.stages["total"] == s.seconds
    assert s.frames_per_s_render == pytest.approx(15 / s.stages["render"])
    assert not [t for t in threading.enumerate() if t.name.startswith("retarget-")]


def test_interrupted_then_resumed_gives_the_serial_frames(inputs, track_file, tiny_weights, tmp_path, serial,
                                                          kill_pipeline):
    out = tmp_path / "out.mp4"
    kill_pipeline(3)
    with pytest.raises(kill_pipeline.Killed):
        run(*inputs, out, _opts(track_file, tmp_path, "out"), weights=tiny_weights, **QUIET)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert sorted(_pngs(_work(out))) == [f"{i:06d}.png" for i in range(8)]  # two batches survived
    kill_pipeline.revive()
    s = run(*inputs, out, _opts(track_file, tmp_path, "out", resume=True), weights=tiny_weights, **QUIET)
    assert s.rendered == 15 - 8
    _assert_same(_pngs(_work(out)), serial["work"])
    _assert_same(_pngs(tmp_path / "out.frames"), serial["frames"])


def test_batches_in_any_order_give_the_same_frames_in_video_order(inputs, track_file, tiny_weights, tmp_path,
                                                                  serial):
    """A renderer that returns batches shuffled (as Ray workers do): the frames and the video in order."""
    from retarget.run import prepare_rendering

    def shuffled_prepare(*a, **kw):
        r = prepare_rendering(*a, **kw)
        local = type(r)(**{**r.__dict__, "render_batches": None})

        def render_batches(batches, params):
            yield from local.render(random.Random(3).sample(batches, len(batches)), params)

        r.render_batches = render_batches
        return r

    out = tmp_path / "out.mp4"
    run(*inputs, out, _opts(track_file, tmp_path, "out"), weights=tiny_weights, prepare=shuffled_prepare, **QUIET)
    _assert_same(_pngs(_work(out)), serial["work"])
    _assert_same(_pngs(tmp_path / "out.frames"), serial["frames"])
    video, ref = _decoded(out), serial["video"]
    assert len(video) == len(ref) == 15
    # The same frames in the same order through the same encoder settings (x264 is deterministic
    # for the same frames and settings: the .mp4 bytes may differ, the decoded frames do not).
    for k, (v, f) in enumerate(zip(video, ref)):
        np.testing.assert_array_equal(v, f, err_msg=f"frame {k}")


def _decoded(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_paste_back_error_in_the_writer(inputs, track_file, tiny_weights, tmp_path, monkeypatch):
    import retarget.video_sink as sink_mod

    real = sink_mod.paste_into
    calls = {"n": 0}

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RetargetError("paste-back: alignment matrix is singular")
        return real(*a, **kw)

    monkeypatch.setattr(sink_mod, "paste_into", failing)  # a preview: the writer runs in this process
    out = tmp_path / "out.mp4"
    with pytest.raises(RetargetError, match="singular"):
        run(*inputs, out, _opts(track_file, tmp_path, "out", preview="side-by-side"), weights=tiny_weights, **QUIET)
    assert not out.exists() and not (tmp_path / "out.preview.mp4").exists()
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]
    assert not [t for t in threading.enumerate() if t.name.startswith("retarget-")]
    kept = sorted(_pngs(_work(out)))
    assert kept and kept == [f"{i:06d}.png" for i in range(len(kept))]  # for --resume


def test_model_load_starts_while_tracking(inputs, tiny_weights, tmp_path, monkeypatch):
    """Event order, not timing: the tracker returns only once the load has started."""
    import tracking.tracker as tracker_mod
    from retarget import pipeline as pipeline_mod

    events: list[str] = []
    started = threading.Event()
    real_load, real_track = pipeline_mod.RetargetPipeline.from_weights.__func__, tracker_mod.track_video

    def load(cls, *a, **kw):
        events.append("load starts")
        started.set()
        return real_load(cls, *a, **kw)

    def track(*a, **kw):
        events.append("tracking starts")
        result = real_track(*a, **kw)
        assert started.wait(60), "the pipeline did not start loading while tracking"
        events.append("tracking ends")
        return result

    monkeypatch.setattr(pipeline_mod.RetargetPipeline, "from_weights", classmethod(load))
    monkeypatch.setattr(tracker_mod, "track_video", track)
    s = run(*inputs, tmp_path / "out.mp4", RunOptions(steps=1, batch=8, device="cpu", end=0.2),
            weights=tiny_weights, **QUIET)
    assert events == ["tracking starts", "load starts", "tracking ends"] or \
        events == ["load starts", "tracking starts", "tracking ends"]
    assert s.stages["load"] > 0 and s.tracked


def test_tracking_error_does_not_wait_for_the_load(inputs, tiny_weights, tmp_path, monkeypatch):
    import tracking.tracker as tracker_mod
    from retarget import pipeline as pipeline_mod

    release, entered = threading.Event(), threading.Event()

    def slow_load(cls, *a, **kw):
        entered.set()
        release.wait(60)
        raise AssertionError("never used")

    def no_face(*a, **kw):
        kw["backend_factory"]()  # the tracker has built its models: the load starts now
        assert entered.wait(60)
        raise RetargetError("no face found in the driving video")

    monkeypatch.setattr(pipeline_mod.RetargetPipeline, "from_weights", classmethod(slow_load))
    monkeypatch.setattr(tracker_mod, "track_video", no_face)
    t = time.perf_counter()
    with pytest.raises(RetargetError, match="no face"):
        run(*inputs, tmp_path / "out.mp4", RunOptions(device="cpu"), weights=tiny_weights, **QUIET)
    assert time.perf_counter() - t < 30  # returned while the load is still blocked
    loaders = [th for th in threading.enumerate() if th.name == "retarget-load"]
    release.set()
    for th in loaders:
        th.join(30)
        assert not th.is_alive()  # it ends by itself, its result dropped


def test_missing_weight_file_fails_before_tracking(inputs, tiny_weights, tmp_path, monkeypatch):
    import shutil

    import tracking.tracker as tracker_mod

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    (weights / "exp_adapter" / "exp_adapter.bin").unlink()

    def forbidden(*a, **kw):
        raise AssertionError("tracked before the weights were checked")

    monkeypatch.setattr(tracker_mod, "track_video", forbidden)
    with pytest.raises(RetargetError, match="exp_adapter.bin"):
        run(*inputs, tmp_path / "out.mp4", RunOptions(device="cpu"), weights=weights, **QUIET)


def test_paste_back_runs_ahead_of_the_encoder(inputs, track_file, tiny_weights, tmp_path, monkeypatch):
    """Paste-back runs in its own threads, PASTE_AHEAD frames ahead of the encoder: while the encoder
    is held on frame 0, the frames after it are pasted (event-driven: no timing); every thread ends.
    In this process (the writer process runs the same sink, retarget.video_sink)."""
    import retarget.run as run_mod
    import retarget.video_sink as sink_mod
    from render.video import VideoWriter

    monkeypatch.setattr(run_mod, "WRITER_PROCESS", False)
    real_paste, real_write = sink_mod.paste_into, VideoWriter.write
    pasted, where = [], set()
    ahead = threading.Event()

    def paste(*a, **kw):
        out = real_paste(*a, **kw)
        pasted.append(1)
        where.add(threading.current_thread().name.split("_")[0])
        if len(pasted) == sink_mod.PASTE_AHEAD + 1:
            ahead.set()
        return out

    def write(self, frame):
        if not getattr(self, "_held", False):
            self._held = True
            assert ahead.wait(30), f"only {len(pasted)} frames pasted while the encoder waited on frame 0"
        return real_write(self, frame)

    monkeypatch.setattr(sink_mod, "paste_into", paste)
    monkeypatch.setattr(VideoWriter, "write", write)
    out = tmp_path / "out.mp4"
    summary = run(*inputs, out, _opts(track_file, tmp_path, "out"), weights=tiny_weights, **QUIET)
    assert out.is_file() and len(pasted) == summary.frames > sink_mod.PASTE_AHEAD + 1
    assert where == {"retarget-paste"}
    assert not [t for t in threading.enumerate() if t.name.startswith("retarget-")]


def test_the_writer_process_and_the_writer_threads_write_the_same_job(inputs, track_file, tiny_weights, tmp_path,
                                                                      monkeypatch):
    """retarget.run.WRITER_PROCESS: the job's video and --frames-dir from a writer process of its own
    (the default) and from threads of the job's process."""
    import retarget.run as run_mod
    from retarget.sink_process import SinkProcess

    started = []
    real_enter = SinkProcess.__enter__
    monkeypatch.setattr(SinkProcess, "__enter__", lambda self: started.append(1) or real_enter(self))
    got = {}
    for name, where in (("process", True), ("threads", False)):
        monkeypatch.setattr(run_mod, "WRITER_PROCESS", where)
        run(*inputs, tmp_path / f"{name}.mp4", _opts(track_file, tmp_path, name), weights=tiny_weights, **QUIET)
        got[name] = _pngs(tmp_path / f"{name}.frames"), np.stack(_decoded(tmp_path / f"{name}.mp4"))
        assert len(started) == 1  # the process for the first job only
    _assert_same(got["process"][0], got["threads"][0])  # lossless PNGs of the pasted frames: exact
    a, b = got["process"][1], got["threads"][1]
    # x264 may decide a few macroblocks differently across two encodes (CI's CPU): a bound on the video
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
