"""The tiny weight set loads, unchanged, through the stock loaders that read the released files."""

from __future__ import annotations

import numpy as np
import pytest


def test_tokenizer_tokenises_the_prompt_and_empty(tiny_weights):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_weights / "tokenizer")
    ids = tok("photo of a id person").input_ids
    assert len(ids) == 7  # bos, five words, eos: every word is one token
    assert tok.convert_ids_to_tokens(ids[4]) == "id</w>"
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]
    padded = tok("", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77


def test_text_encoder_loads_from_bin(tiny_weights):
    import torch
    from transformers import CLIPTextModel

    assert (tiny_weights / "encoder/pytorch_model.bin").is_file()
    enc = CLIPTextModel.from_pretrained(tiny_weights / "encoder")
    assert enc.config.hidden_size >= 512
    out = enc(torch.tensor([[enc.config.bos_token_id, enc.config.eos_token_id]])).last_hidden_state
    assert out.shape == (1, 2, enc.config.hidden_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("projection", ["linear", "faceid", "full"])
def test_exp_adapter_projection_types_load_in_diffusers(tiny_weights, projection):
    import torch
    from diffusers import UNet2DConditionModel

    from retarget.tiny import exp_adapter_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_weights / "arc2face")
    unet._load_ip_adapter_weights([exp_adapter_state_dict(unet, projection)])
    x = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, 768)
    a = unet(x, 10, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [torch.zeros(2, 1, 55)]}).sample
    b = unet(x, 10, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [torch.ones(2, 1, 55)]}).sample
    assert not torch.allclose(a, b, atol=1e-4)  # the 55-d input reaches the UNet


def test_arcface_onnx_runs(tiny_weights):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tiny_weights / "arcface.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 112, 112)).astype(np.float32)
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
    assert y.shape == (2, 512) and np.isfinite(y).all() and not np.allclose(y[0], y[1])


def test_loras_load_with_diffusers(tiny_weights):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    for sub, name in (("ref_adapter", "reference"), ("lcm_lora", "lcm")):
        sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(
            tiny_weights / sub, weight_name="pytorch_lora_weights.safetensors")
        unet = UNet2DConditionModel.from_pretrained(tiny_weights / "arc2face")
        n_before = sum(p.numel() for p in unet.parameters())
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(sd, network_alphas=alphas, unet=unet, adapter_name=name)
        assert sum(p.numel() for p in unet.parameters()) > n_before, sub  # LoRA layers were attached


def test_writing_is_complete_and_atomic(tmp_path):
    from retarget.tiny import is_tiny, write_tiny_weights
    from retarget.weights import WeightsLayout, check_weights, ready_for_run

    write_tiny_weights(tmp_path / "w", exp_projection="faceid")
    assert is_tiny(tmp_path / "w")
    assert ready_for_run(check_weights(WeightsLayout(tmp_path / "w")))
    assert not any(p.name.startswith(".tiny-") for p in (tmp_path / "w").iterdir())
