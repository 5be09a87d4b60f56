"""The SMIRK expression encoder (SPEC.md §5): face crop -> 55 FLAME parameters.

Architecture as released: timm ``tf_mobilenetv3_large_minimal_100`` as a feature extractor
(last feature map, global average pooled, 960 channels) and one linear layer to 55 outputs.
Submodule names match the release checkpoint (``encoder``, ``expression_layers``), so the
tensors under ``smirk_encoder.expression_encoder.`` load as they are. Input: RGB crops of
224x224 in [0, 1], NCHW, no mean/std normalisation (the release demo divides by 255 only).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from render.errors import RetargetError

BACKBONE = "tf_mobilenetv3_large_minimal_100"
FEATURE_DIM = 960
N_EXPRESSION = 50
N_PARAMS = 55  # expression 50 ++ eyelids 2 ++ jaw 3
CROP_SIZE = 224
CHECKPOINT_PREFIX = "smirk_encoder.expression_encoder."
WHERE_FROM = ("the released SMIRK_em1.pt comes from the SMIRK authors (github.com/georgeretsi/smirk, "
              "`retarget weights download`); `retarget weights tiny` writes a random one for tests")


class ExpressionEncoder(nn.Module):
    """SMIRK's expression encoder. ``forward(images)`` takes (B, 3, 224, 224) float RGB in
    [0, 1] and returns a dict: ``expression_params`` (B, 50), ``eyelid_params`` (B, 2) clamped
    to [0, 1], ``jaw_params`` (B, 3) = [relu(opening), clamp(2 others, -0.2, 0.2)]."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        # pretrained=False: timm would otherwise try to download ImageNet weights.
        self.encoder = timm.create_model(BACKBONE, pretrained=False, features_only=True)
        self.expression_layers = nn.Sequential(nn.Linear(FEATURE_DIM, N_PARAMS))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(images)[-1]
        features = F.adaptive_avg_pool2d(features, 1).flatten(1)
        out = self.expression_layers(features)
        return {
            "expression_params": out[:, :N_EXPRESSION],
            "eyelid_params": out[:, N_EXPRESSION:N_EXPRESSION + 2].clamp(0.0, 1.0),
            "jaw_params": torch.cat([F.relu(out[:, N_EXPRESSION + 2:N_EXPRESSION + 3]),
                                     out[:, N_EXPRESSION + 3:N_PARAMS].clamp(-0.2, 0.2)], dim=1),
        }

    @staticmethod
    def to_adapter_vector(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 55) = expression (50) ++ eyelids (2) ++ jaw (3): the Expression Adapter's input."""
        return torch.cat([outputs["expression_params"], outputs["eyelid_params"], outputs["jaw_params"]], dim=1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.inference_mode()
    def encode(self, crops: np.ndarray | torch.Tensor) -> np.ndarray:
        """Crops -> (B, 55) float32 numpy adapter vectors.

        crops: (B, 224, 224, 3) RGB, uint8 (0..255) or float in [0, 1]; or a torch tensor
        (B, 3, 224, 224) float in [0, 1]. Runs on the encoder's device and dtype.
        """
        x = prepare_crops(crops, self.device, self.dtype)
        return self.to_adapter_vector(self(x)).float().cpu().numpy()


def prepare_crops(crops: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(B, 224, 224, 3) uint8/float RGB numpy, or an NCHW tensor -> NCHW `dtype` tensor on
    `device` with values in [0, 1] (uint8 divided by 255, as the release demo does)."""
    if isinstance(crops, torch.Tensor):
        x = crops
    else:
        arr = np.asarray(crops)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise RetargetError(f"SMIRK crops must be (B, H, W, 3) RGB, got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        x = x.to(device, non_blocking=True).to(dtype) / 255.0
    else:
        x = x.to(device, dtype)
    if x.shape[1:] != (3, CROP_SIZE, CROP_SIZE):
        raise RetargetError(f"SMIRK crops must be 3x{CROP_SIZE}x{CROP_SIZE}, got {tuple(x.shape[1:])}")
    return x


def _read_state_dict(path: Path) -> dict:
    """The tensors of a .pt/.pth/.bin (torch pickle, weights only) or .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle refusing non-tensor objects, garbage bytes
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RetargetError(f"{path}: not a readable SMIRK checkpoint ({detail}); {WHERE_FROM}") from None
    # Some saves wrap the tensors: {"state_dict": {...}} or {"model": {...}}.
    for key in ("state_dict", "model", "smirk"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and not torch.is_tensor(sd[key]):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise RetargetError(f"{path}: expected a state dict of tensors, found {type(sd).__name__}; {WHERE_FROM}")
    return sd


def expression_state_dict(sd: dict, path: Path) -> dict:
    """The expression encoder's tensors with the release prefix removed. Pose/shape encoder
    and generator tensors are ignored. Raises RetargetError when there are none."""
    out = {k[len(CHECKPOINT_PREFIX):]: v for k, v in sd.items() if k.startswith(CHECKPOINT_PREFIX)}
    if not out:
        # A bare expression-encoder state dict (keys already without the prefix) is accepted too.
        if any(k.startswith("expression_layers.") for k in sd):
            out = {k: v for k, v in sd.items() if k.startswith(("encoder.", "expression_layers."))}
        else:
            raise RetargetError(f"{path}: no tensors under '{CHECKPOINT_PREFIX}' (is this the SMIRK "
                                f"checkpoint?); {WHERE_FROM}")
    return out


def load_smirk_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> ExpressionEncoder:
    """Build the encoder and load the expression-encoder tensors of the SMIRK checkpoint at
    `path` strictly (every tensor present, every shape right). Returns it in eval mode on
    `device` / `dtype`. Any problem raises RetargetError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RetargetError(f"SMIRK checkpoint {path} not found; {WHERE_FROM}")
    sd = expression_state_dict(_read_state_dict(path), path)
    model = ExpressionEncoder()
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise RetargetError(f"{path}: SMIRK expression encoder tensors do not match the architecture: "
                            f"{', '.join(parts)}; {WHERE_FROM}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise RetargetError(f"{path}: tensor {CHECKPOINT_PREFIX}{k} has shape {tuple(v.shape)}, "
                                f"expected {tuple(own[k].shape)}; {WHERE_FROM}")
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def weights_identity(path: str | os.PathLike) -> str:
    """'<file name>:sha256:<first 16 hex digits>' of a weights file, for the track file."""
    path = Path(path)
    return f"{path.name}:sha256:{file_sha256(path)[:16]}"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
