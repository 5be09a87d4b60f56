"""One job over Ray workers (a local Ray with 2 CPUs started here, tiny weights): frames equal the
single-process run's bit for bit for any worker count, either way of giving workers the actor
state, through a worker crash, and across a driver death and --resume with another worker count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from retarget.run import RunOptions, read_image, run  # noqa: E402
from retarget.scale.options import RayOptions  # noqa: E402
from retarget.scale.pool import RayPool  # noqa: E402

FRAMES, FPS, BATCH = 5, 25.0, 2  # 2 does not divide 5: batches [0, 1] [2, 3] [4]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # 4 logical CPUs for 2 cores: the two pools below (2 + 1 workers) and the batch test's pool
    # (1) stay alive together, and at most two workers are busy at any time.
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_weights, random_track_inputs):
    """A 5-frame driving clip, the actor photo and a track of 5 distinct expressions."""
    return random_track_inputs(tmp_path_factory.mktemp("ray_inputs"), FRAMES, FPS, seed=3, scale=0.8)


def _opts(track, **kw) -> RunOptions:
    base = dict(steps=1, batch=BATCH, device="cpu", track=str(track), paste_back=False, keep_work=True)
    base.update(kw)
    return RunOptions(**base)


def _ray(**kw) -> RayOptions:
    base = dict(workers=2, cpus_per_worker=1)
    base.update(kw)
    return RayOptions(**base)


def _frames(out: Path) -> list[np.ndarray]:
    work = out.parent / f".{out.name}.work" / "frames"
    return [read_image(work / f"{i:06d}.png") for i in range(FRAMES)]


def _video(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


@pytest.fixture(scope="module")
def reference(job, tiny_weights, tmp_path_factory):
    """The single-process run. With one thread, as each 1-CPU worker: fp32 reductions split
    across threads round differently (1e-6), so thread count is part of "the same shapes"."""
    import torch

    drive, actor, track = job
    out = tmp_path_factory.mktemp("single") / "out.mp4"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run(drive, actor, out, _opts(track), weights=tiny_weights, **QUIET)
    finally:
        torch.set_num_threads(threads)
    assert summary.frames == FRAMES
    return _frames(out), _video(out)


def _assert_same(out: Path, reference) -> None:
    """The rendered frames (work folder PNGs, what the video is made of) equal the reference's bit
    for bit, and the video holds them. The video files themselves are not compared byte for byte:
    this libx264 build does not encode the same frames to the same bits under CPU load (30 encodes
    of 7 identical 64x64 frames gave 3 different streams, up to 35 levels apart on a pixel)."""
    frames, _ = reference
    got = _frames(out)
    assert len(got) == FRAMES
    for a, b in zip(got, frames):
        np.testing.assert_array_equal(a, b)
    v = np.stack(_video(out)).astype(float)
    assert len(v) == FRAMES
    # H.264 4:2:0 of the tiny weights' noisy 64x64 frames is lossy (mean error ~10 levels): each
    # video frame must be nearest to its own rendered frame, so the video holds them, in order.
    dist = np.abs(v[:, None] - np.stack(frames)[None].astype(float)).mean(axis=(2, 3, 4))
    assert list(dist.argmin(axis=1)) == list(range(FRAMES)), dist.round(1)


def _layout(root):
    from retarget.weights import WeightsLayout

    return WeightsLayout(root)


@pytest.fixture(scope="module")
def pool2(job, tiny_weights):
    """Two 1-CPU workers shared by the tests (each starts a process and loads the models once).
    One restart each, so a worker that crashes twice is gone for good."""
    with RayPool(_ray(workers=2, max_restarts=1), _layout(tiny_weights), _opts(job[2]), **QUIET) as pool:
        pool.start()
        yield pool


@pytest.fixture(scope="module")
def pool1(job, tiny_weights):
    with RayPool(_ray(workers=1), _layout(tiny_weights), _opts(job[2]), **QUIET) as pool:
        pool.start()
        yield pool


def _run(pool, job, tiny_weights, out, *, state="ship", fault=None, **kw):
    """`retarget run` with the frames rendered by `pool` (its actor state and test fault set for this job)."""
    import dataclasses

    drive, actor, track = job
    pool.ray_opts = dataclasses.replace(pool.ray_opts, actor_state=state)
    pool.fault = fault
    try:
        return run(drive, actor, out, _opts(track, **kw), weights=tiny_weights, prepare=pool.prepare, **QUIET)
    finally:
        pool.fault = None


def test_frames_differ_between_expressions(reference):
    frames, _ = reference  # otherwise equality below would prove little
    assert all(np.abs(frames[0].astype(int) - f.astype(int)).max() > 10 for f in frames[1:])


@pytest.mark.parametrize("workers,state", [(1, "ship"), (2, "ship"), (2, "recompute")])
def test_sharded_equals_single_process(job, tiny_weights, tmp_path, reference, request, workers, state):
    pool = request.getfixturevalue(f"pool{workers}")
    before = {s["pid"]: s["prepared"] for s in pool.stats()}
    summary = _run(pool, job, tiny_weights, tmp_path / "out.mp4", state=state)
    assert summary.rendered == FRAMES
    _assert_same(tmp_path / "out.mp4", reference)
    prepared = sum(s["prepared"] - before.get(s["pid"], 0) for s in pool.stats())
    # ship: one worker prepares, the other receives the state; recompute: each worker that rendered.
    assert prepared == (1 if state == "ship" else workers)


def test_cli_run_with_ray(job, tiny_weights, tmp_path, reference, capsys, monkeypatch):
    """`retarget run ... --ray`: run_on_ray joins the running Ray, starts its own worker (in a thread,
    beside the driver's tracking), stops it; its timeline has every mark, each in its place."""
    from retarget.cli import main
    from retarget.scale.timeline import CHAINS, MARKS

    reports, close = [], RayPool.close

    def close_with_report(self):
        if self.actors and not reports:
            reports.append(self.timeline_report())
        close(self)

    monkeypatch.setattr(RayPool, "close", close_with_report)

    drive, actor, track = job
    out = tmp_path / "out.mp4"
    rc = main(["run", str(drive), str(actor), "-o", str(out), "--weights", str(tiny_weights), "--steps", "1",
               "--batch", str(BATCH), "--device", "cpu", "--track", str(track), "--crop-only", "--keep-work",
               "--ray", "--ray-workers", "1", "--ray-cpus-per-worker", "1"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"done: {FRAMES} frames ({FRAMES} rendered now, 0 driving frames tracked)" in printed
    # The cold worker's start, step by step (where a short job's Ray overhead goes).
    ready = next(line for line in printed.splitlines() if line.startswith("ray: worker 0 ready after"))
    for step in ("scheduling", "imports", "device", "models", "face finder"):
        assert f"{step} " in ready, ready
    _assert_same(out, reference)

    marks = reports[0]["marks"]
    assert list(marks) == list(MARKS)  # all of them, in their order
    for chain in CHAINS:
        times = [marks[k] for k in chain]
        assert times == sorted(times), (chain, times)
    assert marks["run_on_ray"] >= 0
    assert marks["run"] <= marks["connected"] + 60  # run() did not wait for the start (a loose sanity bound)
    (w,) = reports[0]["workers"]
    assert w["batches"] == 3 and w["render_s"] > 0 and w["idle_s"] >= 0 and w["prepare_s"] > 0
    assert w["threads"] == 1  # a 1-CPU worker: --ray-worker-threads is for GPU workers only
    assert marks["actors_asked"] <= w["ready"] <= w["first_render"] <= w["last_render"] <= marks["last_frames_back"]


def test_worker_crash_mid_batch_is_retried(job, tiny_weights, tmp_path, reference, pool2):
    """A worker exits (os._exit) in the middle of its 2nd batch: Ray restarts it and retries the batch."""
    marker = tmp_path / "crashed"
    summary = _run(pool2, job, tiny_weights, tmp_path / "out.mp4", fault={"marker": str(marker), "batch": 2})
    assert marker.exists()  # a worker really died mid-batch
    assert pool2.deaths == 0 and len(pool2.alive) == 2  # Ray brought it back
    assert summary.rendered == FRAMES
    _assert_same(tmp_path / "out.mp4", reference)


class _DriverKilled(Exception):
    pass


def test_driver_killed_then_resume_with_other_worker_count(job, tiny_weights, tmp_path, reference, monkeypatch,
                                                            pool1, pool2):
    from retarget.run import WorkFolder

    out = tmp_path / "out.mp4"
    save = WorkFolder.save
    saved = []

    def dying_save(self, i, rgb):
        if len(saved) == BATCH:  # the driver dies as the second batch arrives
            raise _DriverKilled()
        saved.append(i)
        save(self, i, rgb)

    monkeypatch.setattr(WorkFolder, "save", dying_save)
    with pytest.raises(_DriverKilled):
        _run(pool2, job, tiny_weights, out)
    monkeypatch.setattr(WorkFolder, "save", save)
    assert not out.exists()
    frames = out.parent / f".{out.name}.work" / "frames"
    assert sorted(int(p.stem) for p in frames.glob("*.png")) == sorted(saved)
    # Batches arrive in any order: those complete on disk are kept; a partly saved one is redone whole.
    kept = [i for s in range(0, FRAMES, BATCH) if all(i in saved for i in range(s, min(FRAMES, s + BATCH)))
            for i in range(s, min(FRAMES, s + BATCH))]
    assert kept
    before = {i: (frames / f"{i:06d}.png").stat().st_mtime_ns for i in kept}

    summary = _run(pool1, job, tiny_weights, out, state="recompute", resume=True)
    assert summary.rendered == FRAMES - len(kept)  # only the missing frames
    assert {i: (frames / f"{i:06d}.png").stat().st_mtime_ns for i in kept} == before  # kept, not redone
    _assert_same(out, reference)


def test_batch_file_of_three_jobs_one_without_a_face(job, tiny_weights, tmp_path, capsys):
    import json

    import torch

    from render.storyboard import save_image
    from retarget.cli import main
    from retarget.sheets import make_storyboard, storyboard_expressions

    drive, actor, track = job
    blank = tmp_path / "wall.png"
    save_image(blank, np.full((256, 256, 3), 128, np.uint8))  # a photo with no face in it
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"""
defaults: {{weights: {tiny_weights}, steps: 1, batch: {BATCH}, device: cpu}}
jobs:
  - {{name: wall, command: run, drive: {drive}, actor: wall.png, track: {track}, output: out/wall.mp4}}
  - {{name: sheet, command: storyboard, actor: {actor}, output: out/sheet.png, presets: "neutral,jaw_open,eyes_closed"}}
  - {{name: smile, command: transition, actor: {actor}, output: out/smile.mp4, fps: 10,
     keyframes: [{{time: 0, preset: neutral}}, {{time: 0.3, jaw: 0.3}}]}}
""")
    (tmp_path / "out").mkdir()
    rc = main(["batch", str(jobs), "--ray", "--ray-workers", "1", "--ray-cpus-per-worker", "1"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert (tmp_path / "out/sheet.png").is_file() and (tmp_path / "out/smile.mp4").is_file()
    assert not (tmp_path / "out/wall.mp4").exists()
    wall = next(line for line in printed.splitlines() if line.startswith("wall "))
    assert "failed" in wall and "no face found" in wall, printed
    assert "2 of 3 jobs done, 1 failed" in printed
    status = json.loads((tmp_path / "jobs.status.json").read_text())
    assert {j["name"]: j["status"] for j in status["jobs"]} == {"wall": "failed", "sheet": "done", "smile": "done"}
    assert status["jobs"][2]["frames"] == 4  # 0.3 s at 10 fps, both ends

    # The sheet rendered on the Ray worker is the one `retarget storyboard` makes here (1 thread, as the worker).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = make_storyboard(actor, tmp_path / "local.png", storyboard_expressions(presets="neutral,jaw_open,eyes_closed"),
                                RunOptions(steps=1, batch=BATCH, device="cpu", paste_back=False),
                                weights=tiny_weights, **QUIET)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(read_image(tmp_path / "out/sheet.png"), read_image(local))

    # Again, without Ray: the finished jobs are skipped, the failed one is tried again (and fails again).
    rc = main(["batch", str(jobs)])
    printed = capsys.readouterr().out
    assert rc == 1
    assert sum("done (earlier)" in line for line in printed.splitlines()) == 2


def test_dead_worker_batches_go_to_the_others(job, tiny_weights, tmp_path, reference, pool2):
    """A worker that keeps dying is given up after its restarts; its batches go to the other worker.
    (Last in this file: pool2 is left with one worker.)"""
    logs = []
    pool2.log = logs.append
    victim = pool2.ready[0]["actor_id"]
    summary = _run(pool2, job, tiny_weights, tmp_path / "out.mp4", fault={"actor_id": victim, "batch": 1})
    assert pool2.deaths >= 1 and pool2.alive == {1}
    assert any("died" in line for line in logs)
    assert summary.rendered == FRAMES
    _assert_same(tmp_path / "out.mp4", reference)
