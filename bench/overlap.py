"""Whole-job seconds of `retarget run` with its stages one after the other (a source tree from
before retarget/overlap.py) and overlapped (this tree), on the CPU with the tiny weights, where
writing dominates: a longer sample clip, tracked in the job, pasted back into a 1080p photo.

    python bench/overlap.py --before /tmp/retarget-main     # a checkout of the commit before
    python bench/overlap.py --before DIR --seconds 6 --repeat 3
    OMP_NUM_THREADS=1 python bench/overlap.py --before DIR --frames-dir   # render on one core, as a GPU
                                                   # leaves the cores to the writer

Each variant runs in its own process (PYTHONPATH = its tree; import time not counted: the
figure is `RunSummary.seconds`, the job itself), alternating, --repeat times; the table gives
the median and each run's stages (this tree only: RunSummary.stages). The GPU figures come
from bench/run.py. Writes bench/results/overlap_cpu_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))  # before bench/ itself: bench/tracking.py is not the package

JOB = r"""
import json, sys, time
from pathlib import Path
from retarget.run import RunOptions, run
drive, actor, weights, out = sys.argv[1:5]
opts = RunOptions(steps=2, batch=4, device="cpu", frames_dir=sys.argv[5] or None)
s = run(drive, actor, out, opts, weights=weights, log=lambda *_: None)
print(json.dumps({"seconds": s.seconds, "frames": s.frames, "stages": getattr(s, "stages", None)}))
"""


def make_inputs(root: Path, seconds: float) -> tuple[Path, Path, Path]:
    import cv2
    import numpy as np

    from render.storyboard import save_image
    from retarget.samples import sample_actor, write_sample_drive
    from retarget.tiny import write_tiny_weights

    drive = write_sample_drive(root / "drive.mp4", seconds=seconds, fps=25.0, size=256)
    face = cv2.resize(sample_actor(), (1080, 1080), interpolation=cv2.INTER_CUBIC)
    photo = np.pad(face, ((0, 0), (420, 420), (0, 0)), mode="edge")  # 1920x1080
    actor = root / "actor_1080p.png"
    save_image(actor, np.ascontiguousarray(photo))
    weights = root / "weights"
    write_tiny_weights(weights)
    return drive, actor, weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="source tree of the serial version (e.g. git archive of main)")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of the sample clip (25 fps)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--frames-dir", action="store_true", help="also write --frames-dir (1080p PNGs)")
    a = ap.parse_args(argv)
    trees = {"serial": Path(a.before).resolve(), "overlapped": HERE}
    results: dict[str, list] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        drive, actor, weights = make_inputs(root, a.seconds)
        for r in range(a.repeat):
            for name, tree in trees.items():
                out = root / f"{name}{r}.mp4"
                frames = str(root / f"{name}{r}.frames") if a.frames_dir else ""
                env = {**os.environ, "PYTHONPATH": str(tree)}
                p = subprocess.run([sys.executable, "-c", JOB, str(drive), str(actor), str(weights), str(out), frames],
                                   capture_output=True, text=True, env=env, cwd=tree)
                if p.returncode:
                    print(p.stderr[-3000:], file=sys.stderr)
                    return 1
                results[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
                print(f"{name:11s} run {r + 1}: {results[name][-1]['seconds']:.1f} s", flush=True)
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    frames = results["overlapped"][0]["frames"]
    print(f"\n{frames} frames, tiny weights, CPU ({os.cpu_count()} cores), 1080p paste-back"
          f"{', --frames-dir' if a.frames_dir else ''}; median of {a.repeat}")
    print(f"{'variant':12s} {'job s':>8s} {'frames/s':>9s}")
    for k, s in med.items():
        print(f"{k:12s} {s:8.1f} {frames / s:9.2f}")
    print(f"speed-up: {med['serial'] / med['overlapped']:.2f}x")
    stages = results["overlapped"][len(results["overlapped"]) // 2]["stages"]
    print("overlapped stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    out = HERE / "bench" / "results" / f"overlap_cpu_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
        "clip_seconds": a.seconds, "frames": frames, "photo": "1920x1080", "frames_dir": a.frames_dir,
        "steps": 2, "batch": 4, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "median_s": med,
        "runs": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
