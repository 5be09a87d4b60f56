"""The kernel part of bench/pipeline.py (retarget/kernels.py's switches): which SDPA kernel torch picks for
the UNet's attention shapes, the VAE decode broken down, and the kernel table (speed and deviation of each
switch against the default, fused_kv). Imported by bench/pipeline.py; not run on its own."""

from __future__ import annotations

import numpy as np
import torch

PREFERENCES = ("auto", "cudnn", "flash", "efficient")


def _psnr(a, b):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return None if mse == 0 else float(10 * np.log10(1.0 / mse))


def sdpa_choices(pipe, actor, rows: int = 2) -> dict:
    """For each distinct attention shape of the UNet (self-attention reading the bank: keys = the frame's
    tokens + the bank's; cross-attention on the 77 prompt tokens; the Expression Adapter's 4 tokens) and of
    the VAE's mid-block, the kernel the dispatcher picks under each preference, in the pipeline's dtype."""
    from retarget import kernels

    device, dtype = pipe.device, pipe.unet.dtype
    shapes = {}
    for name, ref in actor.bank.states.items():
        attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
        n, c = ref.shape[1], ref.shape[2]
        d = c // attn.heads
        shapes[f"bank read: {n} queries, {2 * n} keys, {attn.heads}x{d}"] = (attn.heads, n, 2 * n, d)
        shapes[f"cross: {n} queries, 77 keys, {attn.heads}x{d}"] = (attn.heads, n, 77, d)
        shapes[f"expression: {n} queries, 4 keys, {attn.heads}x{d}"] = (attn.heads, n, 4, d)
    s = pipe.unet.config.sample_size
    c_vae = pipe.vae.config.block_out_channels[-1]
    shapes[f"VAE mid: {s * s} queries, {s * s} keys, 1x{c_vae}"] = (1, s * s, s * s, c_vae)
    out = {}
    for label, (h, nq, nk, d) in shapes.items():
        q = torch.zeros(rows, h, nq, d, device=device, dtype=dtype)
        k = torch.zeros(rows, h, nk, d, device=device, dtype=dtype)
        picks = {}
        for pref in PREFERENCES:
            try:
                with kernels.attention_backend(pref, device):
                    picks[pref] = kernels.sdpa_choice(q, k, k)
            except Exception as e:  # a CUDA-only preference on the CPU
                picks[pref] = f"n/a ({e.__class__.__name__})"
        out[label] = picks
    for label, picks in out.items():
        print(f"sdpa {label:48s} " + "  ".join(f"{p}->{c}" for p, c in picks.items()), flush=True)
    return out


def _profile_decode(pipe, lat) -> list[dict]:
    """Device time of one decode by operator (top 12), as shares of the total."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pipe.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        pipe.decode(lat)
    events = prof.key_averages()

    attrs = ("self_device_time_total", "self_cuda_time_total") if pipe.device.type == "cuda" else ("self_cpu_time_total",)

    def dev_time(e):
        for attr in attrs:
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    items = sorted(((e.key, dev_time(e)) for e in events), key=lambda kv: -kv[1])
    total = sum(t for _, t in items) or 1.0
    return [dict(op=k, ms=t / 1e3, share=t / total) for k, t in items[:12]]


def vae_decode(pipe, lat, timed, sync) -> dict:
    """ms per frame of `pipe.decode(lat)` under each decode setting, its deviation from the default
    (uint8-equivalent max abs, PSNR), and where the default's time goes (by operator)."""
    from retarget.kernels import KernelOptions, set_memory_format
    from retarget.pipeline import DECODE_BATCH

    b = lat.shape[0]
    configs = {f"default (chunks of {DECODE_BATCH})": {}}
    for chunk in (4, 8, 16, 32):
        if chunk <= b and chunk != DECODE_BATCH:
            configs[f"chunks of {chunk}"] = dict(decode_batch=chunk)
    configs.update({"channels_last": dict(vae_channels_last=True), "cudnn_benchmark": dict(cudnn_benchmark=True),
                    "channels_last + cudnn_benchmark": dict(vae_channels_last=True, cudnn_benchmark=True),
                    f"channels_last + cudnn_benchmark, chunks of {b}": dict(vae_channels_last=True,
                                                                           cudnn_benchmark=True, decode_batch=b),
                    "fp32 (upcast)": dict(vae_upcast=True)})
    out, ref = {}, None
    for label, opts in configs.items():
        pipe.kernels = KernelOptions(**opts)
        try:
            img = pipe.decode(lat)  # warm-up (and the cuDNN search, the fp32 copy)
            sync()
            ms = 1e3 * timed(lambda: pipe.decode(lat), 3) / b
        except Exception as e:
            out[label] = dict(error=f"{e.__class__.__name__}: {str(e)[:200]}")
            continue
        ref = img if ref is None else ref
        out[label] = dict(ms_per_frame=ms, max_abs=float(np.abs(img - ref).max()), psnr_db=_psnr(img, ref))
        psnr = out[label]["psnr_db"]
        print(f"VAE decode {label:44s} {ms:7.2f} ms/frame  max abs {out[label]['max_abs']:.2e}  "
              f"PSNR {'exact' if psnr is None else f'{psnr:.1f} dB'}", flush=True)
    pipe.kernels = KernelOptions()
    set_memory_format(pipe.vae, False)
    pipe._kernel_state.vae32 = None
    try:
        ops = _profile_decode(pipe, lat[:min(8, b)])
    except Exception as e:
        ops = [dict(error=f"{e.__class__.__name__}: {str(e)[:200]}")]
    for o in ops[:8]:
        if "op" in o:
            print(f"VAE decode time: {o['op'][:60]:60s} {100 * o['share']:5.1f}%", flush=True)
    return dict(batch=b, configs=out, default_by_operator=ops)


def kernel_table(rows: list[dict], same: dict, variants: list[str], kernel_variants: dict) -> list[dict]:
    """One entry per (kernel variant, mode, B): frames/s, ratio to fused_kv, deviation from fused_kv."""
    cells = {(r["mode"], r["batch"], r["variant"]): r for r in rows}
    table = []
    for (mode, b, variant), r in sorted(cells.items()):
        if variant not in kernel_variants:
            continue
        base = cells.get((mode, b, "fused_kv"))
        dev = same.get(f"{mode}/{variant}", {})
        entry = dict(variant=variant, mode=mode, batch=b, switch=kernel_variants[variant],
                     frames_per_s=r.get("frames_per_s"), error=r.get("error"),
                     vs_default=(r["frames_per_s"] / base["frames_per_s"]
                                 if "error" not in r and base and "error" not in base else None),
                     max_abs=dev.get("max_abs"), mean_abs=dev.get("mean_abs"), psnr_db=dev.get("psnr_db"),
                     max_uint8=dev.get("max_uint8"))
        table.append(entry)
    return table


def print_kernels(extra: dict) -> None:
    print(f"\n{'kernel variant':18s} {'mode':16s} {'B':>3s} {'frames/s':>9s} {'vs fused_kv':>11s} "
          f"{'max abs':>9s} {'PSNR dB':>8s}")
    for e in extra["kernels"]:
        if e["error"]:
            print(f"{e['variant']:18s} {e['mode']:16s} {e['batch']:3d} {e['error'][:70]}")
            continue
        psnr = "exact" if e["psnr_db"] is None and e["max_abs"] is not None else (
            "-" if e["psnr_db"] is None else f"{e['psnr_db']:.1f}")
        ratio = "-" if e["vs_default"] is None else f"x{e['vs_default']:.3f}"
        mx = "-" if e["max_abs"] is None else f"{e['max_abs']:.2e}"
        print(f"{e['variant']:18s} {e['mode']:16s} {e['batch']:3d} {e['frames_per_s']:9.2f} {ratio:>11s} "
              f"{mx:>9s} {psnr:>8s}")
