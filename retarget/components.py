"""Loading the diffusion components of the release (SPEC.md §1) from a `WeightsLayout`.

Each loader turns whatever the underlying library raises for a missing, truncated or mismatched
file into one `WeightsError` that names the file. Nothing here builds a pipeline; `pipeline.py`
puts the pieces together.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch

from retarget.weights import WeightsError, WeightsLayout

SCHEDULERS = ("dpm++", "lcm")


@contextlib.contextmanager
def _naming(path: Path, what: str):
    """Re-raise any loader failure as a WeightsError naming `path`."""
    try:
        yield
    except WeightsError:
        raise
    except Exception as e:  # diffusers/transformers/torch raise many types for bad files
        msg = " ".join(str(e).split())[:240]
        raise WeightsError(f"{path} is not usable as the {what}: {e.__class__.__name__}: {msg}") from None


def load_unet(layout: WeightsLayout, dtype: torch.dtype = torch.float32):
    """The Arc2Face UNet (`arc2face/`) as a diffusers `UNet2DConditionModel` in `dtype`, eval mode."""
    from diffusers import UNet2DConditionModel

    path = layout.require("arc2face_unet")
    with _naming(path, "Arc2Face UNet"):
        unet = UNet2DConditionModel.from_pretrained(path, torch_dtype=dtype)
    if unet.config.cross_attention_dim != 768:
        raise WeightsError(f"{path}: cross_attention_dim is {unet.config.cross_attention_dim}, Arc2Face uses 768")
    return unet.eval()


def load_vae(layout: WeightsLayout, dtype: torch.dtype = torch.float32):
    """The SD 1.5 VAE (`vae/`) as a diffusers `AutoencoderKL` in `dtype`, eval mode."""
    from diffusers import AutoencoderKL

    path = layout.require("vae")
    with _naming(path, "SD 1.5 VAE"):
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    return vae.eval()


def load_text_encoder(layout: WeightsLayout, dtype: torch.dtype = torch.float32):
    """The fine-tuned CLIP text encoder (`encoder/`, transformers `CLIPTextModel`) in `dtype`, eval mode."""
    from transformers import CLIPTextModel

    path = layout.require("encoder")
    with _naming(path, "CLIP text encoder"):
        encoder = CLIPTextModel.from_pretrained(path)
    return encoder.to(dtype).eval()


def load_tokenizer(layout: WeightsLayout):
    """The SD 1.5 CLIP tokenizer (`tokenizer/`)."""
    from transformers import CLIPTokenizer

    path = layout.require("tokenizer")
    with _naming(path, "CLIP tokenizer"):
        return CLIPTokenizer.from_pretrained(path)


def load_scheduler_config(layout: WeightsLayout) -> dict:
    """The SD 1.5 scheduler config (`scheduler/scheduler_config.json`) as a dict."""
    path = layout.require("scheduler") / "scheduler_config.json"
    with _naming(path, "scheduler config"):
        config = json.loads(path.read_text())
        if "num_train_timesteps" not in config:
            raise ValueError("no num_train_timesteps")
    return config


def make_scheduler(config: dict, kind: str = "dpm++"):
    """A fresh scheduler from the SD 1.5 config: "dpm++" -> `DPMSolverMultistepScheduler` (the release's
    sampler), "lcm" -> `LCMScheduler` (the base model's LCM-LoRA fast mode)."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    classes = {"dpm++": DPMSolverMultistepScheduler, "lcm": LCMScheduler}
    if kind in classes:
        cls = classes[kind]
        # Keys the class does not take (PNDM's skip_prk_steps for LCM) would only print a warning per call.
        accepted = inspect.signature(cls.__init__).parameters
        return cls.from_config({k: v for k, v in dict(config).items() if k in accepted or k.startswith("_")})
    from render.errors import RetargetError

    raise RetargetError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {kind!r}")


def load_exp_adapter_state(path: Path) -> dict:
    """The Expression Adapter file (`exp_adapter/exp_adapter.bin`): a dict with `image_proj` and
    `ip_adapter` sub-dicts of tensors, checked to take 55-d inputs."""
    from retarget.adapters.expression import check_adapter_state

    if not Path(path).is_file():
        raise WeightsError(f"missing {path} (Expression Adapter)")
    with _naming(path, "Expression Adapter"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    check_adapter_state(state, path)
    return state


def load_lora_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A LoRA file (.safetensors, diffusers or kohya key format) as a state dict of tensors."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise WeightsError(f"missing {path} ({what})")
    with _naming(path, what):
        state = load_file(str(path))
    if not any("lora" in k for k in state):
        raise WeightsError(f"{path} is not usable as the {what}: no LoRA tensors (keys containing 'lora')")
    return state
