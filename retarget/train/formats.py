"""The trained tensors in the release formats (SPEC.md §1), and fresh starting points for them.

- Expression Adapter: `exp_adapter/exp_adapter.bin`, a torch state dict {"image_proj": {...}, "ip_adapter":
  {"<k>.to_k_ip.weight", "<k>.to_v_ip.weight"}} exactly as diffusers' `load_ip_adapter` reads it: the
  projection under the file's own key names (whatever type the starting file had; diffusers renames them on
  load, `image_proj_key_map` finds the inverse), the k-th cross-attention of `unet.attn_processors` under
  key 1 + 2k (diffusers' numbering).
- Reference Adapter: `ref_adapter/pytorch_lora_weights.safetensors` in the diffusers LoRA format
  (`unet.<module>.lora.down.weight` / `.lora.up.weight`, what diffusers' training scripts save). No alphas
  are stored, so a loader takes alpha = rank; any other peft scaling is folded into the up matrices.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from render.errors import RetargetError
from render.files import atomic_open

EXP_FILE = "exp_adapter/exp_adapter.bin"
REF_FILE = "ref_adapter/pytorch_lora_weights.safetensors"
REF_ADAPTER = "reference"


def ip_processors(unet) -> list[tuple[str, torch.nn.Module]]:
    """(processor name, processor) of every IP-Adapter cross-attention, in diffusers' key order."""
    return [(n, p) for n, p in unet.attn_processors.items()
            if not n.endswith("attn1.processor") and hasattr(p, "to_k_ip")]


def image_proj_key_map(unet, image_proj: dict) -> dict[str, str]:
    """{file key: parameter name in unet.encoder_hid_proj.image_projection_layers[0]} for a projection that
    diffusers loads by renaming keys (ImageProjection, the FaceID and Full-face MLPs). Found by loading a
    copy of `image_proj` whose k-th tensor is filled with k + 1 through diffusers' own converter, so it holds
    for whatever naming diffusers uses. Raises RetargetError for projections whose loading mixes tensors."""
    tagged = {k: torch.full(tuple(v.shape), float(i + 1)) for i, (k, v) in enumerate(image_proj.items())}
    keys = list(image_proj)
    module = unet._convert_ip_adapter_image_proj_to_diffusers(tagged, low_cpu_mem_usage=False)
    out = {}
    for name, value in module.state_dict().items():
        vals = torch.unique(value.float())
        if len(vals) != 1 or not 1 <= int(vals[0]) <= len(keys) or float(vals[0]) != int(vals[0]):
            raise RetargetError(f"the Expression Adapter projection {type(module).__name__} is not saved by renaming "
                                "keys; training it is not supported")
        key = keys[int(vals[0]) - 1]
        if image_proj[key].numel() != value.numel():
            raise RetargetError(f"Expression Adapter projection tensor {key} changes size on loading; not supported")
        out[key] = name
    if set(out) != set(keys):
        raise RetargetError(f"Expression Adapter projection keys {sorted(set(keys) - set(out))} have no parameter")
    return out


def exp_adapter_state(unet, key_map: dict[str, str], file_shapes: dict[str, tuple]) -> dict:
    """The Expression Adapter of `unet` as the release's state dict (fp32 CPU copies).
    key_map: from `image_proj_key_map`; file_shapes: shape of each image_proj tensor in the file."""
    proj = dict(unet.encoder_hid_proj.image_projection_layers[0].named_parameters())
    proj.update(dict(unet.encoder_hid_proj.image_projection_layers[0].named_buffers()))
    image_proj = {k: proj[n].detach().float().cpu().reshape(file_shapes[k]).clone() for k, n in key_map.items()}
    ip = {}
    for i, (_, p) in enumerate(ip_processors(unet)):
        if len(p.to_k_ip) != 1:
            raise RetargetError("the UNet carries several IP-Adapters; the Expression Adapter must be the only one")
        ip[f"{1 + 2 * i}.to_k_ip.weight"] = p.to_k_ip[0].weight.detach().float().cpu().clone()
        ip[f"{1 + 2 * i}.to_v_ip.weight"] = p.to_v_ip[0].weight.detach().float().cpu().clone()
    return {"image_proj": image_proj, "ip_adapter": ip}


def exp_adapter_params(unet) -> dict[str, torch.nn.Parameter]:
    """The Expression Adapter's trainable parameters by their name in `unet`."""
    names = {id(p): n for n, p in unet.named_parameters()}
    params = list(unet.encoder_hid_proj.parameters())
    for _, proc in ip_processors(unet):
        params += list(proc.to_k_ip.parameters()) + list(proc.to_v_ip.parameters())
    return {names[id(p)]: p for p in params}


def lora_layers(unet, adapter: str = REF_ADAPTER) -> list[tuple[str, torch.nn.Module]]:
    """(module name, peft LoRA layer) of every layer carrying `adapter`."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def lora_params(unet, adapter: str = REF_ADAPTER) -> dict[str, torch.nn.Parameter]:
    """The LoRA `adapter`'s trainable parameters (A and B matrices) by their name in `unet`."""
    return {n: p for n, p in unet.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n}


def lora_state(unet, adapter: str = REF_ADAPTER) -> dict[str, torch.Tensor]:
    """The LoRA `adapter` in the diffusers file format, fp32 CPU; peft's alpha / r folded into `up` so that
    a file without alphas (alpha = r on loading) computes the same. Set-adapters strengths are not folded."""
    out = {}
    for name, layer in lora_layers(unet, adapter):
        a = layer.lora_A[adapter].weight.detach().float().cpu()
        b = layer.lora_B[adapter].weight.detach().float().cpu()
        r = a.shape[0]
        alpha_over_r = layer.lora_alpha[adapter] / layer.r[adapter] if hasattr(layer, "lora_alpha") else 1.0
        if a.ndim != 2 or r != layer.r[adapter]:
            raise RetargetError(f"LoRA layer {name} is not a plain linear LoRA; cannot save it in the diffusers format")
        out[f"unet.{name}.lora.down.weight"] = a.clone()
        out[f"unet.{name}.lora.up.weight"] = (b * alpha_over_r).clone() if alpha_over_r != 1.0 else b.clone()
    if not out:
        raise RetargetError(f"the UNet carries no LoRA named {adapter!r}")
    return out


def save_exp_adapter(state: dict, path: str | os.PathLike) -> Path:
    """Write an Expression Adapter state dict to `path` (torch.save, atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(state, f)
    return path


def save_lora(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a LoRA state dict to `path` as safetensors (atomically, {"format": "pt"} metadata as diffusers)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    with atomic_open(path, "wb") as f:
        f.write(data)
    return path


def fresh_exp_adapter(unet_plain, release_state: dict, seed: int = 0) -> dict:
    """A new Expression Adapter of the release file's shapes (so its projection type): projection matrices
    drawn N(0, 0.02), biases 0, LayerNorm weights 1; to_k_ip / to_v_ip copied from the k / v projections of
    each cross-attention of `unet_plain` (a UNet without the adapter), as IP-Adapter training starts."""
    g = torch.Generator().manual_seed(seed)
    proj = {}
    for k, v in release_state["image_proj"].items():
        if v.ndim >= 2:
            proj[k] = torch.randn(tuple(v.shape), generator=g) * 0.02
        elif k.endswith("bias"):
            proj[k] = torch.zeros_like(v, dtype=torch.float32)
        else:  # 1-d weights: LayerNorm
            proj[k] = torch.ones_like(v, dtype=torch.float32)
    ip = {}
    cross = [n for n in unet_plain.attn_processors if not n.endswith("attn1.processor")]
    for i, name in enumerate(cross):
        attn = unet_plain.get_submodule(name.removesuffix(".processor"))
        ip[f"{1 + 2 * i}.to_k_ip.weight"] = attn.to_k.weight.detach().float().cpu().clone()
        ip[f"{1 + 2 * i}.to_v_ip.weight"] = attn.to_v.weight.detach().float().cpu().clone()
    if set(ip) != set(release_state["ip_adapter"]):
        raise RetargetError("the UNet's cross-attention layers do not match the released Expression Adapter")
    return {"image_proj": proj, "ip_adapter": ip}


def fresh_lora(unet_plain, rank: int, targets: str = "attn1", seed: int = 0) -> dict[str, torch.Tensor]:
    """A new LoRA in the diffusers file format on the to_q/to_k/to_v/to_out.0 layers of every self-attention
    (`targets` "attn1", the paper's Reference Adapter) or of all attention ("all"): down matrices drawn
    N(0, 1/rank) (peft's "gaussian" init), up matrices zero, so training starts from the plain UNet."""
    if rank < 1:
        raise RetargetError(f"--rank must be >= 1, got {rank}")
    g = torch.Generator().manual_seed(seed)
    names = ("to_q", "to_k", "to_v", "to_out.0")
    where = ".attn1." if targets == "attn1" else ".attn"
    sd = {}
    for name, m in unet_plain.named_modules():
        if isinstance(m, torch.nn.Linear) and where in name and name.endswith(names):
            sd[f"unet.{name}.lora.down.weight"] = torch.randn(rank, m.in_features, generator=g) / rank
            sd[f"unet.{name}.lora.up.weight"] = torch.zeros(m.out_features, rank)
    return sd
