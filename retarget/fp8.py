"""Opt-in FP8 linear layers for the UNet (`pipe.kernels.fp8 = True`), through torchao.

Which layers: the Linears of every transformer block, i.e. the self- and cross-attention projections
(to_q, to_k, to_v, to_out.0) and the feed-forward (ff.net.0.proj, ff.net.2), where nearly all the UNet's
Linear FLOPs are. Not the convolutions, the time embedding, the Expression Adapter's to_k_ip/to_v_ip
(4 tokens) or peft's LoRA layers.

How: for the denoising loop, each target Linear (with the LoRA already folded into it, retarget/adapters/
fusion.py) is replaced in the module tree by an FP8 copy made with torchao's
`quantize_(..., Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))` (weights in e4m3 with one
scale per output row, activations quantized per row on the fly, `torch._scaled_mm`); after the loop the
original modules go back, so the writer pass, unfusing and saving see the fp16 weights untouched. The FP8
copies are kept for the next call and rebuilt when the folded LoRA scales change.

Needs torchao (tested against 0.18.0's API) and a CUDA GPU of compute capability >= 8.9 (H100/H200, L40S,
RTX 4090); elsewhere a RetargetError says so. FP8 is not exact: bench/pipeline.py reports its deviation
(max abs and PSNR of decoded frames against the fp16 output) beside its speed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from render.errors import RetargetError
from retarget.adapters import fusion

TARGET_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                   "ff.net.0.proj", "ff.net.2")
MIN_CAPABILITY = (8, 9)


def fp8_targets(unet: nn.Module) -> list[str]:
    """Names of the plain nn.Linear modules of `unet` that FP8 replaces (see the module docstring);
    a LoRA'd layer still wrapped by peft (LoRA not folded) is left alone."""
    return [name for name, m in unet.named_modules()
            if type(m) is nn.Linear and ".transformer_blocks." in f".{name}" and name.endswith(TARGET_SUFFIXES)]


def import_torchao():
    """torchao's quantize_ API, or RetargetError naming what to install."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    except ImportError as e:
        raise RetargetError("FP8 linear layers (pipe.kernels.fp8) need torchao: pip install 'torchao>=0.18' "
                            f"(import failed: {e})") from None
    return quantize_, Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor


def check_fp8_device(device: torch.device) -> None:
    """RetargetError unless `device` is a CUDA GPU with FP8 matrix units (compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RetargetError(f"FP8 linear layers (pipe.kernels.fp8) need a CUDA GPU of compute capability >= 8.9; "
                            f"the pipeline is on {device.type}")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise RetargetError(f"FP8 linear layers need compute capability >= 8.9 (H100, L40S, RTX 4090); "
                            f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")


def torchao_quantizer():
    """The default `quantize(holder: nn.ModuleDict) -> None`: torchao FP8 with dynamic activation
    scales, one per row for bf16 layers and one per tensor for fp16 ones (torchao 0.18's per-row
    kernels take bf16 only: on the H200 in fp16 they refused, "PerRow quantization only works for
    bfloat16 precision", 2026-12-03; the per-tensor path for fp16 has not run on a GPU yet)."""
    quantize_, config_cls, per_row, per_tensor = import_torchao()

    def quantize(holder: nn.ModuleDict) -> None:
        dtype = next(holder.parameters()).dtype
        quantize_(holder, config_cls(granularity=per_row() if dtype == torch.bfloat16 else per_tensor()))

    return quantize


def _copy_linear(lin: nn.Linear) -> nn.Linear:
    new = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


class Fp8Linears:
    """FP8 copies of a UNet's target Linears, swapped in for a loop (`swapped`) and kept between calls.

    quantize: turns an nn.ModuleDict of Linear copies into their quantized forms in place; default
    torchao's FP8 (`torchao_quantizer`), which also checks the device. Tests pass their own."""

    def __init__(self, quantize=None, *, check_device: bool | None = None):
        self.quantize = quantize
        self.check_device = quantize is None if check_device is None else check_device
        self.key = None
        self.modules: dict[str, nn.Module] = {}

    def _build(self, unet, targets: list[str]) -> None:
        if self.check_device:
            check_fp8_device(unet.device)
        quantize = self.quantize or torchao_quantizer()
        holder = nn.ModuleDict({name.replace(".", "__"): _copy_linear(unet.get_submodule(name)) for name in targets})
        quantize(holder)
        self.modules = {name: holder[name.replace(".", "__")] for name in targets}

    @contextlib.contextmanager
    def swapped(self, unet):
        """Within the block the target Linears of `unet` are the FP8 copies; the originals come back after."""
        targets = fp8_targets(unet)
        if not targets:
            yield
            return
        first = unet.get_submodule(targets[0]).weight
        key = (fusion.fused_key(unet), tuple(targets), first.data_ptr(), first.device, first.dtype)
        if key != self.key:
            self.modules, self.key = {}, None
            self._build(unet, targets)
            self.key = key
        originals = []
        try:
            for name in targets:
                parent_name, _, attr = name.rpartition(".")
                parent = unet.get_submodule(parent_name)
                originals.append((parent, attr, getattr(parent, attr)))
                setattr(parent, attr, self.modules[name])
            yield
        finally:
            for parent, attr, module in reversed(originals):
                setattr(parent, attr, module)
