"""The Ray actor's class used in-process (no Ray): shipped and recomputed actor state give the same frames."""

from __future__ import annotations

import numpy as np
import torch

from retarget.run import RunOptions
from retarget.scale.actors import FrameRenderer, export_actor, start_breakdown


def test_shipped_state_renders_like_recomputed(tiny_weights):
    from retarget.samples import sample_actor

    w = FrameRenderer(str(tiny_weights), dict(device="cpu", dtype="auto", fast=False))
    opts = RunOptions(steps=1, device="cpu", per_frame_noise=True, seed=3)
    photo = sample_actor()
    recompute = {"key": "a", "opts": opts, "photo": [photo], "state": None}
    state = w.prepare(recompute)
    assert state.bank is not None and all(t.device.type == "cpu" for t in state.bank.states.values())
    params = (np.random.default_rng(1).standard_normal((3, 55)) * 0.8).astype(np.float32)
    idx = [4, 5, 6]  # frame indices, not positions: the per-frame noise follows them
    _, a = w.render(recompute, idx, params)
    ship = {"key": "b", "opts": opts, "photo": [photo], "state": [state]}
    _, b = w.render(ship, idx, params)
    assert w.prepared == 1  # the second job took the shipped state
    np.testing.assert_array_equal(a, b)
    _, c = w.render(ship, [5], params[1:2])  # frame 5 alone: same noise, other batch shape
    assert np.abs(c[0].astype(int) - a[1]).max() <= 1  # fp32 GEMM shape moves a pixel by 1 level at most
    light = export_actor(w.rendering.actor, tensors=False)
    assert light.bank is None and light.M is not None and light.crop is not None
    assert torch.equal(state.id_embeds, w.rendering.actor.id_embeds.cpu())


def test_start_breakdown_adds_up():
    marks = {"process": 100.0, "init": 100.5, "imported": 103.0, "device": 103.25, "models": 107.0, "ready": 108.0}
    steps = start_breakdown(marks, asked=99.0)
    assert steps == {"scheduling": 1.0, "process start": 0.5, "imports": 2.5, "device": 0.25, "models": 3.75,
                     "face finder": 1.0, "total": 9.0}
    assert sum(v for k, v in steps.items() if k != "total") == steps["total"]
    # Without psutil the process start is unknown: the breakdown starts at __init__.
    no_proc = start_breakdown(dict(marks, process=None))
    assert "process start" not in no_proc and no_proc["total"] == 7.5
    # A process Ray started before it was asked for (its idle pool): scheduling runs to __init__.
    idle = start_breakdown(dict(marks, process=90.0), asked=99.0)
    assert "process start" not in idle and idle["scheduling"] == 1.5 and idle["total"] == 9.0


def test_worker_reports_when_its_start_steps_ended(tiny_weights):
    w = FrameRenderer(str(tiny_weights), dict(device="cpu", dtype="auto", fast=False))
    marks = w.info()["marks"]
    order = [marks[k] for k in ("init", "imported", "device", "models", "ready")]
    assert order == sorted(order)
    assert marks["process"] is None or marks["process"] <= marks["init"]
