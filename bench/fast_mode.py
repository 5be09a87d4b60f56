"""Where fast mode's time goes, and what compiling the VAE decoder does to it.

Fast mode (LCM 4 steps, reference bank, no CFG) at the job's batch: one call split into its UNet loop
(output_type="latent") and its VAE decode; the GPU's busy share inside one call (CUDA kernel time over
wall time, torch.profiler) and the kernels that take the most of it; then torch.compile of the VAE
decoder (`pipe.compile_decoder`), of the UNet (`pipe.compile_unet`, the job's mode) and of both, each
timed against eager in the same run, with its compile time and its frames' deviation from eager.
Full-size random weights in the real architectures (bench/pipeline.py's `build`).

    python bench/fast_mode.py             # GPU, fp16, B=32: table + bench/results/fast_mode_<gpu>_<date>.json
    python bench/fast_mode.py --tiny      # CPU smoke run: tiny configs, dynamo's "eager" backend (no inductor)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline as pipeline_bench  # noqa: E402  (bench/pipeline.py: build, timed, psnr)


def kernel_profile(fn, top: int = 12) -> dict:
    """One call of fn under torch.profiler: wall seconds, summed CUDA kernel seconds (kernels of
    two streams may overlap; here there is one), their ratio, and the `top` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        on_gpu = str(getattr(e, "device_type", "")).endswith("CUDA") or not getattr(e, "self_cpu_time_total", 0)
        if us and on_gpu:  # a kernel: device time, no host time of its own
            kernels.append((e.key, us / 1e6, e.count))
    busy = sum(k[1] for k in kernels)
    kernels.sort(key=lambda k: -k[1])
    return {"wall_s": wall, "kernel_s": busy, "busy_share": busy / wall if wall else None,
            "top": [{"kernel": k[:160], "s": s, "calls": c, "share": s / busy if busy else None}
                    for k, s, c in kernels[:top]]}


def deviation(a: np.ndarray, b: np.ndarray) -> dict:
    """uint8 frames a against b: max |difference| in levels, mean, PSNR (None when equal)."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_levels": int(d.max()), "mean_levels": float(d.mean()),
            "psnr_db": pipeline_bench.psnr(a.astype(np.float64) / 255, b.astype(np.float64) / 255)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny configs")
    ap.add_argument("--batch", type=int, default=None, help="frames per call (default 32; tiny: 4)")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per variant (median; default 5, tiny 1)")
    ap.add_argument("--no-unet-compile", action="store_true", help="only the decoder's compile (saves ~60 s)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import diffusers

    from retarget.compiling import TORCH_MODE
    from retarget.run import RunOptions, render_call

    job = pipeline_bench.random_job(args.tiny)
    cuda, device, dtype, pipe, gpu, actor, rng = job.cuda, job.device, job.dtype, job.pipe, job.gpu, job.actor, job.rng
    b = args.batch or (32 if cuda else 4)
    repeat = args.repeat or (5 if cuda else 1)
    backend = "inductor" if cuda else "eager"
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)

    call = dict(render_call(RunOptions(fast=True)), frame_indices=list(range(b)))
    expr = rng.standard_normal((b, 55)).astype(np.float32)
    print(f"{gpu}, {dtype}, torch {torch.__version__}, diffusers {diffusers.__version__}, B={b}, call {call}",
          flush=True)

    def full():
        return pipe(actor, expr, **call)

    def latents():
        return pipe(actor, expr, **dict(call, output_type="latent"))

    lat = latents()
    full()  # warm-up (cuDNN heuristics, allocator)

    def t(fn, n=repeat) -> float:
        return pipeline_bench.timed(fn, device, n)

    result: dict = {"gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "tiny": args.tiny, "batch": b, "call": {k: v for k, v in call.items() if k != "frame_indices"},
                    "backend": backend, "unet_mode": TORCH_MODE, "decoder_mode": "default"}
    split = {"call_s": t(full), "unet_loop_s": t(latents), "decode_s": t(lambda: pipe.decode(lat, uint8=True))}
    split.update({f"{k[:-2]}_ms_per_frame": 1e3 * v / b for k, v in list(split.items())})
    result["eager_split"] = split
    print("eager, ms/frame: call {call_ms_per_frame:.2f} = UNet loop {unet_loop_ms_per_frame:.2f} + decode "
          "{decode_ms_per_frame:.2f}".format(**split), flush=True)
    if cuda:
        result["profile_eager_call"] = kernel_profile(full)
        p = result["profile_eager_call"]
        print(f"one eager call: GPU busy {100 * p['busy_share']:.1f}% of {p['wall_s']:.3f} s", flush=True)
        for k in p["top"][:8]:
            print(f"  {100 * k['share']:5.1f}%  {k['kernel'][:110]}", flush=True)

    want = full()
    want_dec = pipe.decode(lat, uint8=True)

    # the decoder compiled: cold compile = its first call
    t0 = time.perf_counter()
    pipe.compile_decoder(backend=backend, dynamic=False, **({"mode": "default"} if cuda else {}))
    got_dec = pipe.decode(lat, uint8=True)
    sync()
    compiled_dec = pipe._compiled_decode
    result["decoder_compile_s"] = time.perf_counter() - t0
    rows = {"decode": {}, "call": {}}
    for name, dec in (("eager", None), ("compiled", compiled_dec)):
        pipe._compiled_decode = dec
        rows["decode"][name] = 1e3 * t(lambda: pipe.decode(lat, uint8=True)) / b
    for name, dec in (("eager", None), ("decoder compiled", compiled_dec)):
        pipe._compiled_decode = dec
        rows["call"][name] = 1e3 * t(full) / b
    pipe._compiled_decode = compiled_dec
    result["decoder_deviation"] = deviation(got_dec, want_dec)
    result["call_deviation_decoder_compiled"] = deviation(full(), want)
    print(f"decoder compile {result['decoder_compile_s']:.1f} s; decode ms/frame eager {rows['decode']['eager']:.2f}, "
          f"compiled {rows['decode']['compiled']:.2f}; deviation {result['decoder_deviation']}", flush=True)

    if not args.no_unet_compile:
        t0 = time.perf_counter()
        pipe.compile_unet(TORCH_MODE if cuda else "default", backend=backend, dynamic=False)
        full()
        full()  # cudagraph trees record on a later call
        sync()
        result["unet_compile_s"] = time.perf_counter() - t0
        compiled_unet = pipe._compiled_unet
        for name, (unet, dec) in (("UNet compiled", (compiled_unet, None)),
                                  ("both compiled", (compiled_unet, compiled_dec)),
                                  ("eager again", (None, None))):
            pipe._compiled_unet, pipe._compiled_decode = unet, dec
            rows["call"][name] = 1e3 * t(full) / b
            if name == "both compiled":
                result["call_deviation_both_compiled"] = deviation(full(), want)
        pipe._compiled_unet, pipe._compiled_decode = None, None
    result["ms_per_frame"] = rows
    result["frames_per_s"] = {k: 1e3 / v for k, v in rows["call"].items()}
    result["bench_s"] = time.perf_counter() - t_start

    print(f"\nfast mode, B={b}, ms/frame (frames/s)")
    base = rows["call"]["eager"]
    for name, ms in rows["call"].items():
        print(f"  {name:18s} {ms:7.2f} ({1e3 / ms:6.2f})  x{base / ms:.3f}")
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") or "cpu"
    path = out_dir / f"fast_mode_{'tiny_' if args.tiny else ''}{tag}_{dt.date.today().isoformat()}.json"
    pipeline_bench.write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
