"""Where quality mode's time goes: which kinds of kernel hold the GPU, and how near each runs to the peak.

Quality mode (DPM++ 25 steps, CFG 3.0, reference bank; the release's settings) at the job's batch,
eager, the pipeline's default kernels (fused_kv): the call's median time; one call under
torch.profiler with its CUDA kernel time grouped by kind (attention, GEMM, convolution,
normalisation, the rest: elementwise, copies, reductions) from the kernels' names; the UNet's FLOPs
by ATen operator (torch's FlopCounterMode, one UNet call with CFG and the bank) grouped the same
way; so each kind's achieved TFLOP/s within its own kernel time, beside the GPU's dense fp16 peak.
That says what limits the <= 100 ms/frame goal of issue 14: a kind far below the peak that holds a
large share is the lever. Full-size random weights in the real architectures (bench/pipeline.py's build).

    python bench/quality_mode.py            # GPU, fp16, B=32: table + bench/results/quality_mode_<gpu>_<date>.json
    python bench/quality_mode.py --tiny     # CPU smoke run: tiny configs, 2 steps (no kernel profile)
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline as pipeline_bench  # noqa: E402  (bench/pipeline.py: build, timed, unet_flop_counts)
from fast_mode import kernel_profile  # noqa: E402

KINDS = ("attention", "gemm", "conv", "norm", "other")

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's datasheets (SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel from its name (cuDNN, CUTLASS, cuBLAS, flash-attention, PyTorch's own)."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "softmax")):
        return "attention"
    if any(k in n for k in ("conv", "fprop", "implicit", "dgrad", "wgrad", "winograd")):
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul", "cublas")):
        return "gemm"
    if "norm" in n:
        return "norm"
    return "other"


def op_kind(op: str) -> str:
    """The kind of an ATen operator counted by FlopCounterMode."""
    o = op.lower()
    if "attention" in o:
        return "attention"
    if "conv" in o:
        return "conv"
    if any(k in o for k in ("mm", "linear", "baddbmm", "addmm")):
        return "gemm"
    return "other"


def by_kind(all_kernels: list[tuple[str, float]]) -> dict:
    """Kernel seconds and shares per kind for one profiled call."""
    total = sum(s for _, s in all_kernels) or 1.0
    out = {k: {"s": 0.0, "share": 0.0} for k in KINDS}
    for name, s in all_kernels:
        out[kernel_kind(name)]["s"] += s
    for k in KINDS:
        out[k]["share"] = out[k]["s"] / total
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny configs")
    ap.add_argument("--batch", type=int, default=None, help="frames per call (default 32; tiny: 2)")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls (median; default 3, tiny 1)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import diffusers

    from retarget.run import RunOptions, render_call

    job = pipeline_bench.random_job(args.tiny)
    cuda, device, dtype, pipe, gpu, actor, rng = job.cuda, job.device, job.dtype, job.pipe, job.gpu, job.actor, job.rng
    b = args.batch or (32 if cuda else 2)
    repeat = args.repeat or (3 if cuda else 1)
    call = dict(render_call(RunOptions()), frame_indices=list(range(b)))
    if args.tiny:
        call["steps"] = 2
    expr = rng.standard_normal((b, 55)).astype(np.float32)
    print(f"{gpu}, {dtype}, torch {torch.__version__}, diffusers {diffusers.__version__}, B={b}, call {call}", flush=True)

    def full():
        return pipe(actor, expr, **call)

    full()  # warm-up (cuDNN heuristics, allocator)
    call_s = pipeline_bench.timed(full, device, repeat)
    result: dict = {"gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "python": platform.python_version(), "tiny": args.tiny, "batch": b,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "call": {k: v for k, v in call.items() if k != "frame_indices"},
                    "call_s": call_s, "ms_per_frame": 1e3 * call_s / b}
    print(f"eager quality call: {1e3 * call_s / b:.1f} ms/frame ({b / call_s:.2f} frames/s)", flush=True)

    # FLOPs of the loop by kind: one UNet call on 2B rows (CFG; half read the bank) x steps.
    counts = pipeline_bench.unet_flop_counts(pipe, actor, 2 * b) or {}
    flops = {k: 0.0 for k in KINDS}
    for op, n in counts.items():
        flops[op_kind(op)] += n * call["steps"]
    result["unet_flops_by_op_per_call"] = {op: n * call["steps"] for op, n in counts.items()}
    result["unet_tflop_per_frame"] = sum(flops.values()) / b / 1e12

    if cuda:
        top = 400  # enough to hold every distinct kernel of the call
        prof = kernel_profile(full, top=top)
        kernels = [(k["kernel"], k["s"]) for k in prof["top"]]
        kinds = by_kind(kernels)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        for k in KINDS:
            kinds[k]["tflop"] = flops[k] / 1e12
            kinds[k]["tflops"] = flops[k] / kinds[k]["s"] / 1e12 if kinds[k]["s"] and flops[k] else None
            kinds[k]["of_peak"] = kinds[k]["tflops"] / peak if kinds[k]["tflops"] and peak else None
        result.update(profile_wall_s=prof["wall_s"], kernel_s=prof["kernel_s"], busy_share=prof["busy_share"],
                      kinds=kinds, peak_tflops=peak, top_kernels=prof["top"][:20])
        print(f"one call: GPU busy {100 * prof['busy_share']:.1f}% of {prof['wall_s']:.2f} s; "
              f"{result['unet_tflop_per_frame']:.1f} TFLOP a frame in the UNet; peak {peak} TFLOP/s")
        print(f"{'kind':10s} {'share':>6s} {'ms/frame':>9s} {'TFLOP':>8s} {'TFLOP/s':>8s} {'of peak':>7s}")
        for k in KINDS:
            r = kinds[k]
            print(f"{k:10s} {100 * r['share']:5.1f}% {1e3 * r['s'] / b:9.2f} {r['tflop']:8.1f} "
                  f"{r['tflops'] or 0:8.0f} {100 * (r['of_peak'] or 0):6.1f}%")
        for k in prof["top"][:10]:
            print(f"  {100 * k['share']:5.1f}%  [{kernel_kind(k['kernel'])}] {k['kernel'][:100]}")
    result["bench_s"] = time.perf_counter() - t_start
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") or "cpu"
    path = out_dir / f"quality_mode_{'tiny_' if args.tiny else ''}{tag}_{dt.date.today().isoformat()}.json"
    pipeline_bench.write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
