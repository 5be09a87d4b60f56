"""Folding the active LoRA adapters into the UNet's own weights for a denoising loop.

The reference strength (and the LCM-LoRA in fast mode) is fixed for a whole video, so the loop need not
run peft's LoRA branch (`base(x) + B(A(x)) * scale`: two small GEMMs, a scale and an add per layer per
step, plus peft's Python) on every call. `fuse` writes `W + sum_a scale_a * B_a @ A_a` into each LoRA'd
layer's base weight (computed in float32, cast once to the weight's dtype) and puts the plain base
layer in the peft wrapper's place in the module tree; `unfuse` copies the saved original weights back
(bit for bit: no fp16 drift from repeated fuse/unfuse) and puts the wrappers back.

While fused, the UNet holds no peft layers: peft calls (`set_adapters`, `enable_lora`, ...) would find
nothing to act on, so every such call must `unfuse` first. `RetargetPipeline._set_loras` and the
reference writer pass do. The fused state lives on the UNet (attribute `_retarget_fused`), so any code
holding the UNet can restore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ATTR = "_retarget_fused"


@dataclass
class FusedLoras:
    """What `fuse` changed: adapters and scales folded in, wrappers taken out, original weights saved.

    key: ((adapter name, strength), ...) as given to `fuse`. swapped: (parent module, attribute, peft
    wrapper) per LoRA layer, in module order. backups: (weight parameter, its original values on the CPU).
    """

    key: tuple
    swapped: list = field(default_factory=list)
    backups: list = field(default_factory=list)


def _lora_layers(unet) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora.layer import LoraLayer

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, LoraLayer)]


def _fusable_layer(layer, adapters) -> bool:
    """Plain LoRA on an nn.Linear or a groups=1 nn.Conv2d: no DoRA or other variant, no LoRA bias,
    no fan_in_fan_out, no other adapter type; anything else keeps peft's unfused path."""
    base = layer.get_base_layer()
    if type(base) not in (nn.Linear, nn.Conv2d):
        return False
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        return False
    if getattr(layer, "fan_in_fan_out", False):
        return False
    for a in adapters:
        if a not in layer.lora_A:
            continue
        if a in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(a, False):
            return False
        if getattr(layer, "lora_bias", {}).get(a, False) or layer.lora_B[a].bias is not None:
            return False
    return True


def fusable(unet, adapters) -> bool:
    """True when every LoRA layer of `unet` carrying one of `adapters` can be folded exactly (see
    `_fusable_layer`) and nothing is fused yet; unet without LoRA layers: False (nothing to gain)."""
    if getattr(unet, ATTR, None) is not None:
        return False
    layers = _lora_layers(unet)
    return bool(layers) and all(_fusable_layer(m, adapters) for _, m in layers)


def delta_weight(layer, adapter: str) -> torch.Tensor:
    """scale * B @ A of one adapter of one peft LoRA layer, float32, in the base weight's shape.

    Uses the layer's current `scaling[adapter]` (peft's alpha / r times the strength set by
    `set_adapters`), so the fused layer computes what the unfused one does."""
    a = layer.lora_A[adapter].weight.float()
    b = layer.lora_B[adapter].weight.float()
    scale = float(layer.scaling[adapter])
    if a.ndim == 2:  # Linear: A (r, in), B (out, r)
        return (b @ a) * scale
    # Conv2d: A (r, in, kh, kw), B (out, r, 1, 1): delta[o, i] = sum_r B[o, r] A[r, i]
    return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * scale


@torch.no_grad()
def fuse(unet, adapters, key: tuple = ()) -> FusedLoras:
    """Fold `adapters` (names, with peft's current scales) into the base weights of `unet` and take the
    peft wrappers out of the module tree. Call `fusable` first. Layers without any of the adapters are
    unwrapped unchanged. Returns the record, also kept on the UNet for `unfuse`."""
    if getattr(unet, ATTR, None) is not None:
        raise RuntimeError("LoRA already fused into this UNet: unfuse first")
    record = FusedLoras(key=tuple(key))
    try:
        for name, layer in _lora_layers(unet):
            base = layer.get_base_layer()
            here = [a for a in adapters if a in layer.lora_A]
            if here:
                w = base.weight
                delta = sum(delta_weight(layer, a) for a in here)
                record.backups.append((w, w.detach().to("cpu", copy=True)))
                w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
            parent_name, _, attr = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, attr, base)
            record.swapped.append((parent, attr, layer))
    except BaseException:
        _restore(record)
        raise
    setattr(unet, ATTR, record)
    return record


@torch.no_grad()
def _restore(record: FusedLoras) -> None:
    for w, saved in reversed(record.backups):
        w.copy_(saved)
    for parent, attr, layer in reversed(record.swapped):
        setattr(parent, attr, layer)


def unfuse(unet) -> bool:
    """Undo `fuse`: original weights back bit for bit, peft wrappers back in place. False if nothing was fused."""
    record = getattr(unet, ATTR, None)
    if record is None:
        return False
    _restore(record)
    setattr(unet, ATTR, None)
    return True


def fused_key(unet) -> tuple | None:
    """The key of what is fused into `unet` now, or None when nothing is."""
    record = getattr(unet, ATTR, None)
    return None if record is None else record.key
