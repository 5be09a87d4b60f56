"""torch.compile where it pays (retarget/compiling.py): eager vs compiled speed, cold vs warm compile time,
the padded last batch, in one run on full-size random weights in the real architectures (bench/pipeline.py's
`build`: SD 1.5 UNet, VAE, CLIP-L, adapters and LoRAs at the release's sizes).

    python bench/compile.py            # GPU, fp16, B=32: table + bench/results/compile_<gpu>_<date>.json
    python bench/compile.py --tiny     # CPU smoke run on the tiny weights (aot_eager, quality mode only)
    python bench/compile.py --tiny --backend inductor   # the same with inductor's C++ compile (an idle CPU)

Three fresh subprocesses share one compile folder (retarget.compiling.CompileCache, the code `retarget run`
uses, with its padded batches):

    cold      empty folder: per mode, eager ms/frame (median of --repeat calls at --steps), then the compile
              (first compiled call minus a steady one of the same shape) and compiled ms/frame; then a clip of
              B + 5 frames (tiny B=4: 4 + 3; one full batch, one short batch padded to B): new graphs compiled for the short
              batch (0 = one compiled shape serves the clip) and the max pixel deviation compiled vs eager
              (fp16 on the GPU; the short batch's eager frames rendered unpadded)
    warm      a second process on the same folder: compile seconds with inductor's FX graph, AOTAutograd and
              autotune caches warm
    portable  a third process on a new folder holding only torch's portable artifacts from the cold run
              (artifacts/<key>.bin, torch.compiler.load_cache_artifacts): what copying them to another
              machine (or a Ray worker) saves

Modes: quality = DPM++ 25 steps + CFG + reference bank (the release's settings), fast = LCM 4 steps +
reference. The GPU run is sized to stay under ~6.5 minutes on an H100/H200 (two cold compiles of 60-90 s; --budget
460 s stops it in any case, the portable phase first).
--tiny uses backend aot_eager by default (dynamo's capture and AOTAutograd, run eagerly; no inductor cache,
so cold ~ warm and no portable artifacts): inductor's C++ compile of the tiny UNet took 93 s cold / 8 s warm
on an idle 2-core CPU and over 8 minutes cold at load 7 (other jobs), too slow for a smoke run; `--backend
inductor` measures it. Tiny numbers test the machinery, not speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "quality": dict(scheduler="dpm++", steps=25, guidance=3.0, ref_strength=0.8, exp_scale=1.0),
    "fast": dict(scheduler="lcm", steps=4, guidance=1.0, ref_strength=0.8, exp_scale=1.0),
}


# --------------------------------------------------------------------------- one subprocess

def worker(args) -> dict:
    import torch

    from bench.pipeline import build, sync
    from retarget.compiling import TORCH_MODE, CompileCache, CompiledBatches, decode_rows, decoder_key, shape_key
    from retarget.run import _render_with_backoff

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.float16
    if args.tiny:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    t = time.perf_counter()
    pipe = build(device, dtype, args.tiny)
    rng = np.random.default_rng(0)
    actor = pipe.make_actor(rng.standard_normal(512).astype(np.float32),
                            rng.integers(0, 256, (pipe.image_size, pipe.image_size, 3), dtype=np.uint8), seed=0)
    build_s = time.perf_counter() - t
    b = args.batch
    n_short = max(1, min(5, b - 1))  # the clip's last batch: shorter than b, padded to it
    clip = (rng.standard_normal((b + n_short, 55)) * 0.8).astype(np.float32)
    cache = CompileCache(args.cache)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out: dict = {"phase": args.phase, "build_s": build_s, "modes": {}}

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    def frames(idx, call, compiled=None, **kw):
        return np.stack(_render_with_backoff(pipe, actor, clip, idx, dict(call, seed=0, per_frame_noise=True, **kw),
                                             compiled))

    for mode in args.modes.split(","):
        call = dict(MODES[mode], steps=args.steps if mode == "quality" else MODES[mode]["steps"])
        short = dict(call, steps=min(2, call["steps"]))
        row: dict = {}
        full = list(range(b))
        pipe.compile_unet(None)
        pipe.compile_decoder(None)
        if args.phase == "cold":
            frames(full, short)  # eager warm-up (LoRA folding, cuDNN plans)
            row["eager_ms_per_frame"] = 1e3 * float(np.median([timed(lambda: frames(full, call))
                                                               for _ in range(args.repeat)])) / b
        key = shape_key(torch_version=torch.__version__, gpu=gpu, dtype=str(dtype), batch=b, call=call,
                        image_size=pipe.image_size, mode=TORCH_MODE if device.type == "cuda" else "default")
        also = ()
        if args.decoder:  # the VAE decoder compiled with it, as a job with --compile on
            also = (decoder_key(torch_version=torch.__version__, gpu=gpu, dtype=str(dtype), chunk=decode_rows(b),
                                image_size=pipe.image_size),)
        compiled = CompiledBatches(pipe, b, key, cache, log=lambda m: print(f"  [{args.phase}] {m}", flush=True),
                                   mode=TORCH_MODE if device.type == "cuda" else "default", backend=args.backend,
                                   decoder=args.decoder, also=also)
        torch._dynamo.reset()
        compiled.enable()
        first = timed(lambda: frames(full, short, compiled))
        steady = timed(lambda: frames(full, short, compiled))
        row.update(compile_s=max(0.0, first - steady), first_call_s=first, warm_in_index=compiled._warm)
        if args.phase == "cold":
            row["compiled_ms_per_frame"] = 1e3 * float(np.median([timed(lambda: frames(full, call, compiled))
                                                                  for _ in range(args.repeat)])) / b
            row["speedup"] = row["eager_ms_per_frame"] / row["compiled_ms_per_frame"]
            # the clip: one full batch and one short one padded to b; then the same frames eagerly
            from torch._dynamo.utils import counters

            check = dict(call, steps=min(8, call["steps"]))
            got_full = frames(full, check, compiled, output_type="float")
            before = counters["stats"]["unique_graphs"]
            got_short = frames(list(range(b, b + n_short)), check, compiled, output_type="float")
            new_graphs = counters["stats"]["unique_graphs"] - before
            compiled.disable()
            ref_full = frames(full, check, output_type="float")
            ref_short = frames(list(range(b, b + n_short)), check, output_type="float")

            def dev(a, r):
                return {"max_abs": float(np.abs(a - r).max()), "mean_abs": float(np.abs(a - r).mean()),
                        "max_uint8": int(np.abs(np.round(a * 255) - np.round(r * 255)).max())}

            row["padded_clip"] = {"frames": b + n_short, "batch": b, "steps": check["steps"],
                                  "new_graphs_for_short_batch": int(new_graphs),
                                  "compiled_vs_eager_full_batch": dev(got_full, ref_full),
                                  "padded_compiled_vs_eager_short_batch": dev(got_short, ref_short)}
        out["modes"][mode] = row
        print(f"  [{args.phase}] {mode}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in row.items() if k != "padded_clip"), flush=True)
    pipe.compile_unet(None)
    pipe.compile_decoder(None)
    out["artifacts_mb"] = sum(p.stat().st_size for p in cache.artifacts.glob("*.bin")) / 2**20
    out["inductor_cache_mb"] = sum(p.stat().st_size for p in cache.inductor.rglob("*") if p.is_file()) / 2**20
    return out


# --------------------------------------------------------------------------- the run

def run_phase(phase: str, cache: Path, args, part: Path, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_CACHE_DIR", None)  # Triton's kernels must live in the folder under test
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", phase, "--cache", str(cache),
           "--part", str(part), "--batch", str(args.batch), "--steps", str(args.steps), "--repeat", str(args.repeat),
           "--modes", args.modes, "--backend", args.backend] + (["--tiny"] if args.tiny else []) \
        + (["--decoder"] if args.decoder else [])
    t = time.perf_counter()
    if timeout <= 0:
        return {"phase": phase, "skipped": "no time left in the budget"}
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"phase": phase, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not part.is_file():
        return {"phase": phase, "error": f"exit code {proc.returncode}", "process_s": wall}
    return dict(json.loads(part.read_text()), process_s=wall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny weights")
    ap.add_argument("--batch", type=int, default=None, help="frames per call (default 32: the automatic batch "
                    "on an 80 GB card; tiny: 4)")
    ap.add_argument("--steps", type=int, default=None, help="quality-mode steps for the timings (default 25; tiny 3)")
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per variant (median)")
    ap.add_argument("--modes", default=None, help="comma-separated: quality,fast (tiny: quality)")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default inductor; tiny: aot_eager)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run: phases are stopped at it, the portable one skipped when "
                         "less than 80 s are left (default 460: a 10-minute GPU lease with room; tiny: 900)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    ap.add_argument("--decoder", action="store_true", help="compile the VAE decoder too (as --compile on does)")
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 32)
    args.steps = args.steps or (3 if args.tiny else 25)
    args.modes = args.modes or ("quality" if args.tiny else "quality,fast")
    args.backend = args.backend or ("aot_eager" if args.tiny else "inductor")
    args.budget = args.budget or (900.0 if args.tiny else 460.0)
    if args.worker:
        args.phase = args.worker
        result = worker(args)
        Path(args.part).write_text(json.dumps(result, indent=1))
        return 0

    import torch

    t_start = time.perf_counter()
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    gpu = "cpu" if args.tiny else torch.cuda.get_device_name()
    work = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    phases = {}
    try:
        cache = work / "cache"
        def left() -> float:
            return args.budget - (time.perf_counter() - t_start)

        # the cold run leaves the warm one >= 100 s of the budget
        phases["cold"] = run_phase("cold", cache, args, work / "cold.json", timeout=left() - 100)
        phases["warm"] = run_phase("warm", cache, args, work / "warm.json", timeout=left())
        if left() > 80 and any((cache / "artifacts").glob("*.bin")):
            portable = work / "portable"
            shutil.copytree(cache / "artifacts", portable / "artifacts")
            phases["portable"] = run_phase("portable", portable, args, work / "portable.json", timeout=left())
        else:
            phases["portable"] = {"phase": "portable", "skipped": "past the time budget, or the cold run saved no "
                                                                  "artifacts (aot_eager saves none)"}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import diffusers
    import transformers

    result = {
        "gpu": gpu, "device": "cpu" if args.tiny else "cuda", "dtype": "float32" if args.tiny else "float16",
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "tiny": args.tiny,
        "batch": args.batch, "quality_steps": args.steps, "repeat": args.repeat,
        "compile_mode": "reduce-overhead" if not args.tiny else "default (CPU: no CUDA graphs)",
        "backend": args.backend, "decoder_compiled": args.decoder,
        "notes": "random weights in the real architectures (bench/pipeline.py build); ms/frame include VAE decode "
                 "and uint8 output; compile_s = first compiled call minus a steady one (2 steps, same padded "
                 "shape); cold: empty cache folder; warm: same folder, new process; portable: new folder with "
                 "only the cold run's artifacts/*.bin; padded_clip: B + min(5, B - 1) frames, the last batch padded",
        "phases": phases, "total_s": time.perf_counter() - t_start,
    }
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") or "cpu"
    path = out_dir / (f"compile_{'tiny_' if args.tiny else ''}{tag}_{dt.date.today().isoformat()}"
                      f"{'_decoder' if args.decoder else ''}.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    print_table(result)
    print(f"wrote {path}")
    return 0 if all("error" not in p for p in phases.values()) else 1


def print_table(result: dict) -> None:
    phases = result["phases"]
    cold = phases.get("cold", {}).get("modes", {})
    print(f"\n{result['gpu']}, torch {result['torch']}, {result['dtype']}, B={result['batch']}, "
          f"{result['backend']}, {result['compile_mode']}")
    print(f"{'mode':8s} {'eager ms/f':>10s} {'compiled':>9s} {'x':>5s} {'cold s':>7s} {'warm s':>7s} "
          f"{'portable s':>10s} {'new graphs':>10s} {'max |d|':>8s} {'uint8':>5s}")
    for mode, row in cold.items():
        def c(phase):
            r = phases.get(phase, {}).get("modes", {}).get(mode)
            return f"{r['compile_s']:.1f}" if r else "-"

        pc = row.get("padded_clip", {})
        d = pc.get("padded_compiled_vs_eager_short_batch", {})
        print(f"{mode:8s} {row['eager_ms_per_frame']:10.1f} {row['compiled_ms_per_frame']:9.1f} "
              f"{row['speedup']:5.2f} {c('cold'):>7s} {c('warm'):>7s} {c('portable'):>10s} "
              f"{pc.get('new_graphs_for_short_batch', '-'):>10} {d.get('max_abs', float('nan')):8.4f} "
              f"{d.get('max_uint8', '-'):>5}")
    for name, p in phases.items():
        if "error" in p or "skipped" in p:
            print(f"{name}: {p.get('error') or 'skipped: ' + p['skipped']}")
    print("for retarget/compiling.py's SPEED table (s/frame at B=%d): " % result["batch"] + ", ".join(
        f"{m}: ({r['eager_ms_per_frame'] / 1e3:.4f}, {r['compiled_ms_per_frame'] / 1e3:.4f})" for m, r in cold.items()))


if __name__ == "__main__":
    raise SystemExit(main())
