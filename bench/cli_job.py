"""One `retarget` command in a fresh process, as a user types it: bench/scale.py's cli_* variants.

    python bench/cli_job.py [--faces FACES.json] [--ray-address auto] -- run DRIVE ACTOR -o OUT ...

--faces replays the faces recorded by `bench/scale.py --make-inputs` (bench/replayed_faces.py: a GPU
host without dlib), in this process and, with --ray-address, in the Ray workers this job starts
(Ray's worker_process_setup_hook). --ray-address joins that running cluster first, as `retarget run
--ray` would, only with the replay hook in the job's runtime environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
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
        import ray

        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        runtime_env = {"env_vars": env}
        if args.faces:
            from bench import replayed_faces

            env[replayed_faces.ENV] = str(Path(args.faces).resolve())
            runtime_env["worker_process_setup_hook"] = "bench.replayed_faces.install_from_env"
        ray.init(address=args.ray_address, runtime_env=runtime_env, log_to_driver=False, include_dashboard=False,
                 logging_level="warning")
    report_from_inside()
    from retarget.cli import main as retarget_main

    return retarget_main(argv[k + 1:])


def report_from_inside() -> None:
    """Print what only the job's process knows, as `BENCH <name> <json>` lines for bench/scale.py:
    the run's stage times (RunSummary.stages, where present) and the Ray workers' busy seconds."""
    import json

    from retarget.run import RunSummary
    from retarget.scale.pool import RayPool

    print("BENCH host " + json.dumps(dict(load_average_at_start=os.getloadavg()[0])), flush=True)

    line = RunSummary.line

    def line_with_stages(self):
        print("BENCH stages " + json.dumps(getattr(self, "stages", None) or {}), flush=True)
        return line(self)

    RunSummary.line = line_with_stages
    close = RayPool.close

    def close_with_stats(self):
        if self.actors:
            try:
                print("BENCH workers " + json.dumps(self.stats()), flush=True)
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
