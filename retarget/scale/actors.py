"""`FrameRenderer`: the Ray actor. Its constructor loads the engine once; `render` takes a batch
of frame indices and returns their images. No scheduling here (that is `pool`), and no model
code beyond calls into `retarget.run`'s stages and the pipeline.

The class is plain Python (the driver wraps it with `ray.remote`), so it also runs, and is
tested, in-process.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import numpy as np


def export_actor(actor, *, tensors: bool = True):
    """A copy of a pipeline `Actor` for the object store: tensors on the CPU (bit-exact copies, same
    dtype), or without any tensors (`tensors=False`: only crop, M, arcface and face_report, what
    the driver needs to paste frames back)."""
    if not tensors:
        return dataclasses.replace(actor, id_embeds=None, uncond_embeds=None, ref_latent=None, bank=None)
    return dataclasses.replace(
        actor, id_embeds=actor.id_embeds.cpu(), uncond_embeds=actor.uncond_embeds.cpu(),
        ref_latent=None if actor.ref_latent is None else actor.ref_latent.cpu(),
        bank=None if actor.bank is None else actor.bank.to("cpu"))


def import_actor(actor, device):
    """An exported `Actor` with its tensors moved to `device` (dtype kept)."""
    return dataclasses.replace(
        actor, id_embeds=actor.id_embeds.to(device), uncond_embeds=actor.uncond_embeds.to(device),
        ref_latent=None if actor.ref_latent is None else actor.ref_latent.to(device),
        bank=None if actor.bank is None else actor.bank.to(device))


class FrameRenderer:
    """One worker: a loaded `RetargetPipeline` and the prepared actor of the job it works on.

    weights: the weights folder (the same path on every node). load: {"device", "dtype", "fast"}
    as in RunOptions (the choices that fix the loaded pipeline), and "sd15": the --sd15 folder or None.

    A job is a dict: {"key": str, "opts": RunOptions, "photo": [ObjectRef of the (H, W, 3) uint8
    actor photo], "state": [ObjectRef of an exported Actor] or None, "fault": None}. "fault" is
    for tests, e.g. {"marker": PATH, "batch": 2}: the first worker to render its 2nd batch of the
    job while PATH does not exist creates PATH and exits the process before returning the batch
    (a crash mid-batch that Ray must recover from); {"actor_id": ID, "batch": 1}: that worker
    exits on its first batch every time, until Ray gives up restarting it. The refs sit inside lists
    so Ray passes them unresolved: a worker fetches them only when it meets a new job (first
    batch, or after a restart, when Ray retries the batch on a fresh process).
    """

    def __init__(self, weights: str, load: dict):
        # Where a cold worker's start goes (seconds since the epoch; `start_breakdown` turns them
        # into durations): the process, the imports, CUDA and the models.
        marks = {"process": process_start_time(), "init": time.time()}
        from retarget.pipeline import RetargetPipeline
        from retarget.run import resolve_device
        from retarget.weights import WeightsLayout

        marks["imported"] = time.time()
        self.layout = WeightsLayout(weights, sd15=load.get("sd15"))
        self.device, self.dtype = resolve_device(load["device"], load["dtype"])
        if self.device == "cuda":
            import torch

            torch.zeros(1, device="cuda")  # the CUDA context, timed apart from the weights
        marks["device"] = time.time()
        self.pipe = RetargetPipeline.from_weights(self.layout, device=self.device, dtype=self.dtype,
                                                  lcm=bool(load["fast"]))
        marks["models"] = time.time()
        # The face finder loads its models on first use: do it now, while the driver is still busy,
        # instead of inside the job's first prepare (1 s of a 1.3 s first prepare on 2 cores).
        self.pipe._face_backend().detect(np.zeros((64, 64, 3), np.uint8))
        marks["ready"] = time.time()
        self.marks = marks
        # The host's 1-minute load average when ready: a slow start on a busy host shows here.
        self.load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.key: str | None = None
        self.rendering = None
        self.batches = 0  # of the current job, in this process
        self.prepared = 0  # how many actors this process prepared itself (recompute / the shipping worker)
        self.busy_s = 0.0  # seconds spent rendering batches (all jobs), for benchmarks

    def info(self) -> dict:
        """Where this worker runs and what it loaded; also the "ready" signal of a new worker."""
        from retarget.run import auto_batch

        gpus, actor_id = [], None
        try:
            import ray

            if ray.is_initialized():  # else get_gpu_ids() would start a Ray instance
                gpus = [str(g) for g in ray.get_gpu_ids()]
                actor_id = ray.get_runtime_context().get_actor_id()
        except ImportError:  # used without Ray
            pass
        return dict(host=socket.gethostname(), pid=os.getpid(), device=self.device, dtype=self.dtype, gpus=gpus,
                    actor_id=actor_id, marks=dict(self.marks), load_average=self.load_average,
                    auto_batch=auto_batch(self.device, self.pipe.image_size), image_size=self.pipe.image_size)

    def prepare(self, job: dict, export: bool = True):
        """Prepare the job's actor here (face, identity, reference latent, bank) and keep it; return it
        exported (`export_actor`; without tensors when `export` is False). RetargetError on a bad photo."""
        r = self._install(job)
        return export_actor(r.actor, tensors=export)

    def render(self, job: dict, indices: list[int], params: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Frames `indices` of the job, with their (B, 55) expression vectors `params` ->
        (indices, (B, H, W, 3) uint8 images), exactly as the single-process run renders that batch."""
        r = self._install(job)
        self.batches += 1
        t0 = time.perf_counter()
        (_, images), = list(r.render([list(indices)], _Rows(indices, params)))
        self.busy_s += time.perf_counter() - t0
        self._maybe_crash(job.get("fault"))
        return list(indices), images

    def stats(self) -> dict:
        return dict(pid=os.getpid(), batches=self.batches, prepared=self.prepared, key=self.key, busy_s=self.busy_s)

    # ------------------------------------------------------------------ internals
    def _install(self, job: dict):
        if self.key == job["key"]:
            return self.rendering
        import ray

        from retarget.run import Rendering, prepare_rendering, render_call

        def get(x):
            return ray.get(x) if isinstance(x, ray.ObjectRef) else x

        opts = job["opts"]
        photo = get(job["photo"][0])
        if job.get("state") is not None:
            state = get(job["state"][0])
            r = Rendering(self.pipe, import_actor(state, self.pipe.device), photo, self.device, self.dtype,
                          render_call(opts))
        else:
            r = prepare_rendering(self.layout, Path("actor photo"), opts, lambda *_: None, actor_rgb=photo,
                                  pipe=self.pipe)
            self.prepared += 1
        self.key, self.rendering, self.batches = job["key"], r, 0
        return r

    def _maybe_crash(self, f: dict | None) -> None:
        if not f or self.batches != f["batch"]:
            return
        if "actor_id" in f:  # this worker, every time (until Ray stops restarting it)
            import ray

            if ray.get_runtime_context().get_actor_id() == f["actor_id"]:
                os._exit(1)
            return
        marker = Path(f["marker"])
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one worker wins
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)


def process_start_time() -> float | None:
    """When this process started (seconds since the epoch), or None where that cannot be read."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or the platform refuses: the breakdown starts at __init__
        return None


START_STAGES = (("process", "init", "process start"), ("init", "imported", "imports"),
                ("imported", "device", "device"), ("device", "models", "models"), ("models", "ready", "face finder"))


def start_breakdown(marks: dict, asked: float | None = None) -> dict[str, float]:
    """Seconds of each step of a worker's start from its `marks` (FrameRenderer.info()["marks"]):
    {"scheduling": asked -> process start (when `asked`, the driver's time.time() at start, is
    given), "process start", "imports", "device", "models", "face finder", "total"}; no "process
    start" when the process existed before it was asked for (Ray keeps idle workers). Clocks of
    one host; across hosts the scheduling figure carries their clock offset."""
    marks = dict(marks)
    if asked is not None and marks.get("process") is not None and marks["process"] < asked:
        marks["process"] = None  # a process Ray had started before (its idle pool): no start to count
    first = marks.get("process") or marks["init"]
    out = {}
    if asked is not None:
        out["scheduling"] = first - asked
    for a, b, name in START_STAGES:
        if marks.get(a) is not None and marks.get(b) is not None:
            out[name] = marks[b] - marks[a]
    out["total"] = marks["ready"] - (asked if asked is not None else first)
    return out


class _Rows:
    """The (B, 55) rows of a batch, indexed by frame index as `Rendering.render` indexes a whole clip."""

    def __init__(self, indices: list[int], rows: np.ndarray):
        self.pos = {int(i): k for k, i in enumerate(indices)}
        self.rows = np.asarray(rows)

    def __getitem__(self, idx) -> np.ndarray:
        return self.rows[[self.pos[int(i)] for i in idx]]
