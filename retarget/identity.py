"""Identity conditioning (SPEC.md §2): a face crop -> ArcFace vector -> Arc2Face prompt embedding.

Two pieces, both computed once per actor:
- `ArcFaceEmbedder` runs `arcface.onnx` with insightface's preprocessing and returns the
  L2-normalised 512-d embedding of a 112x112 aligned crop.
- `IdentityEncoder` puts that vector into the token slot of `id` in `photo of a id person` and runs
  the (fine-tuned) CLIP text transformer through its public sub-modules. The release's own encoder
  wrapper reaches into transformers internals that transformers 5 removed; this does the same
  arithmetic (token embeddings + positions, causal mask, final layer norm) with public calls only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from render.errors import RetargetError

ID_PROMPT = "photo of a id person"
ID_WORD = "id"
ARCFACE_DIM = 512
ARCFACE_SIZE = 112


def _insightface_normalisation(onnx_path: Path) -> tuple[float, float]:
    """(mean, std) that insightface's ArcFaceONNX applies to this graph's input.

    insightface treats a graph whose first nodes subtract and multiply (the converted MXNet models)
    as normalising itself, and feeds raw 0..255 values; every other graph gets (x - 127.5) / 127.5.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = [node.name for node in graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class ArcFaceEmbedder:
    """`arcface.onnx` through onnxruntime, preprocessed exactly as insightface's ArcFaceONNX does.

    providers: onnxruntime execution providers (default: CUDA when onnxruntime has it, else CPU).
    """

    def __init__(self, onnx_path: str | os.PathLike, providers: list[str] | None = None):
        from retarget.weights import WeightsError

        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise WeightsError(f"missing {self.path} (ArcFace recognition network)")
        try:
            self.mean, self.std = _insightface_normalisation(self.path)
            if providers is None:
                available = ort.get_available_providers()
                providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as e:  # onnx/onnxruntime raise their own types for bad files
            raise WeightsError(f"{self.path} is not usable: {e.__class__.__name__}: {str(e)[:160]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        if list(inp.shape[1:]) != [3, ARCFACE_SIZE, ARCFACE_SIZE]:
            raise WeightsError(f"{self.path} takes input {inp.shape}, expected Nx3x{ARCFACE_SIZE}x{ARCFACE_SIZE}")

    def __call__(self, crops_rgb: np.ndarray) -> np.ndarray:
        """Embed aligned face crops.

        crops_rgb: (112, 112, 3) or (N, 112, 112, 3) uint8 RGB, aligned to the ArcFace 5-point template.
        Returns (N, 512) float32, each row L2-normalised.
        """
        crops = np.asarray(crops_rgb)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.ndim != 4 or crops.shape[1:] != (ARCFACE_SIZE, ARCFACE_SIZE, 3):
            raise RetargetError(f"ArcFace input must be (N, 112, 112, 3) RGB crops, got shape {crops.shape}")
        # insightface feeds BGR images and swaps to RGB itself, so the network sees RGB: feed RGB.
        blob = (crops.astype(np.float32) - self.mean) / self.std
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        out = self.session.run(None, {self.input_name: blob})[0].astype(np.float32)
        return normalise(out)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of (N, D) float vectors; raises RetargetError on a zero or non-finite row."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    if not np.all(np.isfinite(v)) or np.any(norms == 0):
        raise RetargetError("the ArcFace embedding is zero or not finite (is the face crop empty?)")
    return v / norms


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (1, 1, L, L) mask: 0 on and below the diagonal, the dtype's minimum above it."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)[None, None]


class IdentityEncoder:
    """Tokenizer + CLIP text encoder that turn an ArcFace vector into the Arc2Face prompt embedding.

    text_encoder: a transformers `CLIPTextModel` (hidden size >= 512), in eval mode on its device/dtype.
    """

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        # transformers 4.x nests the transformer under `.text_model`; 5.x puts it on the model.
        self.text_model = getattr(text_encoder, "text_model", text_encoder)
        self.hidden = text_encoder.config.hidden_size
        if self.hidden < ARCFACE_DIM:
            raise RetargetError(f"text encoder hidden size {self.hidden} < 512: the ArcFace vector does not fit a token")
        word = tokenizer.encode(ID_WORD, add_special_tokens=False)
        if len(word) != 1:
            raise RetargetError(f"the tokenizer splits {ID_WORD!r} into {len(word)} tokens; Arc2Face needs one")
        self.id_token = word[0]
        ids = self.token_ids(ID_PROMPT)
        positions = (ids[0] == self.id_token).nonzero().flatten()
        if len(positions) != 1:
            raise RetargetError(f"{ID_PROMPT!r} must hold the token {ID_WORD!r} exactly once, found {len(positions)}")
        self.id_position = int(positions[0])

    @property
    def device(self) -> torch.device:
        return self.text_model.embeddings.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embeddings.token_embedding.weight.dtype

    def token_ids(self, text: str) -> torch.Tensor:
        """(1, 77) int64 token ids of `text`, padded to the tokenizer's max length as diffusers does."""
        return self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def transformer(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """Run the text transformer on token embeddings (N, L, hidden): positions added, causal mask,
        final layer norm. Returns the last hidden state (N, L, hidden)."""
        tm = self.text_model
        h = tm.embeddings(inputs_embeds=token_embeds)
        mask = causal_mask(h.shape[1], h.dtype, h.device)
        out = tm.encoder(inputs_embeds=h, attention_mask=mask)
        h = out[0] if isinstance(out, tuple) else out.last_hidden_state
        return tm.final_layer_norm(h)

    @torch.no_grad()
    def encode(self, arcface: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Prompt embedding of identities.

        arcface: (N, 512) or (512,) ArcFace vectors (normalised here, so unit vectors pass unchanged).
        Returns (N, 77, hidden) on the encoder's device and dtype.
        """
        v = arcface if torch.is_tensor(arcface) else torch.from_numpy(np.asarray(arcface, dtype=np.float32))
        v = v.detach().float().cpu()
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[1] != ARCFACE_DIM:
            raise RetargetError(f"ArcFace embedding must have shape (N, 512), got {tuple(v.shape)}")
        v = torch.from_numpy(normalise(v.numpy())).to(self.device)
        ids = self.token_ids(ID_PROMPT).expand(v.shape[0], -1)
        tokens = self.text_model.embeddings.token_embedding(ids).clone()
        tokens[:, self.id_position] = F.pad(v, (0, self.hidden - ARCFACE_DIM)).to(tokens.dtype)
        return self.transformer(tokens)

    @torch.no_grad()
    def encode_empty(self) -> torch.Tensor:
        """Unconditional embedding (1, 77, hidden): the empty prompt through the model's own forward,
        exactly what diffusers' `encode_prompt` computes for the negative prompt ""."""
        out = self.text_encoder(self.token_ids(""))
        return out[0] if isinstance(out, tuple) else out.last_hidden_state
