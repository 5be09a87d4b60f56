"""Where quality mode's time goes: which kinds of kernel hold the GPU, and how near each runs to the peak.

Quality mode (DPM++ 25 steps, CFG 3.0, reference bank; the release's settings) at the job's batch,
eager, the pipeline's default kernels (fused_kv): the call's median time; one call under
torch.profiler with its CUDA kernel time grouped by kind (attention, GEMM, convolution,
normalisation, inductor's fused Triton kernels, the rest: elementwise, copies, reductions) from the
kernels' names; the UNet's FLOPs
by ATen operator (torch's FlopCounterMode, one UNet call with CFG and the bank) grouped the same
way; so each kind's achieved TFLOP/s within its own kernel time, beside the GPU's dense fp16 peak.
That says what limits the <= 100 ms/frame goal of issue 14: a kind far below the peak that holds a
large share is the lever. Full-size random weights in the real architectures (bench/pipeline.py's build).

Variants (`--variants`, each timed, profiled and compared with eager's frames in the same run):
  eager     the pipeline's default kernels (fused_kv), no compile
  compiled  what `retarget run --compile on` does: the UNet through torch.compile (mode
            "reduce-overhead") and the VAE decoder (mode "default")
  recipe    compiled, with the inductor settings PyTorch's diffusion write-up uses for SD-class UNets
            (conv_1x1_as_mm, coordinate_descent_tuning, epilogue_fusion off)
  autotune  recipe + max_autotune_gemm (Triton GEMM templates benchmarked against cuBLAS per shape;
            the slowest compile)
Each compiled variant starts from a reset dynamo (a fresh compile; its first-call time is reported).

    python bench/quality_mode.py            # GPU, fp16, B=32: table + bench/results/quality_mode_<gpu>_<date>.json
    python bench/quality_mode.py --variants eager,compiled,recipe --deadline 480
    python bench/quality_mode.py --tiny     # CPU smoke run: tiny configs, 2 steps, dynamo's "eager" backend
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

KINDS = ("attention", "gemm", "conv", "norm", "fused", "other")

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's datasheets (SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}

# Inductor settings per compiled variant, on top of the job's mode (retarget.compiling.TORCH_MODE).
RECIPE = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False}
VARIANTS = {"eager": None, "compiled": {}, "recipe": RECIPE, "autotune": dict(RECIPE, max_autotune_gemm=True)}


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel from its name (cuDNN, CUTLASS, cuBLAS, flash-attention, PyTorch's own)."""
    n = name.lower()
    # inductor's own kernels are named after the ops they fuse ("triton_poi_fused_convolution_native_group_norm_
    # silu": a conv's bias add fused with the norm after it): templates are GEMMs or convs, the rest "fused"
    if n.startswith("triton_"):
        if n.startswith("triton_tem"):
            return "conv" if "convolution" in n else "gemm"
        return "fused"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "softmax")):
        return "attention"
    if any(k in n for k in ("conv", "fprop", "implicit", "dgrad", "wgrad", "winograd")):
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "matmul", "cublas", "triton_tem")):
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


def kinds_of(prof: dict, flops: dict, gpu: str) -> dict:
    """Per kind: kernel seconds and share of one profiled call, its FLOPs, achieved TFLOP/s and share of peak."""
    kinds = by_kind([(k["kernel"], k["s"]) for k in prof["top"]])
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    for k in KINDS:
        kinds[k]["tflop"] = flops[k] / 1e12
        kinds[k]["tflops"] = flops[k] / kinds[k]["s"] / 1e12 if kinds[k]["s"] and flops[k] else None
        kinds[k]["of_peak"] = kinds[k]["tflops"] / peak if kinds[k]["tflops"] and peak else None
    return kinds


def use(pipe, variant: str, batch: int, cuda: bool) -> None:
    """Put the pipeline in `variant`'s state (VARIANTS); compiled variants start from a reset dynamo."""
    from retarget.compiling import DECODER_MODE, TORCH_MODE, decode_rows

    pipe.compile_unet(None)
    pipe.compile_decoder(None)
    options = VARIANTS[variant]
    if options is None:
        return
    torch._dynamo.reset()
    if cuda:
        pipe.compile_unet(TORCH_MODE, options=options, dynamic=False)
        pipe.compile_decoder(DECODER_MODE, rows=decode_rows(batch), dynamic=False)
    else:  # the CPU smoke run: dynamo's tracing without inductor (the settings are inductor's)
        pipe.compile_unet("default", backend="eager", dynamic=False)
        pipe.compile_decoder("default", rows=decode_rows(batch), backend="eager", dynamic=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny configs")
    ap.add_argument("--batch", type=int, default=None, help="frames per call (default 32; tiny: 2)")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls (median; default 3, tiny 1)")
    ap.add_argument("--variants", default="eager,compiled,recipe", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--deadline", type=float, default=520.0,
                    help="seconds after the start past which no new variant starts (the JSON is written after each)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
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
    want = pipe(actor, expr, **dict(call, output_type="float"))  # eager's frames, floats in [0, 1]
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") or "cpu"
    path = out_dir / f"quality_mode_{'tiny_' if args.tiny else ''}{tag}_{dt.date.today().isoformat()}.json"
    result: dict = {"gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "python": platform.python_version(), "tiny": args.tiny, "batch": b,
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "call": {k: v for k, v in call.items() if k != "frame_indices"},
                    "variant_settings": {v: VARIANTS[v] for v in variants}, "variants": {}}

    # FLOPs of the loop by kind: one UNet call on 2B rows (CFG; half read the bank) x steps.
    counts = pipeline_bench.unet_flop_counts(pipe, actor, 2 * b) or {}
    flops = {k: 0.0 for k in KINDS}
    for op, n in counts.items():
        flops[op_kind(op)] += n * call["steps"]
    result["unet_flops_by_op_per_call"] = {op: n * call["steps"] for op, n in counts.items()}
    result["unet_tflop_per_frame"] = sum(flops.values()) / b / 1e12
    result["peak_tflops"] = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)

    for variant in variants:
        if time.perf_counter() - t_start > args.deadline:
            result["variants"][variant] = {"error": f"skipped: past the {args.deadline:.0f} s deadline"}
            print(f"{variant}: skipped (deadline)", flush=True)
            continue
        row: dict = {}
        try:
            use(pipe, variant, b, cuda)
            t0 = time.perf_counter()
            full()
            full()  # cudagraph trees record on a later call
            pipeline_bench.sync(device)
            row["first_two_calls_s"] = time.perf_counter() - t0
            call_s = pipeline_bench.timed(full, device, repeat)
            row.update(call_s=call_s, ms_per_frame=1e3 * call_s / b)
            if variant != "eager":
                d = np.abs(pipe(actor, expr, **dict(call, output_type="float")) - want)
                row["vs_eager"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean())}
            if cuda:
                prof = kernel_profile(full, top=400)  # enough to hold every distinct kernel of the call
                row.update(profile_wall_s=prof["wall_s"], kernel_s=prof["kernel_s"], busy_share=prof["busy_share"],
                           kinds=kinds_of(prof, flops, gpu), top_kernels=prof["top"])  # every kernel: kinds can be re-derived
        except Exception as e:  # a variant that fails to compile must not cost the others' numbers
            row["error"] = f"{e.__class__.__name__}: {str(e)[:300]}"
        result["variants"][variant] = row
        result["bench_s"] = time.perf_counter() - t_start
        pipeline_bench.write_json(path, result)
        if "error" in row:
            print(f"{variant}: {row['error']}", flush=True)
            continue
        print(f"{variant}: {row['ms_per_frame']:.1f} ms/frame ({b / row['call_s']:.2f} frames/s), first two calls "
              f"{row['first_two_calls_s']:.1f} s, vs eager {row.get('vs_eager')}", flush=True)
        if "kinds" in row:
            print(f"  GPU busy {100 * row['busy_share']:.1f}% of {row['profile_wall_s']:.2f} s; "
                  f"{'kind':10s} {'share':>6s} {'ms/frame':>9s} {'TFLOP/s':>8s} {'of peak':>7s}")
            for k in KINDS:
                r = row["kinds"][k]
                print(f"    {k:10s} {100 * r['share']:5.1f}% {1e3 * r['s'] / b:9.2f} {r['tflops'] or 0:8.0f} "
                      f"{100 * (r['of_peak'] or 0):6.1f}%")
            for k in row["top_kernels"][:8]:
                print(f"    {100 * k['share']:5.1f}%  [{kernel_kind(k['kernel'])}] {k['kernel'][:100]}", flush=True)
    use(pipe, "eager", b, cuda)

    done = {v: r for v, r in result["variants"].items() if "ms_per_frame" in r}
    base = done.get("eager", {}).get("ms_per_frame")
    print(f"\nquality mode, B={b}, {result['unet_tflop_per_frame']:.1f} TFLOP a frame in the UNet")
    print(f"{'variant':10s} {'ms/frame':>9s} {'x eager':>8s} {'first 2 calls s':>16s} {'max |d|':>8s}")
    for v, r in done.items():
        print(f"{v:10s} {r['ms_per_frame']:9.1f} {base / r['ms_per_frame'] if base else float('nan'):8.3f} "
              f"{r['first_two_calls_s']:16.1f} {r.get('vs_eager', {}).get('max_abs', 0.0):8.4f}")
    result["bench_s"] = time.perf_counter() - t_start
    pipeline_bench.write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
