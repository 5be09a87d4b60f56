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
from retarget.scale.pool import RayPool, run_on_ray  # noqa: E402

FRAMES, FPS, BATCH = 5, 25.0, 2  # 2 does not divide 5: batches [0, 1] [2, 3] [4]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_weights):
    """A 5-frame driving clip, the actor photo and a track of 5 distinct expressions."""
    from render.storyboard import save_image
    from retarget.samples import sample_actor, write_sample_drive
    from tracking.track import Track

    root = tmp_path_factory.mktemp("ray_inputs")
    drive = write_sample_drive(root / "drive.mp4", seconds=FRAMES / FPS, fps=FPS, size=96)
    actor = root / "actor.png"
    save_image(actor, sample_actor())
    params = (np.random.default_rng(3).standard_normal((FRAMES, 55)) * 0.8).astype(np.float32)
    track = root / "drive.track.npz"
    Track(raw=params, params=params, valid=np.ones(FRAMES, bool), times=np.arange(FRAMES) / FPS, fps=FPS).save(track)
    return drive, actor, track


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


def test_frames_differ_between_expressions(reference):
    frames, _ = reference  # otherwise equality below would prove little
    assert all(np.abs(frames[0].astype(int) - f.astype(int)).max() > 10 for f in frames[1:])


@pytest.mark.parametrize("workers,state", [(1, "ship"), (2, "ship"), (2, "recompute")])
def test_sharded_equals_single_process(job, tiny_weights, tmp_path, reference, workers, state):
    drive, actor, track = job
    out = tmp_path / "out.mp4"
    summary = run_on_ray(drive, actor, out, _opts(track), _ray(workers=workers, actor_state=state),
                         weights=tiny_weights, **QUIET)
    assert summary.rendered == FRAMES
    _assert_same(out, reference)


def test_worker_crash_mid_batch_is_retried(job, tiny_weights, tmp_path, reference):
    """A worker exits (os._exit) in the middle of its 2nd batch: Ray restarts it and retries the batch."""
    drive, actor, track = job
    out, marker = tmp_path / "out.mp4", tmp_path / "crashed"
    summary = run_on_ray(drive, actor, out, _opts(track), _ray(), weights=tiny_weights,
                         fault={"marker": str(marker), "batch": 2}, **QUIET)
    assert marker.exists()  # a worker really died mid-batch
    assert summary.rendered == FRAMES
    _assert_same(out, reference)


def test_dead_worker_batches_go_to_the_others(job, tiny_weights, tmp_path, reference):
    """No restarts allowed: the dead worker's batches are handed to the surviving one."""
    drive, actor, track = job
    out, marker = tmp_path / "out.mp4", tmp_path / "crashed"
    logs = []
    with RayPool(_ray(max_restarts=0), _layout(tiny_weights), _opts(track), log=logs.append,
                 fault={"marker": str(marker), "batch": 2}) as pool:
        summary = run(drive, actor, out, _opts(track), weights=tiny_weights, prepare=pool.prepare, **QUIET)
        assert pool.deaths >= 1 and len(pool.alive) == 1
    assert marker.exists() and any("died" in line for line in logs)
    assert summary.rendered == FRAMES
    _assert_same(out, reference)


class _DriverKilled(Exception):
    pass


def test_driver_killed_then_resume_with_other_worker_count(job, tiny_weights, tmp_path, reference, monkeypatch):
    from retarget.run import WorkFolder

    drive, actor, track = job
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
        run_on_ray(drive, actor, out, _opts(track), _ray(workers=2), weights=tiny_weights, **QUIET)
    monkeypatch.setattr(WorkFolder, "save", save)
    assert not out.exists()
    frames = out.parent / f".{out.name}.work" / "frames"
    assert sorted(int(p.stem) for p in frames.glob("*.png")) == sorted(saved)
    before = {i: (frames / f"{i:06d}.png").stat().st_mtime_ns for i in saved}

    summary = run_on_ray(drive, actor, out, _opts(track, resume=True), _ray(workers=1, actor_state="recompute"),
                         weights=tiny_weights, **QUIET)
    assert summary.rendered == FRAMES - BATCH  # only the missing frames
    assert {i: (frames / f"{i:06d}.png").stat().st_mtime_ns for i in saved} == before  # kept, not redone
    _assert_same(out, reference)


def _layout(root):
    from retarget.weights import WeightsLayout

    return WeightsLayout(root)


def test_batch_file_of_three_jobs_one_without_a_face(job, tiny_weights, tmp_path, capsys):
    import json

    from render.storyboard import save_image
    from retarget.cli import main

    drive, actor, track = job
    blank = tmp_path / "wall.png"
    save_image(blank, np.full((256, 256, 3), 128, np.uint8))  # a photo with no face in it
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(f"""
defaults: {{weights: {tiny_weights}, steps: 1, batch: {BATCH}, device: cpu}}
jobs:
  - {{name: take, command: run, drive: {drive}, actor: {actor}, track: {track}, output: out/take.mp4}}
  - {{name: wall, command: storyboard, actor: wall.png, output: out/wall.png, presets: "neutral,jaw_open"}}
  - {{name: smile, command: transition, actor: {actor}, output: out/smile.mp4, fps: 10,
     keyframes: [{{time: 0, preset: neutral}}, {{time: 0.3, jaw: 0.3}}]}}
""")
    (tmp_path / "out").mkdir()
    rc = main(["batch", str(jobs), "--ray", "--ray-workers", "2", "--ray-cpus-per-worker", "1"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert (tmp_path / "out/take.mp4").is_file() and (tmp_path / "out/smile.mp4").is_file()
    assert not (tmp_path / "out/wall.png").exists()
    wall = next(line for line in printed.splitlines() if line.startswith("wall "))
    assert "failed" in wall and "no face found" in wall, printed
    assert "2 of 3 jobs done, 1 failed" in printed
    status = json.loads((tmp_path / "jobs.status.json").read_text())
    assert {j["name"]: j["status"] for j in status["jobs"]} == {"take": "done", "wall": "failed", "smile": "done"}
    assert status["jobs"][0]["frames"] == FRAMES

    # Again, without Ray: the finished jobs are skipped, the failed one is tried again (and fails again).
    rc = main(["batch", str(jobs)])
    printed = capsys.readouterr().out
    assert rc == 1
    assert sum("done (earlier)" in line for line in printed.splitlines()) == 2
