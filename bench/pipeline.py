"""Speed of the retargeting pipeline on full-size random weights in the real architectures.

SD 1.5 UNet (860 M parameters, cross-attention 768), SD VAE, CLIP-L text encoder, a 4-token Expression
Adapter, a reference LoRA and an LCM-LoRA, all random and built from configs (no download). Random weights
cost what trained ones cost: the arithmetic does not depend on the values.

    python bench/pipeline.py                 # GPU, fp16: table + bench/results/pipeline_<gpu>_<date>.json
    python bench/pipeline.py --tiny          # CPU smoke run on the tiny configs (seconds)

Measures per batch size B (frames per call): seconds per call, frames/s, ms per frame and peak memory for
DPM++ 25 steps with CFG and the reference bank (the release's settings) and for LCM 4 steps; plus the
once-per-video costs (identity embedding, reference VAE encode, writer pass) and variants in the same run:

    baseline   peft LoRA layers, bank projected every step (the pipeline before the speed work)
    fused      LoRA folded into the weights for the loop (pipe.fuse_loras)
    fused_kv   fused + bank keys/values once per loop, one projection for both CFG halves (the default)
    compiled   fused_kv + torch.compile(unet, mode="reduce-overhead") (opt-in; GPU, --compile-batches)
    per_frame_ref  fused_kv with a reference per frame (an actor video, retarget/retake.py): each call also
               VAE-encodes its B reference frames and runs the writer once on them (pipe.frame_references);
               its ratio to fused_kv is the cost of per-frame references

Kernel variants (retarget/kernels.py, each one switch of `pipe.kernels` on top of fused_kv, the default,
measured alone against fused_kv in the same run; fused_kv is added when missing):

    channels_last      UNet and VAE in NHWC          sdpa_cudnn / sdpa_flash / sdpa_efficient / sdpa_math
    cuda_graph         fast mode only: one captured UNet step per batch shape, replayed
    cudnn_benchmark    cuDNN autotuning for the loop and the decode
    vae_channels_last / vae_fp32   fast mode only (where the decode weighs): NHWC VAE / float32 decode
    fp8                torchao FP8 attention and feed-forward Linears (needs torchao and an sm89+ GPU)

Each kernel variant's deviation from fused_kv (max abs, mean abs, PSNR of the decoded frames, B=2, same
seed, 8 steps) is printed in the kernel table and stored in the JSON ("kernels"); so are the SDPA kernel
torch's dispatcher picks for the UNet's attention shapes under each preference ("sdpa_choice") and a VAE
decode breakdown: chunk sizes, NHWC, cuDNN autotuning, fp32, and the decode's time by operator ("vae_decode").

    # GPU, every kernel variant once (~5 min on an H200; fp8 needs torchao installed, else its rows say so):
    python bench/pipeline.py --batches 1,8,32 --deadline 380 --variants fused_kv,channels_last,sdpa_cudnn,\
        sdpa_flash,sdpa_efficient,cuda_graph,cudnn_benchmark,vae_channels_last,vae_fp32,fp8
    # CPU smoke run of the same code (CUDA-only variants report their clear error in their rows):
    python bench/pipeline.py --tiny --batches 2 --variants fused_kv,channels_last,sdpa_math,cuda_graph,vae_fp32,fp8

Variants are interleaved per (mode, B) so that clock drift hits them alike. The GPU run also checks that
the variants give the same frames (fp16 pixel differences against the baseline).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
KERNEL_VARIANTS = {  # name -> pipe.kernels fields set on top of the default (fused_kv)
    "channels_last": dict(channels_last=True, vae_channels_last=True),
    "sdpa_cudnn": dict(attention_backend="cudnn"),
    "sdpa_flash": dict(attention_backend="flash"),
    "sdpa_efficient": dict(attention_backend="efficient"),
    "sdpa_math": dict(attention_backend="math"),
    "cuda_graph": dict(cuda_graph=True),
    "cudnn_benchmark": dict(cudnn_benchmark=True),
    "vae_channels_last": dict(vae_channels_last=True),
    "vae_fp32": dict(vae_upcast=True),
    "fp8": dict(fp8=True),
}
FAST_MODE_ONLY = {"cuda_graph", "vae_channels_last", "vae_fp32"}
REF_LORA_RANK = 32  # the release's rank is not documented; LoRA cost is small either way
LCM_LORA_RANK = 64  # latent-consistency/lcm-lora-sdv1-5


def build(device: torch.device, dtype: torch.dtype, tiny: bool):
    """RetargetPipeline with random weights: SD 1.5 sizes, or the tiny test sizes with --tiny."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from retarget import tiny as tinymod
    from retarget.components import make_scheduler
    from retarget.pipeline import RetargetPipeline

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    vocab = tinymod.write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    text_cfg = dict(CLIP_L, num_hidden_layers=2, intermediate_size=1024) if tiny else dict(CLIP_L)
    text_cfg.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1)
    with torch.device(device):
        unet = UNet2DConditionModel(**(tinymod.tiny_unet_config() if tiny else SD15_UNET))
        vae = AutoencoderKL(**(tinymod.tiny_vae_config() if tiny else SD15_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    exp = tinymod.exp_adapter_state_dict(unet.cpu() if device.type == "cpu" else unet, "linear")
    ref = tinymod.ref_lora_state_dict(unet, rank=4 if tiny else REF_LORA_RANK)
    lcm = tinymod.lcm_lora_state_dict(unet, rank=4 if tiny else LCM_LORA_RANK)
    pipe = RetargetPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                            scheduler=make_scheduler(tinymod.SD15_SCHEDULER_CONFIG, "dpm++"))
    pipe.setup_adapters(exp, ref)
    pipe.load_lcm_lora(lcm, "random LCM-LoRA")
    return pipe.to(device, dtype)


def random_job(tiny: bool):
    """The one-GPU benches' setup: fp16 on CUDA unless `tiny` (then fp32 on the CPU and the tiny
    configs), `build`'s pipeline and an actor from a random identity and reference image.
    Returns a namespace: cuda, device, dtype, pipe, gpu (its name), actor, and rng (seeded 0, past
    the actor's draws: the caller's expressions come from it)."""
    from types import SimpleNamespace

    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    pipe = build(device, dtype, tiny)
    rng = np.random.default_rng(0)
    arc = rng.standard_normal(512).astype(np.float32)
    ref_img = rng.integers(0, 256, (pipe.image_size, pipe.image_size, 3), dtype=np.uint8)
    actor = pipe.make_actor(arc, ref_img, generator=torch.Generator().manual_seed(0))
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    return SimpleNamespace(cuda=cuda, device=device, dtype=dtype, pipe=pipe, gpu=gpu, actor=actor, rng=rng)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    """Median wall time of fn() in seconds, synchronised, after the caller's warm-up."""
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def unet_flops(pipe, actor, rows: int) -> float | None:
    """FLOPs of one UNet call on `rows` latent rows with CFG and the reference bank (half the rows read it)."""
    counts = unet_flop_counts(pipe, actor, rows)
    return float(sum(counts.values())) if counts else None


def unet_flop_counts(pipe, actor, rows: int) -> dict[str, float] | None:
    """unet_flops' FLOPs by ATen operator (e.g. "aten.convolution", "aten.mm",
    "aten._scaled_dot_product_flash_attention"); None when they cannot be counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from retarget.adapters.reference import reading

    s = pipe.unet.config.sample_size
    x = torch.randn(rows, 4, s, s, device=pipe.device, dtype=pipe.unet.dtype)
    prompt = actor.id_embeds.expand(rows, -1, -1)
    embeds = [torch.zeros(rows, 1, 55, device=pipe.device, dtype=pipe.unet.dtype)]
    pipe._set_loras({"reference": 0.8})
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), \
                reading(pipe.reference_state, actor.bank, read_from=rows // 2):
            pipe.unet(x, 500, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": embeds})
        return {str(op): float(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    except Exception:  # flop counting is a nicety; never let it stop the timing
        return None


def accuracy(device: torch.device, tiny: bool, out_dir: Path, steps: int) -> dict:
    """Error of each fp16 variant against an fp32 run of the same weights and actor (TF32 off), so that
    fp16 differences between variants can be judged against fp16's own error. ||out - ref|| / ||ref||
    and max |out - ref| on float pixels in [0, 1], B=2, per scheduler."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    p32 = build(device, torch.float32, tiny)
    p16 = build(device, half, tiny)
    rng = np.random.default_rng(0)
    arc = rng.standard_normal(512).astype(np.float32)
    ref_img = rng.integers(0, 256, (p32.image_size, p32.image_size, 3), dtype=np.uint8)
    a32 = p32.make_actor(arc, ref_img, generator=torch.Generator().manual_seed(0))
    # the fp16 pipeline gets the fp32 actor, cast: only the denoising loop differs
    from dataclasses import replace
    a16 = replace(a32, id_embeds=a32.id_embeds.to(half), uncond_embeds=a32.uncond_embeds.to(half),
                  ref_latent=a32.ref_latent.to(half), bank=a32.bank.to(dtype=half))
    expr = rng.standard_normal((2, 55)).astype(np.float32)
    out = {}
    for mode, call in {"dpm++_cfg_ref": dict(scheduler="dpm++", steps=steps, guidance=3.0, ref_strength=0.8),
                       "lcm_ref": dict(scheduler="lcm", steps=4, guidance=1.0, ref_strength=0.8)}.items():
        p32.fuse_loras, p32.reference_state.fast = False, False
        ref = p32(a32, expr, seed=3, output_type="float", **call)
        for variant, (fuse, fast) in {"baseline": (False, False), "fused": (True, False),
                                      "fused_kv": (True, True)}.items():
            p16.unfuse_loras()
            p16.fuse_loras, p16.reference_state.fast = fuse, fast
            got = p16(a16, expr, seed=3, output_type="float", **call)
            out[f"{mode}/{variant}"] = {"rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                                        "max_abs": float(np.abs(got - ref).max()),
                                        "mean_abs": float(np.abs(got - ref).mean())}
            print(f"{mode:14s} {variant:9s} vs fp32: rel L2 {out[f'{mode}/{variant}']['rel_l2']:.2e}  "
                  f"max {out[f'{mode}/{variant}']['max_abs']:.3f}  mean {out[f'{mode}/{variant}']['mean_abs']:.4f}",
                  flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"pipeline_accuracy_{'tiny_' if tiny else ''}{device.type}.json",
               {"half": str(half), "steps": steps, "batch": 2, "vs_fp32": out})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny configs")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,8,16,32; tiny: 1,2)")
    ap.add_argument("--steps", type=int, default=None, help="DPM++ steps (default 25; tiny: 2)")
    ap.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--variants", default="baseline,fused,fused_kv,per_frame_ref,compiled",
                    help="see the module docstring")
    ap.add_argument("--compile-batches", default="1,8", help="batch sizes for the compiled variant (GPU only)")
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds after start past which no further measurement (or compiled batch) is started")
    ap.add_argument("--accuracy", action="store_true", help="only: each variant in fp16 against fp32, then exit")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import diffusers
    import peft
    import transformers

    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,8,32")).split(",")]
    steps = args.steps or (2 if args.tiny else 25)
    if args.accuracy:
        accuracy(device, args.tiny, Path(args.out) if args.out else Path(__file__).resolve().parent / "results", steps)
        return 0
    repeat_small, repeat_big = (1, 1) if args.tiny else (3, 2)

    t = time.perf_counter()
    pipe = build(device, dtype, args.tiny)
    sync(device)
    build_s = time.perf_counter() - t
    weights_gb = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {gpu}, {dtype}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"image {pipe.image_size}px, built in {build_s:.1f}s", flush=True)

    # once per video: identity embedding (text encoder part; the ArcFace ONNX runs on onnxruntime and
    # has no full-size stand-in here), reference VAE encode, writer pass
    rng = np.random.default_rng(0)
    arc = rng.standard_normal(512).astype(np.float32)
    ref_img = rng.integers(0, 256, (pipe.image_size, pipe.image_size, 3), dtype=np.uint8)
    gen = torch.Generator().manual_seed(0)
    actor = pipe.make_actor(arc, ref_img, generator=gen)  # warm-up of all three
    once = {
        "identity_embed_ms": 1e3 * timed(lambda: (pipe.identity.encode(arc), pipe.identity.encode_empty()), device, 5),
        "reference_encode_ms": 1e3 * timed(lambda: pipe.encode_reference(ref_img, generator=gen), device, 5),
        "writer_pass_ms": 1e3 * timed(lambda: pipe.write_bank(actor.ref_latent, actor.id_embeds), device, 5),
    }
    bank_mb = sum(v.numel() * v.element_size() for v in actor.bank.states.values()) / 2**20
    flops_row = unet_flops(pipe, actor, 2)
    flops_row = flops_row / 2 if flops_row else None
    print("once per video: " + ", ".join(f"{k} {v:.1f}" for k, v in once.items()) + f", bank {bank_mb:.1f} MB", flush=True)

    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") or "cpu"
    out_path = out_dir / f"pipeline_{'tiny_' if args.tiny else ''}{tag}_{dt.date.today().isoformat()}.json"
    result_head = {
        "gpu": gpu, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tiny": args.tiny, "image_size": pipe.image_size, "dpm_steps": steps,
        "sdpa": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                 "math": torch.backends.cuda.math_sdp_enabled()},
        "build_s": build_s, "weights_mem_gb": weights_gb,
        "notes": ("random weights in the real architectures; reference LoRA rank "
                  f"{REF_LORA_RANK}, LCM-LoRA rank {LCM_LORA_RANK}; times include VAE decode and uint8 output; "
                  "identity_embed_ms is the text-encoder part (ArcFace ONNX not included); variants: see "
                  "bench/pipeline.py's docstring; equality_vs_baseline: same seed, 8 steps, B=2"),
    }

    modes = {
        "dpm++25_cfg_ref": dict(scheduler="dpm++", steps=steps, guidance=3.0, ref_strength=0.8),
        "lcm4_ref": dict(scheduler="lcm", steps=4, guidance=1.0, ref_strength=0.8),
    }
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in KERNEL_VARIANTS
               and v not in ("baseline", "fused", "fused_kv", "per_frame_ref", "compiled")]
    if unknown:
        ap.error(f"unknown variants {unknown}")
    if any(v in KERNEL_VARIANTS for v in variants) and "fused_kv" not in variants:
        variants.insert(0, "fused_kv")  # kernel variants are measured against the default
    compile_batches = [int(b) for b in args.compile_batches.split(",") if b] if device.type == "cuda" else []
    rows: list[dict] = []
    extra: dict = {}

    def save():
        write_json(out_path, dict(result_head, **once, bank_mb=bank_mb, results=rows, **extra))

    def use(variant: str):
        """Switch the pipeline to `variant` (see the module docstring)."""
        from retarget.kernels import KernelOptions

        pipe.unfuse_loras()
        pipe.fuse_loras = variant != "baseline"
        pipe.reference_state.fast = variant in ("fused_kv", "compiled", "per_frame_ref") or variant in KERNEL_VARIANTS
        pipe.kernels = KernelOptions(**KERNEL_VARIANTS.get(variant, {}))
        if variant == "compiled":
            if pipe._compiled_unet is None:
                pipe.compile_unet("reduce-overhead", dynamic=False)
        else:
            pipe._compiled_unet = None

    frames = rng.integers(0, 256, (max(batches), pipe.image_size, pipe.image_size, 3), dtype=np.uint8)

    def render(variant: str, expr: np.ndarray, **call):
        """One call as a job makes it: per_frame_ref first encodes its frames' references (writer once)."""
        who = pipe.frame_references(actor, frames[:len(expr)], seed=0) if variant == "per_frame_ref" else actor
        return pipe(who, expr, **call)

    def measure(mode: str, b: int, variant: str = "baseline", **call):
        if time.perf_counter() - t_start > args.deadline:
            rows.append(dict(mode=mode, variant=variant, batch=b, error=f"skipped: past the {args.deadline:.0f} s deadline"))
            print(f"{mode:16s} {variant:9s} B={b:3d}  skipped (deadline)", flush=True)
            return
        use(variant)
        expr = np.random.default_rng(b).standard_normal((b, 55)).astype(np.float32)
        try:
            t0 = time.perf_counter()
            render(variant, expr, seed=0, **dict(call, steps=min(2, call["steps"])))  # warm-up (and compile)
            sync(device)
            first_s = time.perf_counter() - t0
            if variant == "compiled":  # cudagraph trees record on a later call
                pipe(actor, expr, seed=0, **dict(call, steps=min(2, call["steps"])))
            reset_peak(device)
            sec = timed(lambda: render(variant, expr, seed=0, **call), device, repeat_small if b <= 4 else repeat_big)
            row = dict(mode=mode, variant=variant, batch=b, seconds=sec, frames_per_s=b / sec,
                       ms_per_frame=1e3 * sec / b, peak_mem_gb=peak_gb(device), first_call_s=first_s)
        except torch.cuda.OutOfMemoryError:
            row = dict(mode=mode, variant=variant, batch=b, error="out of memory")
            torch.cuda.empty_cache()
        except Exception as e:  # a failing variant (compile) must not cost the other numbers
            row = dict(mode=mode, variant=variant, batch=b, error=f"{e.__class__.__name__}: {str(e)[:300]}")
        rows.append(row)
        if "error" in row:
            print(f"{mode:16s} {variant:9s} B={b:3d}  {row['error']}", flush=True)
        else:
            mem = f"{row['peak_mem_gb']:.2f} GB" if row["peak_mem_gb"] is not None else "-"
            print(f"{mode:16s} {variant:9s} B={b:3d}  {sec:8.3f} s  {row['frames_per_s']:7.2f} frames/s  "
                  f"{row['ms_per_frame']:8.1f} ms/frame  peak {mem}  first call {first_s:.1f} s", flush=True)
        save()

    # same frames? fp16 on the GPU, fp32 on the CPU: each variant against the baseline at B=2
    expr2 = np.random.default_rng(99).standard_normal((2, 55)).astype(np.float32)
    same = {}
    for mode, call in modes.items():
        outs = {}
        for variant in [v for v in variants if v != "compiled" and runs_in(v, mode)]:
            use(variant)
            who = actor
            if variant == "per_frame_ref":  # every row's reference the fixed one: the same frames
                who = pipe.frame_references(actor, np.stack([ref_img] * len(expr2)), seed=0)
            try:
                outs[variant] = pipe(who, expr2, seed=3, **dict(call, steps=min(call["steps"], 8)), output_type="float")
            except Exception as e:  # a variant this machine cannot run (CUDA-only kernel, no torchao): noted, not fatal
                same[f"{mode}/{variant}"] = {"error": f"{e.__class__.__name__}: {str(e)[:300]}"}
        first = "baseline" if "baseline" in outs else next(iter(outs), None)  # (--variants without baseline)
        for variant, out in outs.items():
            ref_variant = "fused_kv" if variant in KERNEL_VARIANTS else first
            if variant != ref_variant and ref_variant in outs:
                d = np.abs(out - outs[ref_variant])
                same[f"{mode}/{variant}"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "vs": ref_variant,
                                             "psnr_db": psnr(out, outs[ref_variant]),
                                             "max_uint8": int(np.abs(np.round(out * 255) - np.round(outs[first] * 255)).max())}
    extra["equality_vs_baseline_8_steps"] = same
    print("frames vs baseline (8 steps, pixels in [0, 1]): " + ", ".join(
        f"{k} max {v['max_abs']:.2e} mean {v['mean_abs']:.2e}" if "error" not in v else f"{k} {v['error'][:80]}"
        for k, v in same.items()), flush=True)

    # cost of (re)folding the LoRA when the strength changes
    use("fused")
    pipe._use_loras({"reference": 0.8})
    sync(device)
    t0 = time.perf_counter()
    pipe._use_loras({"reference": 0.7})
    sync(device)
    extra["refuse_reference_ms"] = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    pipe._use_loras({"reference": 0.8, "lcm": 1.0})
    sync(device)
    extra["refuse_reference_lcm_ms"] = 1e3 * (time.perf_counter() - t0)
    pipe.unfuse_loras()

    for mode, call in modes.items():
        for b in batches:
            for variant in variants:
                if variant != "compiled" and runs_in(variant, mode):
                    measure(mode, b, variant, **call)

    # the cost of a reference per frame, per (mode, B): fused_kv time / per_frame_ref time
    cells = {(r["mode"], r["batch"], r["variant"]): r for r in rows if "error" not in r}
    extra["per_frame_ref_vs_fixed"] = {
        f"{m}/B={b}": dict(fixed_s=cells[(m, b, "fused_kv")]["seconds"], per_frame_s=cells[(m, b, "per_frame_ref")]["seconds"],
                           extra_pct=100 * (cells[(m, b, "per_frame_ref")]["seconds"] / cells[(m, b, "fused_kv")]["seconds"] - 1))
        for (m, b, v) in list(cells) if v == "per_frame_ref" and (m, b, "fused_kv") in cells}
    for k, v in extra["per_frame_ref_vs_fixed"].items():
        print(f"per-frame reference {k}: +{v['extra_pct']:.1f}% time over the fixed reference", flush=True)
    save()

    vb = 8 if 8 in batches else batches[-1]
    measure("dpm++25_cfg", vb, "fused_kv", **dict(modes["dpm++25_cfg_ref"], ref_strength=0.0))

    # opt-in torch.compile last: its compile time is the open question, and a deadline keeps the run in
    # its lease (compiled numbers for the batches that fit)
    if "compiled" in variants:
        for b in compile_batches:
            if time.perf_counter() - t_start > args.deadline:
                print(f"compiled B={b}: skipped, past the {args.deadline:.0f} s deadline", flush=True)
                extra.setdefault("compile_skipped", []).append(b)
                continue
            measure("dpm++25_cfg_ref", b, "compiled", **modes["dpm++25_cfg_ref"])
            if "error" not in rows[-1]:
                # same frames as eager?
                use("compiled")
                outs_c = pipe(actor, np.random.default_rng(b).standard_normal((b, 55)).astype(np.float32), seed=3,
                              **dict(modes["dpm++25_cfg_ref"], steps=8), output_type="float")
                use("fused_kv")
                outs_e = pipe(actor, np.random.default_rng(b).standard_normal((b, 55)).astype(np.float32), seed=3,
                              **dict(modes["dpm++25_cfg_ref"], steps=8), output_type="float")
                rows[-1]["max_abs_vs_eager_8_steps"] = float(np.abs(outs_c - outs_e).max())
                save()
        use("fused_kv")

    use("fused_kv")
    lat = torch.randn(vb, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size, device=device, dtype=dtype)
    pipe.decode(lat[:1])
    decode_ms = 1e3 * timed(lambda: pipe.decode(lat), device, 2) / vb

    if any(v in KERNEL_VARIANTS for v in variants):
        import kernel_bench

        extra["sdpa_choice"] = kernel_bench.sdpa_choices(pipe, actor)
        s = pipe.unet.config.sample_size
        lat_dec = torch.randn(max(batches), 4, s, s, device=device, dtype=dtype)  # room for large decode chunks
        extra["vae_decode"] = kernel_bench.vae_decode(pipe, lat_dec, lambda fn, n: timed(fn, device, n),
                                                      sync=lambda: sync(device))
        extra["kernels"] = kernel_bench.kernel_table(rows, same, variants, KERNEL_VARIANTS)
        save()

    ok = [r for r in rows if r.get("mode") == "dpm++25_cfg_ref" and "error" not in r]
    achieved = {}
    for variant in {r["variant"] for r in ok}:
        best = max((r for r in ok if r["variant"] == variant), key=lambda r: r["frames_per_s"])
        if flops_row:
            # UNet FLOPs of the whole loop over the measured time (the VAE decode included in the time)
            achieved[variant] = dict(batch=best["batch"],
                                     tflops=flops_row * 2 * best["batch"] * steps / best["seconds"] / 1e12)
    extra.update(unet_gflops_per_row_with_reference=flops_row / 1e9 if flops_row else None,
                 achieved_unet_tflops_at_best_batch=achieved, vae_decode_ms_per_frame=decode_ms)
    save()
    print_table(rows, variants)
    if "kernels" in extra:
        import kernel_bench

        kernel_bench.print_kernels(extra)
    print(f"VAE decode {decode_ms:.1f} ms/frame; "
          + ", ".join(f"{v}: {a['tflops']:.0f} TFLOP/s UNet at B={a['batch']}" for v, a in achieved.items()))
    print(f"wrote {out_path}")
    return 0


def runs_in(variant: str, mode: str) -> bool:
    """Fast-mode-only variants (CUDA graphs, VAE-only switches) are measured in the LCM mode alone."""
    return variant not in FAST_MODE_ONLY or mode.startswith("lcm")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images a against b, floats in [0, 1]; None when they are equal."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return None if mse == 0 else float(10 * np.log10(1.0 / mse))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def print_table(rows: list[dict], variants: list[str]) -> None:
    """frames/s per (mode, B) and variant, with the ratio to the baseline."""
    cells = {(r["mode"], r["batch"], r["variant"]): r for r in rows}
    keys = sorted({(r["mode"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1]))
    print("\n" + f"{'mode':16s} {'B':>3s} " + " ".join(f"{v:>18s}" for v in variants))
    for mode, b in keys:
        base = cells.get((mode, b, "baseline"))
        line = f"{mode:16s} {b:3d} "
        for v in variants:
            r = cells.get((mode, b, v))
            if r is None:
                line += f"{'':>18s} "
            elif "error" in r:
                line += f"{'error':>18s} "
            else:
                ratio = f" x{r['frames_per_s'] / base['frames_per_s']:.2f}" if base and "error" not in base else ""
                line += f"{r['frames_per_s']:9.2f} f/s{ratio:>6s} "
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
