"""Long clips: peak host memory and work-folder disk use of `retarget run` against clip length.

    python bench/longclip.py                       # 1, 5 and 10 minutes of 1080p at --fps 2
    python bench/longclip.py --minutes 1 5 10 --fps 25 --device cuda --weights DIR   # a GPU host
    python bench/longclip.py --tiny                # seconds-long smoke run (CPU, tiny weights)

Input: a generated 1920x1080 H.264 clip with AAC audio, the sample driving performance
(skimage's astronaut: a real face, mirrored, turning, mouth opening) 360 px tall drifting
across a grey gradient. Each length is rendered end to end (track, identity, render, paste
back, write with audio) by `retarget.run.run` in its own child process, so that its peak
resident set size (VmHWM: the child's own high-water mark since exec; workers' ru_maxrss
apart) is its own. The work folder is kept and measured (`du`), then deleted. Alongside: the
free-space estimate the run checked before starting (`retarget.diskspace`), and the output
file's size.

The claim tested: peak host memory is flat in the clip's length (frames stream from the
decoder to the work folder and from it to the encoder; only the (T, 55) parameters grow with T).
Tiny weights by default (64 px faces, meaningless pixels, the same code path); frames per
second of the clip is a parameter because a 2-core CPU tracks 1080p at ~10-30 frames/s.

Writes bench/results/longclip_<device>_<date>.json (or --out-dir) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_clip(path: Path, seconds: float, fps: float, size=(1920, 1080)) -> Path:
    """The sample performance (360 px) moving over a 1080p gradient, with the sample tone."""
    from render.video import VideoWriter
    from retarget.samples import sample_driving_frames, write_tone

    w, h = size
    background = np.empty((h, w, 3), np.uint8)
    background[:] = np.linspace(60, 190, w, dtype=np.float32).astype(np.uint8)[None, :, None]
    face = 360
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "tone.wav"
        write_tone(wav, seconds)
        with VideoWriter(path, fps, audio_from=wav, crf=23) as writer:
            for k, (t, frame) in enumerate(sample_driving_frames(seconds, fps, face)):
                x = int((w - face) * (0.5 + 0.4 * np.sin(2 * np.pi * t / 37.0)))
                y = int((h - face) * (0.5 + 0.3 * np.sin(2 * np.pi * t / 23.0)))
                canvas = background.copy()
                canvas[y:y + face, x:x + face] = frame
                writer.write(canvas)
    return path


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child(spec: dict) -> dict:
    """One render in this process; returns its measurements."""
    from render.video import open_video
    from retarget.diskspace import estimate_run_bytes
    from retarget.run import RunOptions, expected_frames, output_size, read_image, run

    drive, actor, out = Path(spec["drive"]), Path(spec["actor"]), Path(spec["out"])
    opts = RunOptions(steps=spec["steps"], batch=spec["batch"], device=spec["device"], keep_work=True)
    reader = open_video(drive)
    est = estimate_run_bytes(expected_frames(reader, opts), crop_size=512,
                             out_size=output_size(read_image(actor), opts), work=out.parent / f".{out.name}.work", out=out)
    t0 = time.perf_counter()
    summary = run(drive, actor, out, opts, weights=spec["weights"], log=lambda *_: None)
    seconds = time.perf_counter() - t0
    work = out.parent / f".{out.name}.work"
    # VmHWM, not ru_maxrss: Linux folds the pre-exec (forked, i.e. the parent's) peak into a
    # child's ru_maxrss, which made the first version of this script report the parent's growth.
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # worker processes, if any started
    return dict(frames=summary.frames, seconds=round(seconds, 1), frames_per_s=round(summary.frames / seconds, 2),
                peak_rss_mb=round(hwm_kb / 1024, 1), workers_peak_rss_mb=round(kids_kb / 1024, 1),
                work_folder_mb=round(_du(work) / 2**20, 1), output_mb=round(out.stat().st_size / 2**20, 2),
                estimated_need_mb=round(sum(est.values()) / 2**20, 1),
                invalid_frames=summary.invalid_frames)


def environment(device: str) -> dict:
    import torch

    env = dict(date=dt.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
               cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), device=device)
    try:
        env["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 5, 10], help="clip lengths (default: 1 5 10)")
    ap.add_argument("--fps", type=float, default=2.0, help="clip frame rate (default: 2, what 2 CPU cores manage)")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps (default: 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--weights", default=None, help="weights folder (default: a tiny random set)")
    ap.add_argument("--tiny", action="store_true", help="smoke run: 0.1, 0.3 and 0.6 minutes at 2 fps")
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--work-dir", default=None, help="where clips and renders go (default: a temporary folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return 0
    minutes = [0.1, 0.3, 0.6] if args.tiny else args.minutes

    from retarget.diskspace import check_free_space, format_bytes
    from render.storyboard import save_image
    from retarget.samples import sample_actor
    from retarget.tiny import write_tiny_weights

    root = Path(args.work_dir or tempfile.mkdtemp(prefix="longclip-"))
    root.mkdir(parents=True, exist_ok=True)
    # The biggest clip and its render must fit: ~0.1 MB a 1080p frame at CRF 23 (generous), plus the render.
    biggest = int(max(minutes) * 60 * args.fps)
    check_free_space({root: biggest * (2 << 20)}, "the benchmark's clips")
    weights = args.weights or str(write_tiny_weights(root / "tiny-weights"))
    actor = root / "actor.png"
    save_image(actor, sample_actor())
    rows = []
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    name = f"longclip_{args.device}_{env['date']}{'_tiny' if args.tiny else ''}.json"

    def save() -> None:  # after every length, so a run cut short still leaves what it measured
        peaks = [r["peak_rss_mb"] for r in rows]
        growth = (peaks[-1] - peaks[0]) / max(1, rows[-1]["frames"] - rows[0]["frames"]) * 1024
        result = dict(environment=env, config=dict(minutes=minutes, fps=args.fps, steps=args.steps, batch=args.batch,
                                                   weights="tiny random" if not args.weights else args.weights,
                                                   resolution="1920x1080"),
                      rows=rows, peak_rss_growth_kb_per_frame=round(growth, 2))
        (out_dir / name).write_text(json.dumps(result, indent=1))

    try:
        for m in minutes:
            t0 = time.perf_counter()
            drive = make_clip(root / f"drive_{m:g}min.mp4", m * 60, args.fps)
            made = time.perf_counter() - t0
            spec = dict(drive=str(drive), actor=str(actor), out=str(root / f"out_{m:g}min.mp4"), steps=args.steps,
                        batch=args.batch, device=args.device, weights=weights)
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                               env=env)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode != 0 or line is None:
                print(r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the {m:g}-minute run failed")
            row = dict(minutes=m, clip_fps=args.fps, clip_mb=round(drive.stat().st_size / 2**20, 1),
                       clip_seconds_to_make=round(made, 1), **json.loads(line[len("RESULT "):]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
            drive.unlink()
            shutil.rmtree(root / f".out_{m:g}min.mp4.work", ignore_errors=True)
            (root / f"out_{m:g}min.mp4").unlink(missing_ok=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)

    head = ("minutes", "frames", "seconds", "frames/s", "peak RSS MB", "work MB", "estimate MB", "output MB")
    keys = ("minutes", "frames", "seconds", "frames_per_s", "peak_rss_mb", "work_folder_mb", "estimated_need_mb",
            "output_mb")
    print("  ".join(f"{h:>12}" for h in head))
    for row in rows:
        print("  ".join(f"{row[k]:>12}" for k in keys))
    peaks = [r["peak_rss_mb"] for r in rows]
    growth = (peaks[-1] - peaks[0]) / max(1, rows[-1]["frames"] - rows[0]["frames"]) * 1024
    print(f"peak RSS from the shortest to the longest clip: {peaks[0]} -> {peaks[-1]} MB "
          f"({growth:.1f} KB per extra frame); free-space check: {format_bytes(shutil.disk_usage(root.parent).free)} "
          "free where the clips went")
    print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
