"""One `retarget` command in a fresh process, as a user types it: bench/scale.py's cli_* variants.

    python bench/cli_job.py [--faces FACES.json] [--ray-address auto] -- run DRIVE ACTOR -o OUT ...

--faces replays the faces recorded by `bench/scale.py --make-inputs` (bench/replayed_faces.py: a GPU
host without dlib), in this process and, with --ray-address, in the Ray workers this job starts
(Ray's worker_process_setup_hook). --ray-address: the cluster `retarget run --ray` joins (its
connect, in the pool's start thread as without this script, is given the replay hook's runtime
environment and this address).

Prints `BENCH <name> <json>` lines: host, stages (RunSummary.stages), workers (their stats),
worker-ready, timeline (RayPool.timeline_report(): the Ray job's marks, seconds since this process
started) and process (time.time() of: process start, main() entered, run() entered and returned, exit).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    marks = {"main": time.time()}
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: cli_job.py [--faces F] [--ray-address A] -- RETARGET-ARGS...")
    k = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", default=None)
    ap.add_argument("--ray-address", default=None)
    args = ap.parse_args(argv[:k])
    if args.faces:
        from bench import replayed_faces

        replayed_faces.install(args.faces)
    if args.ray_address:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        runtime_env = {"env_vars": env}
        if args.faces:
            from bench import replayed_faces

            env[replayed_faces.ENV] = str(Path(args.faces).resolve())
            runtime_env["worker_process_setup_hook"] = "bench.replayed_faces.install_from_env"
        join_with(args.ray_address, runtime_env)
    report_from_inside(marks)
    from retarget.cli import main as retarget_main

    try:
        return retarget_main(argv[k + 1:])
    finally:
        import json

        from retarget.scale.timeline import driver_start

        marks["exit"] = time.time()
        print("BENCH process " + json.dumps(dict(process_start=driver_start(), **marks)), flush=True)


def join_with(address: str, runtime_env: dict) -> None:
    """Have `retarget run --ray` connect to `address` with `runtime_env` (where and when it connects
    stay its own: in the pool's start thread, after the cheap checks)."""
    import threading

    from retarget.scale import pool

    def connect(_address="auto", *, probe=True, **_init) -> bool:
        ray = pool.import_ray()
        if ray.is_initialized():
            return False
        if threading.current_thread() is not threading.main_thread():
            import logging

            logging.getLogger("ray._private.worker").addFilter(lambda r: "SIGTERM handler" not in r.getMessage())
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, include_dashboard=False,
                 logging_level="warning")
        return True

    pool.connect = connect


def report_from_inside(marks: dict) -> None:
    """Print what only the job's process knows, as `BENCH <name> <json>` lines for bench/scale.py:
    the run's stage times (RunSummary.stages, where present), the Ray workers' busy seconds and the
    Ray job's timeline; `marks` gets run()'s entry and return times."""
    import json

    import retarget.run
    from retarget.run import RunSummary
    from retarget.scale.pool import RayPool

    run = retarget.run.run

    def timed_run(*a, **kw):  # the CLI and run_on_ray import run() when called: they get this one
        marks["run_start"] = time.time()
        try:
            return run(*a, **kw)
        finally:
            marks["run_end"] = time.time()

    retarget.run.run = timed_run

    print("BENCH host " + json.dumps(dict(load_average_at_start=os.getloadavg()[0])), flush=True)

    line = RunSummary.line

    def line_with_stages(self):
        print("BENCH stages " + json.dumps(getattr(self, "stages", None) or {}), flush=True)
        return line(self)

    RunSummary.line = line_with_stages
    close = RayPool.close

    def close_with_stats(self):
        if self._starter is not None:
            self._starter.join()
        if self.actors:
            try:
                print("BENCH workers " + json.dumps(self.stats()), flush=True)
                print("BENCH timeline " + json.dumps(self.timeline_report()), flush=True)
            except Exception as e:  # a dead worker: the figures are lost, not the job
                print(f"BENCH workers-error {json.dumps(str(e)[:200])}", flush=True)
        close(self)

    RayPool.close = close_with_stats
    settle = RayPool._settle_start

    def settle_with_load(self, ref):
        i = self._starting.get(ref)
        settle(self, ref)
        if i in self.ready:
            print("BENCH worker-ready " + json.dumps(dict(load_average=self.ready[i].get("load_average"),
                                                          start=self.ready[i].get("start"))), flush=True)

    RayPool._settle_start = settle_with_load


if __name__ == "__main__":
    sys.exit(main())
