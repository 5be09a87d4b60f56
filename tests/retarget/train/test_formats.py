"""Saving in the release formats is the exact inverse of loading: for every projection type diffusers
infers, and for LoRA files whose peft scaling is not 1."""

from __future__ import annotations

import pytest
import torch

from retarget.train import formats


def _pipe(tiny_layout):
    from retarget import components
    from retarget.pipeline import RetargetPipeline

    return RetargetPipeline(vae=components.load_vae(tiny_layout), text_encoder=components.load_text_encoder(tiny_layout),
                            tokenizer=components.load_tokenizer(tiny_layout), unet=components.load_unet(tiny_layout),
                            scheduler=components.make_scheduler(components.load_scheduler_config(tiny_layout)))


@pytest.fixture(scope="module")
def tiny_layout(tiny_weights):
    from retarget.weights import WeightsLayout

    return WeightsLayout(tiny_weights)


@pytest.mark.parametrize("projection", ["linear", "faceid", "full"])
def test_expression_adapter_round_trip(tiny_layout, projection, tmp_path):
    from retarget import components
    from retarget.tiny import exp_adapter_state_dict

    pipe = _pipe(tiny_layout)
    state = exp_adapter_state_dict(pipe.unet, projection, seed=11)
    pipe.setup_adapters({part: dict(d) for part, d in state.items()}, None)
    state = {part: {k: v.clone() for k, v in d.items()} for part, d in state.items()}  # the UNet may share storage
    key_map = formats.image_proj_key_map(pipe.unet, state["image_proj"])
    shapes = {k: tuple(v.shape) for k, v in state["image_proj"].items()}
    saved = formats.exp_adapter_state(pipe.unet, key_map, shapes)
    path = formats.save_exp_adapter(saved, tmp_path / "exp_adapter" / "exp_adapter.bin")
    back = components.load_exp_adapter_state(path)  # the loader `retarget run` uses
    for part in ("image_proj", "ip_adapter"):
        assert set(back[part]) == set(state[part])
        for k, v in state[part].items():
            assert torch.equal(back[part][k], v), (part, k)
    # Trained tensors are what gets saved: a change to a parameter shows in the file under its file key.
    params = formats.exp_adapter_params(pipe.unet)
    name = next(n for n in params if "encoder_hid_proj" in n and n.endswith("weight"))
    with torch.no_grad():
        params[name].add_(1.0)
    changed = formats.exp_adapter_state(pipe.unet, key_map, shapes)["image_proj"]
    assert sum(not torch.equal(changed[k], state["image_proj"][k]) for k in changed) == 1


def test_lora_round_trip_folds_peft_scaling(tiny_layout, tmp_path):
    from retarget import components
    from retarget.pipeline import REF_ADAPTER
    from retarget.tiny import lcm_lora_state_dict

    pipe = _pipe(tiny_layout)
    # A kohya-format LoRA with alpha 2 at rank 4: peft scales it by 0.5; the saved diffusers-format file
    # (no alphas, so alpha = rank on loading) must fold that in.
    state = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v)
             for k, v in lcm_lora_state_dict(pipe.unet, rank=4, seed=5).items()}
    pipe.setup_adapters(components.load_exp_adapter_state(tiny_layout.exp_adapter), state)
    assert {layer.lora_alpha[REF_ADAPTER] / layer.r[REF_ADAPTER] for _, layer in formats.lora_layers(pipe.unet)} == {0.5}
    saved = formats.lora_state(pipe.unet, REF_ADAPTER)
    assert len(saved) == 2 * sum(k.endswith(".alpha") for k in state)
    assert all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in saved)
    path = formats.save_lora(saved, tmp_path / "pytorch_lora_weights.safetensors")
    other = _pipe(tiny_layout)
    other.setup_adapters(components.load_exp_adapter_state(tiny_layout.exp_adapter), components.load_lora_state(path, "x"))
    from retarget.adapters.fusion import delta_weight

    a = dict(formats.lora_layers(pipe.unet))
    b = dict(formats.lora_layers(other.unet))
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(delta_weight(b[name], REF_ADAPTER), delta_weight(a[name], REF_ADAPTER),
                                   rtol=1e-6, atol=1e-7)  # one fp32 rounding of the folded scale
