"""Speed of a trimmed `retarget run --start/--end`: tracking only the range (now) against
tracking the whole clip and cutting (before), and what the whole job costs each way.

    python bench/trimmed.py                            # the issue's case: a 33.6 s clip at 30 fps, tiny weights, CPU
    python bench/trimmed.py --tiny                     # seconds-long smoke run
    python bench/trimmed.py --device cuda --weights W  # a GPU machine, a full-size (random) weight set in W

Input: the sample driving performance (retarget.samples: the astronaut moving, the mouth
opening once a second) of --seconds at --fps, --size pixels square, H.264 as `VideoWriter`
writes it (libx264, keyframe every 250 frames, so a seek lands up to 8 s before the range).
Measured, each variant in turn, --repeats times (medians reported):
- track_whole: `track_video` on the whole clip, what `run --end 2` tracked before;
- track_<a>-<b>: `track_range(clip, a, b)`, what it tracks now (frames decoded and tracked
  from the tracker's stats);
- run_<a>-<b>: `retarget.run.run` with --start a --end b, end to end (model loading, tracking
  the range, rendering, writing), and its summary line;
- before_<a>-<b>: track_whole + a run with that whole-clip track (`--track`), the old job.
Writes bench/results/trimmed_<device>_<date>.json (or --out-dir) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def environment(device: str) -> dict:
    import av
    import torch

    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
           "python": platform.python_version(), "torch": torch.__version__, "av": av.__version__,
           "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
           "load_avg_at_start": os.getloadavg()[0]}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=33.6)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--ranges", default="0-2,30-32", help="START-END pairs in seconds, comma separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="denoising steps of the runs (rendering costs the same "
                    "both ways; few steps keep the CPU run short)")
    ap.add_argument("--batch", type=int, default=8, help="frames per render batch")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--weights", default=None, help="weight folder (default: a tiny set written here)")
    ap.add_argument("--tiny", action="store_true", help="a 6 s clip, one repeat, 2 steps: a smoke run")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.tiny:
        args.seconds, args.fps, args.size, args.ranges, args.repeats, args.steps = 6.0, 25.0, 128, "0-1,4-5", 1, 2

    from render.storyboard import save_image
    from retarget.run import RunOptions, run
    from retarget.samples import sample_actor, write_sample_drive
    from retarget.tiny import write_tiny_weights
    from tracking.tracker import TrackOptions, track_range, track_video

    ranges = [tuple(float(v) for v in r.split("-")) for r in args.ranges.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-trimmed-"))
    weights = Path(args.weights) if args.weights else write_tiny_weights(tmp / "weights")
    t0 = time.perf_counter()
    clip = write_sample_drive(tmp / "drive.mp4", seconds=args.seconds, fps=args.fps, size=args.size)
    print(f"clip: {args.seconds} s at {args.fps} fps, {args.size}px, written in {time.perf_counter() - t0:.1f}s")
    actor = tmp / "actor.png"
    save_image(actor, sample_actor())
    smirk = weights / "smirk" / "SMIRK_em1.pt"
    env = environment(args.device)
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    info: dict[str, dict] = {}

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        times.setdefault(name, []).append(time.perf_counter() - t)
        cpu.setdefault(name, []).append(time.process_time() - c)
        print(f"  {name}: {times[name][-1]:.1f}s wall, {cpu[name][-1]:.1f}s cpu", flush=True)
        return value

    quiet = lambda *_: None  # noqa: E731
    topts = TrackOptions(device=args.device)
    whole_file = tmp / "whole.track.npz"
    for rep in range(args.repeats):
        stats: dict = {}
        whole = timed("track_whole", lambda: track_video(clip, smirk_path=smirk, options=topts, progress=False,
                                                         stats=stats))
        whole.save(whole_file)
        info["track_whole"] = dict(stats, frames=len(whole))
        for a, b in ranges:
            key = f"{a:g}-{b:g}"
            stats = {}
            part = timed(f"track_{key}", lambda: track_range(clip, a, b, smirk_path=smirk, options=topts,
                                                             stats=stats))
            info[f"track_{key}"] = dict(stats, frames=len(part))
            common = dict(steps=args.steps, batch=args.batch, device=args.device, start=a, end=b)
            summary = timed(f"run_{key}", lambda: run(clip, actor, tmp / f"now{rep}.mp4", RunOptions(**common),
                                                      weights=weights, log=quiet))
            info[f"run_{key}"] = {"line": summary.line(), "frames": summary.frames, "tracked": summary.tracked}
            old = timed(f"render_{key}", lambda: run(clip, actor, tmp / f"old{rep}.mp4",
                                                     RunOptions(track=str(whole_file), **common),
                                                     weights=weights, log=quiet))
            info[f"before_{key}"] = {"frames": old.frames, "tracked": len(whole)}
        print(f"repeat {rep + 1}/{args.repeats} done")

    # Wall time, and this process's CPU time (all its threads), which moves less when other
    # work shares the machine (the load average is recorded).
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for m in (med, med_cpu):
        for a, b in ranges:
            key = f"{a:g}-{b:g}"
            m[f"before_{key}"] = m["track_whole"] + m.pop(f"render_{key}")
    env["load_avg_at_end"] = os.getloadavg()[0]
    rows = []
    print(f"\n{'variant':<16} {'wall s':>8} {'cpu s':>8} {'frames tracked':>15} {'decoded':>8}")
    for name, sec in med.items():
        i = info.get(name, {})
        tracked = i.get("frames_tracked", i.get("tracked", ""))
        rows.append({"variant": name, "median_s": sec, "median_cpu_s": med_cpu[name], **i})
        print(f"{name:<16} {sec:8.2f} {med_cpu[name]:8.2f} {tracked!s:>15} {i.get('frames_decoded', '')!s:>8}")
    for a, b in ranges:
        key = f"{a:g}-{b:g}"
        print(f"--start {a:g} --end {b:g}: job {med[f'before_{key}']:.1f}s before, {med[f'run_{key}']:.1f}s now "
              f"({med[f'before_{key}'] / med[f'run_{key}']:.1f}x wall, "
              f"{med_cpu[f'before_{key}'] / med_cpu[f'run_{key}']:.1f}x cpu)")
    result = {"environment": env, "config": {k: getattr(args, k) for k in
                                             ("seconds", "fps", "size", "ranges", "repeats", "steps", "batch",
                                              "tiny")},
              "weights": "given" if args.weights else "tiny (random, retarget.tiny)",
              "raw_seconds": times, "raw_cpu_seconds": cpu, "results": rows}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.device + ("_tiny" if args.tiny else "")
    out = out_dir / f"trimmed_{tag}_{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
