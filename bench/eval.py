"""Speed of `retarget eval` on the CPU: judged frames per second, end to end, and per judge.

    python bench/eval.py                  # 250 frames (10 s at 25 fps), 256 px, this CPU
    python bench/eval.py --frames 1000    # the issue's 1,000-frame clip
    python bench/eval.py --tiny           # seconds-long smoke run

Input: the sample driving clip (`retarget.samples`: the mirrored astronaut, a real face, moving
and opening its mouth), `--size` px square, judged against itself, so every output frame has a
face and every judge runs on every frame. Weights: the tiny set (`retarget weights tiny`); its
SMIRK encoder has the released architecture (the arithmetic does not depend on the values), its
ArcFace is a small stand-in (the released one is ~25x the work; ArcFace only runs with real weights
in practice). Variants, alternated `--repeat` times, medians reported:
- all: dlib identity (output every frame, driver every 10th), geometry, pose, LMD, flicker,
  SMIRK re-tracking of both clips, tiny ArcFace;
- no_identity: without dlib's descriptor (`--no-identity`);
- every5: all judges on every 5th frame (`--every 5`).
Per judge (ms a face, median of 20): dlib descriptor, HOG detection + 68 points, the tracker's
windowed re-find, SMIRK encoder at batch 16.

Writes bench/results/eval_cpu_<date>.json (or --out-dir) and prints a table.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_ms(fn, n: int = 20) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def per_judge(rgb: np.ndarray, smirk_path: Path, n: int) -> dict:
    import torch

    from retarget.evaluate.judges import DlibJudge
    from tracking.smirk import load_smirk_encoder
    from tracking.tracker import encoder_crop

    judge = DlibJudge()
    face = judge.face(rgb)
    enc = load_smirk_encoder(smirk_path, device="cpu", dtype=torch.float32)
    crops = np.stack([encoder_crop(rgb, face)] * 16)
    return {
        "dlib_descriptor_ms": _median_ms(lambda: judge.descriptor(rgb, face), n),
        "dlib_detect_68_ms": _median_ms(lambda: judge.backend.detect(rgb), n),
        "dlib_track_68_ms": _median_ms(lambda: judge.backend.track(rgb, face), n),
        "smirk_encode_ms_per_crop_b16": _median_ms(lambda: enc.encode(crops), max(3, n // 4)) / 16,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="25 frames at 128 px, once: a smoke run")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where SMIRK runs (dlib is CPU only)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.frames, args.size, args.repeat = 25, 128, 1

    import torch

    from render.storyboard import save_image
    from retarget.evaluate import EvalInputs, EvalOptions, evaluate
    from retarget.samples import sample_actor, write_sample_drive
    from retarget.tiny import write_tiny_weights

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = write_tiny_weights(tmp / "w")
        clip = write_sample_drive(tmp / "drive.mp4", seconds=args.frames / 25.0, fps=25.0, size=args.size)
        actor = tmp / "actor.png"
        save_image(actor, sample_actor())
        from render.video import open_video

        first = next(iter(open_video(clip))).rgb
        judges = per_judge(first, Path(weights) / "smirk" / "SMIRK_em1.pt", 5 if args.tiny else 20)
        dev = args.device
        variants = {"all": EvalOptions(device=dev), "no_identity": EvalOptions(identity=False, device=dev),
                    "every5": EvalOptions(every=5, device=dev)}
        runs: dict[str, list[float]] = {k: [] for k in variants}
        judged: dict[str, int] = {}
        for _ in range(args.repeat):
            for name, opts in variants.items():
                t0 = time.perf_counter()
                r = evaluate(EvalInputs(clip, clip, actor), opts, weights=weights, progress=False, log=None)
                runs[name].append(time.perf_counter() - t0)
                judged[name] = r.metrics["frames"]["judged"]

    import cv2
    import dlib

    result = {
        "environment": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": args.device,
                        "python": platform.python_version(), "torch": torch.__version__, "dlib": dlib.__version__,
                        "opencv": cv2.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine(),
                        "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg()[0]},
        "config": {"frames": args.frames, "size": args.size, "repeat": args.repeat, "tiny": args.tiny},
        "per_judge": judges,
        "whole": {name: {"seconds_median": statistics.median(t), "seconds": t, "output_frames": args.frames,
                         "judged_frames": judged[name],
                         "output_frames_per_s": args.frames / statistics.median(t),
                         "minutes_for_1000_frames": 1000 / (args.frames / statistics.median(t)) / 60}
                  for name, t in runs.items()},
        "note": "model loading included in every whole run; the driving clip is judged too (two faces a frame)",
    }
    print(f"retarget eval, CPU ({result['environment']['cpu_count']} cores), {args.frames} frames of {args.size} px")
    print(f"{'variant':<14}{'seconds':>10}{'out frames/s':>14}{'min / 1000 fr':>15}")
    for name, w in result["whole"].items():
        print(f"{name:<14}{w['seconds_median']:>10.1f}{w['output_frames_per_s']:>14.2f}{w['minutes_for_1000_frames']:>15.1f}")
    for k, v in judges.items():
        print(f"  {k:<32}{v:8.1f} ms")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"eval_{args.device}_{dt.date.today().isoformat()}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
