"""Training speed and memory on full-size random weights (SD 1.5 UNet, SD VAE, CLIP-L, the adapters of
bench/pipeline.py): optimizer steps per second and peak GPU memory per training mode and variant, 512 px,
batch 8. Random weights cost what trained ones cost: the arithmetic does not depend on the values.

    python bench/train.py             # GPU: table + bench/results/train_<gpu>_<date>.json
    python bench/train.py --tiny      # CPU smoke run on the tiny configs (seconds per variant)
    python bench/train.py --modes reference   # one mode: bench/results/train_<gpu>_<date>_reference.json

Each (mode, variant) runs in its own process (fresh accelerate state, clean peak memory), through the same
functions as `retarget train` (`loop.prepare_model`, `loop.train_step`, `model.Objective`), on synthetic
batches (random 512x512 crops, unit ArcFace vectors from a pool of 32 identities, SMIRK-range expressions),
so data loading (PNG decoding) is excluded:

    fp16          mixed precision fp16 (the GPU default)
    fp16_gc       fp16 + gradient checkpointing
    bf16          mixed precision bf16
    fp16_adam8    fp16 + 8-bit AdamW (bitsandbytes; reported as skipped when it is not installed)
    fp32          no mixed precision (the CPU default; --tiny runs this one only)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "fp16": dict(mixed_precision="fp16"),
    "fp16_gc": dict(mixed_precision="fp16", gradient_checkpointing=True),
    "bf16": dict(mixed_precision="bf16"),
    "fp16_adam8": dict(mixed_precision="fp16", adam8bit=True),
    "fp32": dict(mixed_precision="no"),
}
MODES = ("expression", "reference")
# Identities come from a pool, as items repeat over a dataset's epochs: the loop caches each item's prompt
# embedding (one text-encoder row per item, computed once), so the steady state runs no text encoder.
ID_POOL = 32


def _bench_pipeline():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_batch(mode: str, batch: int, size: int, start: int, rng: np.random.Generator) -> dict:
    """A batch in `model.collate`'s layout with random content (identities from a fixed pool of ID_POOL)."""
    pool = np.random.default_rng(1).standard_normal((ID_POOL, 512)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    who = rng.integers(0, ID_POOL, batch)
    out = {"target": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
           "arcface": pool[who], "id_index": who,
           "exp": (rng.standard_normal((batch, 55)) * 0.8).astype(np.float32),
           "positions": list(range(start, start + batch))}
    if mode == "reference":
        out["reference"] = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return out


def run_one(mode: str, variant: str, tiny: bool, batch: int, steps: int, warmup: int) -> dict:
    """One (mode, variant) in this process: build, warm up, time `steps` optimizer steps."""
    import torch
    from accelerate import Accelerator

    from retarget.tiny import exp_adapter_state_dict
    from retarget.train.loop import prepare_model, train_step
    from retarget.train.model import Objective, training_model
    from retarget.train.options import TrainOptions

    opts = TrainOptions(batch_size=batch, **VARIANTS[variant])
    if opts.adam8bit and importlib.util.find_spec("bitsandbytes") is None:
        return {"mode": mode, "variant": variant, "skipped": "bitsandbytes not installed"}
    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    bp = _bench_pipeline()
    pipe = bp.build(torch.device("cpu") if not cuda else device, torch.float32, tiny)
    exp_proj = exp_adapter_state_dict(pipe.unet, "linear")["image_proj"]  # the file naming of build()'s adapter
    model = training_model(pipe, mode, exp_proj)
    accelerator = Accelerator(mixed_precision=opts.mixed_precision, cpu=not cuda)
    unet, optimizer, params = prepare_model(model, accelerator, opts)
    objective = Objective(model, seed=0)
    size = pipe.image_size
    rng = np.random.default_rng(0)
    pos = [0]

    def step():
        def batch_for(_):
            b = synthetic_batch(mode, batch, size, pos[0], rng)
            pos[0] += batch
            return b
        return train_step(accelerator, unet, objective, optimizer, params, batch_for, 1, opts.max_grad_norm)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {"mode": mode, "variant": variant, "batch": batch, "size": size, "steps_timed": steps,
            "s_per_step_median": med, "steps_per_s": 1.0 / med, "images_per_s": batch / med,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "trainable_params": int(sum(p.numel() for p in params)), "loss_last": losses[-1],
            "loss_finite": bool(np.isfinite(losses).all())}


def environment(tiny: bool) -> dict:
    import diffusers
    import torch

    import accelerate

    cuda = torch.cuda.is_available() and not tiny
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    return {"gpu": gpu, "device": "cuda" if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "date": dt.date.today().isoformat(), "tiny": tiny}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny configs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 1 with --tiny)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} (default: all but "
                                                      "fp32 on GPU; fp32 with --tiny)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "VARIANT"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], args.one[1], args.tiny, args.batch, steps, warmup)))
        return 0
    variants = args.variants.split(",") if args.variants else (["fp32"] if args.tiny else
                                                               ["fp16", "fp16_gc", "bf16", "fp16_adam8"])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: {unknown} not among {', '.join(VARIANTS)}")
    env = environment(args.tiny)
    print(f"device {env['gpu']}, torch {env['torch']}, diffusers {env['diffusers']}, accelerate {env['accelerate']}; "
          f"batch {args.batch}, {steps} timed steps after {warmup}")
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            ap.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
        for variant in variants:
            cmd = [sys.executable, __file__, "--one", mode, variant, "--batch", str(args.batch), "--steps", str(steps),
                   "--warmup", str(warmup)] + (["--tiny"] if args.tiny else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"mode": mode, "variant": variant, "error": err[:300]}
            else:
                row = json.loads(line[7:])
            rows.append(row)
            if "s_per_step_median" in row:
                mem = f"{row['peak_gb']:.1f} GB" if row["peak_gb"] is not None else "-"
                print(f"{mode:11s} {variant:11s} {row['steps_per_s']:7.2f} steps/s  {row['images_per_s']:7.1f} img/s  "
                      f"peak {mem}  ({row['size']} px, batch {row['batch']}, loss finite {row['loss_finite']})")
            else:
                print(f"{mode:11s} {variant:11s} {row.get('skipped') or 'ERROR ' + row.get('error', '')}")
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "tiny_cpu" if args.tiny else re.sub(r"[^A-Za-z0-9]+", "_", env["gpu"]).strip("_")
    modes = args.modes.split(",")
    part = "" if sorted(modes) == sorted(MODES) else "_" + "_".join(modes)  # one file per subset run
    path = out_dir / f"train_{tag}_{env['date']}{part}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
