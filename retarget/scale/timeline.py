"""Where a Ray job's time goes, on one clock: wall-clock marks (time.time()) of the driver's steps and
the workers' own figures, reported as seconds since the driver's process started.

`RayPool.timeline` holds a `Timeline`; `RayPool.timeline_report()` adds the workers' start marks and
per-job stats (prepare, render, idle seconds). bench/cli_job.py prints it as `BENCH timeline {json}`
and bench/scale.py puts it beside the direct run's stages.
"""

from __future__ import annotations

import time

# The driver's marks, in the order a job passes them. Within each chain a mark is never earlier than
# the one before it (CHAINS): (ray imported, connected, actors asked), (prepare asked, prepare done,
# first batch sent, first frames back, last frames back). "worker ready" (the first worker's own
# mark) and "driver imported" (the driver has imported what unpickling the prepared actor needs) are
# after "actors asked" and before "prepare done"; "run" (run() called) is where the driver's own work
# starts, the background start overlapping it.
MARKS = ("run_on_ray", "ray_imported", "connected", "actors_asked", "driver_imported", "run", "prepare_asked",
         "worker_ready", "prepare_done", "first_batch_sent", "first_frames_back", "last_frames_back")
CHAINS = (("run_on_ray", "ray_imported", "connected", "actors_asked", "worker_ready", "prepare_done"),
          ("actors_asked", "driver_imported", "prepare_done"),
          ("run_on_ray", "run", "prepare_asked", "prepare_done", "first_batch_sent", "first_frames_back",
           "last_frames_back"))
JOB_MARKS = ("prepare_asked", "prepare_done", "first_batch_sent", "first_frames_back", "last_frames_back")


def process_start_time() -> float | None:
    """When this process started (seconds since the epoch): from /proc (to 10 ms: its start in clock
    ticks after boot, against /proc/uptime), else psutil (on Linux it rounds the boot time to the
    second), else None."""
    try:
        import os

        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except Exception:
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return None


_FIRST_IMPORT = time.time()


def driver_start() -> float:
    """This process's start, else the first import of this module."""
    return process_start_time() or _FIRST_IMPORT


class Timeline:
    """Wall-clock marks by name. `mark` keeps the first time a name is marked unless `again`."""

    def __init__(self):
        self.origin = driver_start()
        self.marks: dict[str, float] = {}

    def mark(self, name: str, t: float | None = None, *, again: bool = False) -> None:
        if again or name not in self.marks:
            self.marks[name] = time.time() if t is None else t

    def new_job(self) -> None:
        """Forget the previous job's marks (a pool serves several jobs in `retarget batch`)."""
        for name in JOB_MARKS:
            self.marks.pop(name, None)

    def report(self, workers: list[dict] | None = None) -> dict:
        """{"process_start": epoch, "marks": {name: s since process start, in MARKS order},
        "workers": [...]}: worker figures with their epoch times made relative the same way."""
        rel = {k: round(self.marks[k] - self.origin, 3) for k in MARKS if k in self.marks}
        out = []
        for w in workers or []:
            w = dict(w)
            for k in ("ready", "first_render", "last_render"):
                if w.get(k) is not None:
                    w[k] = round(w[k] - self.origin, 3)
            out.append(w)
        return {"process_start": self.origin, "marks": rel, "workers": out}
