"""The Expression Adapter (SPEC.md §3): an IP-Adapter whose "image embedding" is a 55-d vector.

Loading and the attention itself are diffusers' own IP-Adapter machinery (`IPAdapterMixin.load_ip_adapter`
with no image encoder, `IPAdapterAttnProcessor2_0` on every cross-attention): the projection type is
whatever diffusers infers from the file's `image_proj` keys. This module validates inputs and builds the
per-frame embeddings the UNet takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from render.errors import RetargetError

N_EXP = 55  # FLAME expression (50) ++ eyelids (2) ++ jaw (3)


def check_adapter_state(state, path: Path | str) -> None:
    """Raise WeightsError unless `state` looks like an IP-Adapter file that takes 55-d inputs."""
    from retarget.weights import WeightsError

    if not isinstance(state, dict) or not isinstance(state.get("image_proj"), dict) \
            or not isinstance(state.get("ip_adapter"), dict):
        raise WeightsError(f"{path} is not an IP-Adapter file: expected top-level dicts 'image_proj' and 'ip_adapter'")
    proj = state["image_proj"]
    first = next((proj[k] for k in ("proj.weight", "proj.0.weight") if k in proj), None)
    if first is not None and first.shape[-1] != N_EXP:
        raise WeightsError(f"{path}: the projection takes {first.shape[-1]}-d inputs, the Expression Adapter takes {N_EXP}")
    if not any(k.endswith("to_k_ip.weight") for k in state["ip_adapter"]):
        raise WeightsError(f"{path}: 'ip_adapter' holds no to_k_ip weights")


def load_expression_adapter(pipe, state: dict, path: Path | str = "exp_adapter.bin") -> str:
    """Load the adapter into `pipe.unet` with diffusers' stock loader. Returns the projection's class name.

    pipe: a DiffusionPipeline with IPAdapterMixin. Any mismatch with the UNet (layer count, sizes)
    becomes a WeightsError naming `path`.
    """
    from diffusers.utils import logging as dlogging

    from retarget.weights import WeightsError

    check_adapter_state(state, path)
    previous = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # silence "image_encoder is not loaded": we have none, by design
    try:
        pipe.load_ip_adapter(state, subfolder=None, weight_name=None, image_encoder_folder=None)
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise WeightsError(f"{path} does not fit the Arc2Face UNet: {e.__class__.__name__}: {msg}") from None
    finally:
        dlogging.set_verbosity(previous)
    return type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__


def check_expressions(expressions, n: int = N_EXP) -> torch.Tensor:
    """Validate per-frame expression vectors.

    expressions: (B, 55) array-like (numpy or torch), B >= 1, finite. Returns float32 CPU tensor (B, 55).
    """
    x = expressions if torch.is_tensor(expressions) else torch.from_numpy(np.asarray(expressions, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != n or x.shape[0] < 1:
        raise RetargetError(f"expressions must have shape (B, {n}) (FLAME expression 50 ++ eyelids 2 ++ jaw 3), "
                            f"got {tuple(x.shape)}")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
        raise RetargetError(f"expressions hold NaN or infinite values in frame(s) {bad[:10]}")
    return x


def expression_embeds(expressions: torch.Tensor, *, cfg: bool, device, dtype,
                      uncond: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The `image_embeds` list the UNet takes: [(2B, 1, 55)] = [uncond ; cond] with CFG, else [(B, 1, 55)].

    The unconditional half is all zeros as in the release; `uncond` (B, 55) overrides it (tests use this
    to show that the unconditional rows do not leak into the conditional ones).
    """
    cond = expressions.to(device=device, dtype=dtype)[:, None, :]
    if not cfg:
        return [cond]
    neg = torch.zeros_like(cond) if uncond is None else uncond.to(device=device, dtype=dtype)[:, None, :]
    return [torch.cat([neg, cond], dim=0)]
