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

from retarget.scale.timeline import process_start_time


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
    as in RunOptions (the choices that fix the loaded pipeline), "sd15": the --sd15 folder or None,
    and optionally "threads": CPU threads for the host-side work (`set_threads`; GPU workers).

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
        if load.get("threads"):
            set_threads(int(load["threads"]))
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
        self.job_stats: dict = {}  # of the current job (see stats())
        self._last_end: float | None = None  # time.time() when the last batch of this job was rendered

    def info(self) -> dict:
        """Where this worker runs and what it loaded; also the "ready" signal of a new worker."""
        import torch

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
                    auto_batch=auto_batch(self.device, self.pipe.image_size), image_size=self.pipe.image_size,
                    threads=torch.get_num_threads())

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
        t0, s = time.time(), self.job_stats
        if self._last_end is not None:  # waiting for this batch since the last one (or since prepare)
            s["idle_s" if s["batches"] else "wait_first_s"] += t0 - self._last_end
        s.setdefault("first_render", t0)
        (_, images), = list(r.render([list(indices)], _Rows(indices, params)))
        self._last_end = s["last_render"] = time.time()
        s["render_s"] += self._last_end - t0
        s["batches"] += 1
        self.busy_s += self._last_end - t0
        self._maybe_crash(job.get("fault"))
        return list(indices), images

    def stats(self) -> dict:
        """pid, batches of the current job, actors prepared here, busy seconds (all jobs), and `job`: the
        current job's prepare_s (preparing the actor, or installing the shipped one), wait_first_s
        (prepared -> first batch started), render_s (sum over its batches), idle_s (between batches:
        one batch done -> the next started), batches, first_render / last_render (epoch seconds)."""
        return dict(pid=os.getpid(), batches=self.batches, prepared=self.prepared, key=self.key, busy_s=self.busy_s,
                    job=dict(self.job_stats))

    # ------------------------------------------------------------------ internals
    def _install(self, job: dict):
        if self.key == job["key"]:
            return self.rendering
        import ray

        from retarget.run import Rendering, prepare_rendering, render_call

        def get(x):
            return ray.get(x) if isinstance(x, ray.ObjectRef) else x

        t0 = time.time()
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
        self._last_end = time.time()
        self.job_stats = dict(prepare_s=self._last_end - t0, wait_first_s=0.0, render_s=0.0, idle_s=0.0, batches=0)
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


def set_threads(n: int) -> None:
    """CPU threads of this process's host-side work (torch intra-op, OpenCV), for a GPU worker: Ray
    sets OMP_NUM_THREADS to the actor's num_cpus (1), which leaves torch one thread."""
    import torch

    torch.set_num_threads(n)
    try:
        import cv2

        cv2.setNumThreads(n)
    except ImportError:
        pass


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
