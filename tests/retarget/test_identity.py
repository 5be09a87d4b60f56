"""Identity conditioning: ArcFace preprocessing as insightface does it, and the prompt embedding
computed through public transformers modules equal to the model's own forward pass."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from render.errors import RetargetError
from retarget.identity import ID_PROMPT, ArcFaceEmbedder, causal_mask


def test_arcface_matches_insightface(tiny_layout, face_crop):
    """Our onnxruntime session equals insightface's ArcFaceONNX on the same (BGR for insightface) crop."""
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    crops = np.stack([cv2.resize(face_crop, (112, 112)), cv2.resize(face_crop[::-1], (112, 112))])
    ours = ArcFaceEmbedder(tiny_layout.arcface_onnx, providers=["CPUExecutionProvider"])(crops)
    ref = ArcFaceONNX(model_file=str(tiny_layout.arcface_onnx))
    theirs = np.stack([ref.get_feat(c[:, :, ::-1].copy()).ravel() for c in crops])
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    assert ours.shape == (2, 512) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert abs(float(ours[0] @ ours[1])) < 0.999  # different faces, different vectors


def test_arcface_rejects_bad_input(tiny_layout, tmp_path):
    from retarget.weights import WeightsError

    emb = ArcFaceEmbedder(tiny_layout.arcface_onnx, providers=["CPUExecutionProvider"])
    with pytest.raises(RetargetError, match=r"\(N, 112, 112, 3\)"):
        emb(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(WeightsError, match="missing .*nope.onnx"):
        ArcFaceEmbedder(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="bad.onnx is not usable"):
        ArcFaceEmbedder(bad)


@pytest.mark.parametrize("text", [ID_PROMPT, ""])
def test_transformer_reproduces_clip_forward(pipe, text):
    """With token embeddings left as they are, our public-module path equals CLIPTextModel(input_ids)."""
    ident = pipe.identity
    ids = ident.token_ids(text)
    ours = ident.transformer(ident.text_model.embeddings.token_embedding(ids))
    theirs = pipe.text_encoder(ids).last_hidden_state
    assert ours.shape == (1, 77, 768)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)


def test_encode_injects_arcface_at_id_token(pipe, arcface_vec):
    """encode(v) equals the model's own forward with the `id` row of the embedding table set to v padded
    to 768: the vector sits exactly in the `id` slot and nothing else changes."""
    ident = pipe.identity
    ours = ident.encode(arcface_vec)
    table = ident.text_model.embeddings.token_embedding.weight
    saved = table[ident.id_token].clone()
    try:
        with torch.no_grad():
            table[ident.id_token] = torch.nn.functional.pad(torch.from_numpy(arcface_vec), (0, 256))
        theirs = pipe.text_encoder(ident.token_ids(ID_PROMPT)).last_hidden_state
    finally:
        with torch.no_grad():
            table[ident.id_token] = saved
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)
    # Causal attention: tokens before `id` do not see the identity.
    other = ident.encode(np.roll(arcface_vec, 1))
    p = ident.id_position
    torch.testing.assert_close(ours[:, :p], other[:, :p], atol=0, rtol=0)
    assert (ours[:, p:] - other[:, p:]).abs().amax() > 1e-3


def test_encode_normalises_and_batches(pipe, arcface_vec):
    ident = pipe.identity
    single = ident.encode(arcface_vec)
    batch = ident.encode(np.stack([arcface_vec * 3.0, -arcface_vec]))
    assert batch.shape == (2, 77, 768)
    # Scale does not matter. Batch of 2 vs 1: fp32 GEMMs may sum in another order; 1e-5 of the largest value.
    torch.testing.assert_close(batch[:1], single, atol=1e-5 * float(single.abs().max()), rtol=0)
    with pytest.raises(RetargetError, match=r"\(N, 512\)"):
        ident.encode(np.ones(128, np.float32))
    with pytest.raises(RetargetError, match="zero or not finite"):
        ident.encode(np.zeros(512, np.float32))


def test_encode_empty_is_diffusers_negative_prompt(pipe, make_stock, stock_unet, actor):
    """The unconditional embedding equals what diffusers' encode_prompt computes for negative prompt ""."""
    sd = make_stock(stock_unet)
    _, negative = sd.encode_prompt(prompt=None, device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=True, prompt_embeds=actor.id_embeds)
    torch.testing.assert_close(pipe.identity.encode_empty(), negative, atol=0, rtol=0)


def test_causal_mask():
    m = causal_mask(4, torch.float32, torch.device("cpu"))[0, 0]
    assert m.shape == (4, 4) and (m.diagonal() == 0).all() and m[0, 1] < -1e30 and m[3, 0] == 0
