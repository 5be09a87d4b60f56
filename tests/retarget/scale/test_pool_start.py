"""Without starting Ray: a bad --ray address fails before any tracking (the start runs in a thread,
but its cheap checks do not); the timeline's marks; the GPU worker's thread knob."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from render.errors import RetargetError
from retarget.scale.options import RayOptions
from retarget.scale.timeline import CHAINS, MARKS, Timeline, process_start_time


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing answers there


def test_bad_address_fails_before_tracking(tiny_weights, tmp_path, monkeypatch):
    import retarget.run
    from render.storyboard import save_image
    from retarget.samples import sample_actor
    from retarget.scale.pool import run_on_ray

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        pytest.skip("a Ray connection of another test is open: the address would not be checked")
    calls = []
    monkeypatch.setattr(retarget.run, "_driving_track", lambda *a, **kw: calls.append("track"))
    monkeypatch.setattr(retarget.run, "run", lambda *a, **kw: calls.append("run"))
    drive = tmp_path / "drive.mp4"
    drive.write_bytes(b"not read")
    actor = tmp_path / "actor.png"
    save_image(actor, sample_actor())
    port = _free_port()
    with pytest.raises(RetargetError, match=f"--ray 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"):
        run_on_ray(drive, actor, tmp_path / "out.mp4", retarget.run.RunOptions(device="cpu"),
                   RayOptions(address=f"127.0.0.1:{port}"), weights=tiny_weights, log=lambda *_: None)
    assert calls == []
    assert not ("ray" in sys.modules and sys.modules["ray"].is_initialized())


def test_ray_missing_fails_before_tracking(monkeypatch):
    import importlib.util

    from retarget.scale.pool import RAY_MISSING, check_ray

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else object())
    with pytest.raises(RetargetError, match="needs Ray"):
        check_ray("auto")
    assert "pip install" in RAY_MISSING


def test_timeline_marks_and_report():
    tl = Timeline()
    start = process_start_time()  # to a clock tick (10 ms), read twice
    assert start is None or abs(start - tl.origin) < 0.05
    tl.mark("connected", tl.origin + 2.0)
    tl.mark("ray_imported", tl.origin + 1.0)
    tl.mark("ray_imported", tl.origin + 5.0)  # the first time is kept
    tl.mark("last_frames_back", tl.origin + 7.0)
    tl.mark("last_frames_back", tl.origin + 9.0, again=True)
    rep = tl.report([{"worker": 0, "ready": tl.origin + 3.0, "render_s": 1.5}])
    assert list(rep["marks"]) == ["ray_imported", "connected", "last_frames_back"]  # MARKS order
    assert rep["marks"] == {"ray_imported": 1.0, "connected": 2.0, "last_frames_back": 9.0}
    assert rep["workers"] == [{"worker": 0, "ready": 3.0, "render_s": 1.5}]
    tl.new_job()
    assert "last_frames_back" not in tl.marks and "connected" in tl.marks
    assert all(set(chain) <= set(MARKS) for chain in CHAINS)


def test_worker_threads_option():
    from retarget.scale.options import add_ray_options, ray_options_from_args

    import argparse

    ap = argparse.ArgumentParser()
    add_ray_options(ap)
    assert ray_options_from_args(ap.parse_args(["--ray", "--ray-worker-threads", "3"])).worker_threads == 3
    assert RayOptions().worker_threads == 0
    with pytest.raises(RetargetError, match="--ray-worker-threads must be >= 0"):
        RayOptions(worker_threads=-1)


def test_worker_threads_applied_and_alignment_unchanged(tiny_weights):
    """A worker given "threads" runs its host-side work on that many torch threads. The face found
    and its alignment (crop, M: what the driver pastes back with) do not depend on it. Frames on a
    CPU worker could (fp32 sums split over threads round differently), which is why CPU workers keep
    their cpus_per_worker threads and only GPU workers, whose math runs on the GPU, get the knob."""
    from retarget.samples import sample_actor
    from retarget.run import RunOptions
    from retarget.scale.actors import FrameRenderer, set_threads

    before = torch.get_num_threads()
    try:
        w = FrameRenderer(str(tiny_weights), dict(device="cpu", dtype="auto", fast=False, threads=2))
        assert torch.get_num_threads() == 2 and w.info()["threads"] == 2
        opts = RunOptions(steps=1, device="cpu")
        two = w.prepare({"key": "2", "opts": opts, "photo": [sample_actor()], "state": None}, export=False)
        set_threads(1)
        one = w.prepare({"key": "1", "opts": opts, "photo": [sample_actor()], "state": None}, export=False)
        np.testing.assert_array_equal(one.M, two.M)
        np.testing.assert_array_equal(one.crop, two.crop)
        assert w.stats()["job"]["prepare_s"] > 0
    finally:
        torch.set_num_threads(before)


def test_background_start_error_surfaces_at_prepare(tiny_weights, tmp_path, monkeypatch):
    """An error of the start thread (here: what a cluster without GPU gives --device cuda) is raised
    by prepare, in the caller's thread, with its own message; close() waits for the thread."""
    from render.storyboard import save_image
    from retarget.run import RunOptions
    from retarget.samples import sample_actor
    from retarget.scale.pool import RayPool
    from retarget.weights import WeightsLayout

    def no_gpu(self):
        raise RetargetError("--device cuda: the Ray cluster has no GPU")

    monkeypatch.setattr(RayPool, "_start_now", no_gpu)
    actor = tmp_path / "actor.png"
    save_image(actor, sample_actor())
    layout, opts = WeightsLayout(tiny_weights), RunOptions(device="cpu")
    with RayPool(RayOptions(), layout, opts, log=lambda *_: None) as pool:
        pool.start_async()  # returns at once: the error is the thread's
        with pytest.raises(RetargetError, match="^--device cuda: the Ray cluster has no GPU$"):
            pool.prepare(layout, actor, opts, lambda *_: None)
    assert not pool._starter.is_alive()
