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
    from retarget.cli import main as retarget_main

    return retarget_main(argv[k + 1:])


if __name__ == "__main__":
    sys.exit(main())
