"""`RayPool`: the driver side. Connects to Ray, starts `FrameRenderer` actors, prepares each job's
actor once, and hands out batches of frame indices as actors free up (`ray.wait`), yielding the
frames as they arrive; `retarget.run` writes them into the work folder (no shared filesystem).

Faults: an actor that dies mid-batch is restarted by Ray (`max_restarts`) and its batch retried
(`max_task_retries`); once an actor is gone for good, its batches go to the others. Frames are
the single-process run's, bit for bit: every batch is the batch `retarget.run` asks for (the same
frames, so the same GEMM shapes), rendered by the same code on the same kind of device, and a
frame's noise depends only on (seed, frame index).
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from retarget.scale.options import RayOptions
from retarget.scale.timeline import Timeline

RAY_MISSING = "--ray needs Ray: pip install 'ray>=2.9' (or pip install 'retarget[ray]')"


def import_ray():
    try:
        import ray
    except ImportError:
        raise RetargetError(RAY_MISSING) from None
    return ray


def check_ray(address: str = "auto") -> None:
    """The synchronous part of connecting, cheap: Ray is installed, and unless this process is
    connected already, something answers at a HOST:PORT address (`_probe`). RetargetError if not."""
    import importlib.util

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    if importlib.util.find_spec("ray") is None:
        raise RetargetError(RAY_MISSING)
    if address not in ("auto", "local"):
        _probe(address)


def connect(address: str = "auto", *, probe: bool = True, **init) -> bool:
    """Connect this process to Ray (see RayOptions.address); True when this call started it.
    probe: check a HOST:PORT address with `_probe` first; init: more ray.init arguments (a runtime_env)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    target = None if address == "auto" else address
    if probe and target not in (None, "local"):
        _probe(target)
    if threading.current_thread() is not threading.main_thread():
        # Ray warns that it cannot set its SIGTERM handler off the main thread: the default one is fine.
        import logging

        logging.getLogger("ray._private.worker").addFilter(lambda r: "SIGTERM handler" not in r.getMessage())
    try:
        ray.init(**dict(dict(address=target, log_to_driver=False, include_dashboard=False, configure_logging=True,
                             logging_level="warning"), **init))
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RetargetError(f"--ray {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0]})") from None
    return True


def _probe(address: str, timeout: float = 5.0) -> None:
    """RetargetError unless something accepts TCP connections at HOST:PORT (Ray itself would
    retry a wrong address for minutes before failing)."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RetargetError(f"--ray {address}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RetargetError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or type(e).__name__}); "
                            f"start the head node with `ray start --head --port {port}`") from None


def unwrap(e: BaseException) -> BaseException:
    """The RetargetError inside a Ray task error, as a plain RetargetError (its own message, no
    remote traceback); other errors unchanged."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, RetargetError):
        return RetargetError(str(cause.args[0]) if cause.args else str(cause))
    return e


def load_key(layout, opts) -> tuple:
    """What fixes a loaded pipeline: weights folder (and --sd15 folder), device, dtype, LCM. Jobs with
    the same key share actors."""
    sd15 = str(Path(layout.sd15).resolve()) if getattr(layout, "sd15", None) else None
    return (str(Path(layout.root).resolve()), sd15, opts.device, opts.dtype, bool(opts.fast))


class RayPool:
    """Workers for jobs whose options share `load_key(layout, opts)`.

    Use as a context manager; `prepare` is the `prepare=` hook of `retarget.run.run`,
    `retarget.sheets.make_storyboard` and `make_transition`. Ray is connected and the actors are
    started by `start()`, `start_async()` (in a thread: the caller goes on with its own imports and
    tracking; errors surface at `prepare`) or the first `prepare`, so bad inputs can fail before any
    of it. `timeline`: wall-clock marks of the job (`timeline_report()`). `fault`: tests only, given to
    the jobs prepared from now on (see FrameRenderer).
    """

    def __init__(self, ray_opts: RayOptions, layout, opts, *, log=print, fault: dict | None = None):
        self.ray_opts, self.layout, self.key = ray_opts, layout, load_key(layout, opts)
        self.load = dict(device=opts.device, dtype=opts.dtype, fast=bool(opts.fast),
                         sd15=str(layout.sd15) if getattr(layout, "sd15", None) else None)
        self.log, self.fault = log, fault
        self.actors: list = []
        self.alive: set[int] = set()
        self.ready: dict[int, dict] = {}  # actor number -> its info()
        self._starting: dict = {}  # info() ref -> actor number
        self._started_ray = False
        self._asked: float | None = None  # time.time() when the actors were asked for
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._notes: list[str] = []  # lines of the start, logged from the caller's thread
        self.timeline = Timeline()
        self.deaths = 0

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors (frees their GPUs); disconnect if this pool connected."""
        if self._starter is not None:
            self._starter.join()  # a start still under way would leave its actors behind
        if not self.actors and not self._started_ray:
            return
        ray = import_ray()
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors, self.alive, self.ready, self._starting = [], set(), {}, {}
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def start(self) -> None:
        """Connect and start the workers (asynchronously: they load the engine while we go on)."""
        self.start_async()
        self._join_start()

    def start_async(self) -> None:
        """`start` in a thread: import Ray, connect, ask for the actors while the caller goes on. The
        cheap checks (Ray installed, a HOST:PORT that answers) run here first and raise at once."""
        if self._starter is not None or self.actors:
            return
        check_ray(self.ray_opts.address)
        self._starter = threading.Thread(target=self._start_in_thread, name="retarget-ray-start", daemon=True)
        self._starter.start()

    def _start_in_thread(self) -> None:
        try:
            self._start_now()
        except BaseException as e:  # raised again by _join_start, in the caller's thread
            self._start_error = e

    def _join_start(self) -> None:
        if self._starter is None:
            self.start_async()
        self._starter.join()
        for line in self._notes:
            self.log(line)
        self._notes = []
        if self._start_error is not None:
            raise self._start_error

    def _start_now(self) -> None:
        ray = import_ray()
        self.timeline.mark("ray_imported")
        self._started_ray = connect(self.ray_opts.address, probe=False)
        self.timeline.mark("connected")
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
        o = self.ray_opts
        load = dict(self.load)
        if gpus and self.load["device"] != "cpu":
            per = dict(num_gpus=1, num_cpus=1)
            n = o.workers or gpus
            # Host-side work (face alignment, per-batch copies) on more than Ray's one thread (see RayOptions).
            load["threads"] = o.worker_threads or max(1, min(4, cpus // gpus))
            where = f"{n} GPU worker(s) of {load['threads']} CPU thread(s) (the cluster has {gpus} GPUs)"
            if n > gpus:
                self._notes.append(f"warning: --ray-workers {n} but the cluster has {gpus} GPUs; "
                                   "the rest wait for GPUs")
        else:
            if self.load["device"] == "cuda":
                raise RetargetError("--device cuda: the Ray cluster has no GPU")
            cpw = o.cpus_per_worker or max(1, min(4, cpus))
            per = dict(num_cpus=cpw)
            n = o.workers or max(1, cpus // cpw)
            where = f"{n} CPU worker(s) of {cpw} CPU(s) (no GPU in the cluster)"
        from retarget.scale.actors import FrameRenderer

        remote = ray.remote(FrameRenderer).options(max_restarts=o.max_restarts, max_task_retries=o.max_restarts, **per)
        self._asked = time.time()
        self.timeline.mark("actors_asked", self._asked)
        self.actors = [remote.remote(str(self.layout.root), load) for _ in range(n)]
        self.alive = set(range(n))
        self._starting = {a.info.remote(): i for i, a in enumerate(self.actors)}
        self._notes.append(f"ray: {where}, actor state: {o.actor_state}")
        # The prepared Actor comes back pickled: unpickling it imports retarget.pipeline (torch,
        # diffusers, transformers: as long as the worker's own imports). Import it now, while the
        # workers start, not after the first one has prepared.
        importlib.import_module("retarget.pipeline")

        self.timeline.mark("driver_imported")

    def _wait_ready(self, need: int = 1) -> None:
        """Block until at least `need` workers have loaded (or every worker failed to)."""
        ray = import_ray()
        while len(self.ready) < need and self._starting:
            done, _ = ray.wait(list(self._starting), num_returns=1)
            self._settle_start(done[0])
        if not self.ready:
            raise RetargetError("no Ray worker could load the models (see the first error above)")

    def _settle_start(self, ref) -> None:
        ray = import_ray()
        i = self._starting.pop(ref)
        try:
            self.ready[i] = ray.get(ref)
            from retarget.scale.actors import start_breakdown

            steps = start_breakdown(self.ready[i]["marks"], self._asked)
            self.ready[i]["start"] = steps
            self.timeline.mark("worker_ready", self.ready[i]["marks"]["ready"])
            self.log(f"ray: worker {i} ready after {steps['total']:.1f}s ("
                     + ", ".join(f"{k} {v:.1f}s" for k, v in steps.items() if k != "total") + ")")
        except Exception as e:
            self.alive.discard(i)
            e = unwrap(e)
            if isinstance(e, RetargetError):
                raise e from None
            self.log(f"warning: Ray worker {i} failed to start: {type(e).__name__}: {str(e).splitlines()[0]}")

    # ------------------------------------------------------------------ the prepare= hook
    def prepare(self, layout, actor_path, opts, log, actor_rgb: np.ndarray | None = None):
        """`retarget.run.prepare_rendering`, with the pipeline on Ray workers: one worker prepares
        the actor (identity, reference latent, bank); the returned Rendering renders on all of them."""
        from retarget.run import Rendering, read_image, render_call, require_render_weights

        if load_key(layout, opts) != self.key:
            raise RetargetError("internal: this Ray pool was started for other weights/device/dtype/--fast")
        actor_rgb = read_image(actor_path, "actor photo") if actor_rgb is None else actor_rgb
        require_render_weights(layout, opts)
        self.timeline.new_job()
        self.timeline.mark("prepare_asked")
        self._join_start()
        ray = import_ray()
        self._wait_ready(1)
        first = min(self.ready)
        ship = self.ray_opts.actor_state == "ship"
        job = {"key": uuid.uuid4().hex, "opts": opts, "photo": [ray.put(np.ascontiguousarray(actor_rgb))],
               "state": None, "fault": self.fault}
        try:
            actor = ray.get(self.actors[first].prepare.remote(job, ship))
        except Exception as e:
            raise unwrap(e) from None
        if actor.face_report:
            log(actor.face_report)
        if ship:
            job["state"] = [ray.put(actor)]  # owned by the driver: outlives the worker that made it
        self.timeline.mark("prepare_done")
        info = self.ready[first]
        return Rendering(pipe=None, actor=actor, actor_rgb=actor_rgb, device=info["device"], dtype=info["dtype"],
                         call=render_call(opts), batch_size=info["auto_batch"],
                         render_batches=lambda batches, params: self.render_batches(job, batches, params))

    # ------------------------------------------------------------------ scheduling
    def render_batches(self, job: dict, batches: list[list[int]], params: np.ndarray):
        """Yield (indices, (B, H, W, 3) uint8) for every batch, in completion order. Each ready worker
        holds up to `in_flight` batches; a finished batch frees a slot for the next one."""
        ray = import_ray()
        from ray.exceptions import RayActorError

        queue = deque(list(b) for b in batches)
        pending: dict = {}  # ref -> (worker, indices)
        load = {i: 0 for i in range(len(self.actors))}

        def feed(i: int) -> None:
            while i in self.alive and i in self.ready and load[i] < self.ray_opts.in_flight and queue:
                idx = queue.popleft()
                ref = self.actors[i].render.remote(job, idx, np.ascontiguousarray(params[idx]))
                self.timeline.mark("first_batch_sent")
                pending[ref] = (i, idx)
                load[i] += 1

        for i in sorted(self.ready):
            feed(i)
        try:
            while queue or pending:
                waiting = list(pending) + list(self._starting)
                if not waiting:
                    raise RetargetError(f"every Ray worker died ({self.deaths} deaths); "
                                        "run again with --resume to render the missing frames")
                done, _ = ray.wait(waiting, num_returns=1)
                ref = done[0]
                if ref in self._starting:
                    i = self._starting[ref]
                    self._settle_start(ref)
                    feed(i)
                    continue
                i, idx = pending.pop(ref)
                load[i] -= 1
                try:
                    got_idx, images = ray.get(ref)
                except RayActorError as e:
                    # Ray has already restarted the worker and retried as often as allowed: it is gone.
                    self.deaths += 1
                    if i in self.alive:
                        self.alive.discard(i)
                        self.log(f"warning: Ray worker {i} died ({type(e).__name__}); "
                                 "its batches go to the other workers")
                    queue.appendleft(idx)
                    for j in sorted(self.ready):
                        feed(j)
                    continue
                except Exception as e:
                    raise unwrap(e) from None
                if list(got_idx) != list(idx):
                    raise RetargetError(f"internal: a Ray worker returned frames {got_idx} for {idx}")
                self.timeline.mark("first_frames_back")
                self.timeline.mark("last_frames_back", again=True)
                yield idx, images
                feed(i)
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:
                    pass

    def stats(self) -> list[dict]:
        """Per live worker: pid, batches rendered, actors prepared (tests and the benchmark)."""
        ray = import_ray()
        return ray.get([self.actors[i].stats.remote() for i in sorted(self.alive)])

    def timeline_report(self) -> dict:
        """`Timeline.report` with, per live worker, its start (`start_breakdown`), "ready" and the
        current job's stats (FrameRenderer.stats()["job"]); seconds since the driver process started."""
        workers = []
        alive = sorted(i for i in self.alive if i in self.ready)
        stats = dict(zip(alive, import_ray().get([self.actors[i].stats.remote() for i in alive]))) if alive else {}
        for i in alive:
            info = self.ready[i]
            workers.append(dict(worker=i, ready=info["marks"]["ready"], threads=info.get("threads"),
                                start={k: round(v, 3) for k, v in info.get("start", {}).items()},
                                **{k: round(v, 3) if isinstance(v, float) and k not in ("first_render", "last_render")
                                   else v for k, v in stats[i].get("job", {}).items()}))
        return self.timeline.report(workers)


def run_on_ray(drive, actor_path, out, options=None, ray_opts: RayOptions | None = None, *, weights=None, log=print,
               fault: dict | None = None):
    """`retarget.run.run` with the frames rendered by Ray workers; the same arguments and result."""
    from retarget.run import RunOptions, run
    from retarget.weights import WeightsLayout

    from retarget.run import check_output_name, read_image, require_render_weights

    t0 = time.time()
    opts = options or RunOptions()
    layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
    # The cheap checks of run() first, then the workers start loading while the driver tracks the clip.
    check_output_name(Path(out))
    if not Path(drive).exists():
        raise RetargetError(f"driving video {drive} does not exist")
    read_image(actor_path, "actor photo")
    require_render_weights(layout, opts)
    with RayPool(ray_opts or RayOptions(), layout, opts, log=log, fault=fault) as pool:
        pool.timeline.mark("run_on_ray", t0)
        # Ray's import, the connection and the actors' scheduling overlap the driver's imports and tracking.
        pool.start_async()
        pool.timeline.mark("run")
        return run(drive, actor_path, out, opts, weights=layout, log=log, prepare=pool.prepare)
