"""Expression Adapter: stock diffusers IP-Adapter numerics, projection types, input checks, no leaks
between the unconditional and conditional halves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from render.errors import RetargetError
from retarget.adapters.expression import check_expressions, expression_embeds

from .conftest import STEPS

ATOL = 1e-5  # fp32 CPU, pixels in [0, 1]


def test_equals_stock_ip_adapter(pipe, actor, expressions, make_stock, tiny_layout):
    """(2) Adapter on, reference off == StableDiffusionPipeline + load_ip_adapter + ip_adapter_image_embeds."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_layout.arc2face_unet).eval()
    sd = make_stock(unet)
    sd.load_ip_adapter(str(tiny_layout.root), subfolder="exp_adapter", weight_name="exp_adapter.bin",
                       image_encoder_folder=None)
    sd.set_ip_adapter_scale(0.7)
    # Stock diffusers repeats precomputed embeds over its prompt batch, so it renders one frame per call;
    # ours renders the frames in one batch (shared noise: every frame starts from the seed's draw).
    theirs = []
    for e in expressions[:2]:
        exp = torch.from_numpy(e)[None, None, :]
        theirs.append(sd(prompt_embeds=actor.id_embeds, negative_prompt_embeds=actor.uncond_embeds,
                         ip_adapter_image_embeds=[torch.cat([torch.zeros_like(exp), exp])], num_inference_steps=STEPS,
                         guidance_scale=3.0, generator=torch.Generator().manual_seed(3), output_type="np").images[0])
    theirs = np.stack(theirs)
    ours = pipe(actor, expressions[:2], generator=torch.Generator().manual_seed(3), steps=STEPS, guidance=3.0,
                exp_scale=0.7, ref_strength=0, output_type="float")
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("projection, cls", [("linear", "ImageProjection"), ("faceid", "IPAdapterFaceIDImageProjection"),
                                             ("full", "IPAdapterFullImageProjection")])
def test_projection_types_load_and_run(pipe, actor, expressions, tiny_layout, tmp_path, projection, cls):
    """(6) Adapter files with different image_proj key sets load through diffusers and change the output."""
    from diffusers import UNet2DConditionModel

    from retarget.components import load_exp_adapter_state
    from retarget.pipeline import RetargetPipeline
    from retarget.tiny import exp_adapter_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_layout.arc2face_unet).eval()
    path = tmp_path / "exp_adapter.bin"
    torch.save(exp_adapter_state_dict(unet, projection, seed=11), path)
    other = RetargetPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                             scheduler=pipe.scheduler)
    other.setup_adapters(load_exp_adapter_state(path), None, exp_path=path)
    assert other.exp_projection == cls
    kw = dict(seed=1, steps=2, ref_strength=0, output_type="float")
    a = other(actor, expressions[:2], exp_scale=1.0, **kw)
    off = other(actor, expressions[:2], exp_scale=0.0, **kw)
    assert a.shape == (2, 64, 64, 3) and np.isfinite(a).all()
    assert np.abs(a - off).max() > 1e-3


def test_expression_changes_output(pipe, actor, expressions):
    """(7a) Different 55-d vectors, different frames; the same vector, the same frame (shared noise)."""
    out = pipe(actor, np.stack([expressions[0], expressions[1], expressions[0]]), seed=2, steps=STEPS,
               ref_strength=0, output_type="float")
    assert np.abs(out[0] - out[1]).max() > 1e-3
    # Same vector in batch rows 0 and 2: equal up to the fp32 summation order of the row
    # (seen: 2e-6 on pixels in [0, 1] on AMD EPYC); two orders of magnitude under the 1e-3 above.
    np.testing.assert_allclose(out[0], out[2], atol=1e-5, rtol=0)


def test_unconditional_half_does_not_leak(pipe, actor, expressions):
    """(7b) With CFG, the UNet's conditional rows do not depend on the unconditional expression rows
    (all adapters on, reference bank read by the conditional half only)."""
    from retarget.adapters.reference import reading

    b = 2
    expr = check_expressions(expressions[:b])
    pipe._set_loras({"reference": 0.8})
    pipe.set_ip_adapter_scale(1.0)
    x = torch.randn(2 * b, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = torch.cat([actor.uncond_embeds.expand(b, -1, -1), actor.id_embeds.expand(b, -1, -1)])

    def eps(uncond):
        embeds = expression_embeds(expr, cfg=True, device="cpu", dtype=torch.float32, uncond=uncond)
        with reading(pipe.reference_state, actor.bank, read_from=b), torch.no_grad():
            return pipe.unet(x, 500, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": embeds})[0]

    zeros, other = eps(None), eps(torch.from_numpy(expressions[1:1 + b]) * 3)
    torch.testing.assert_close(zeros[b:], other[b:], atol=1e-6, rtol=0)
    assert (zeros[:b] - other[:b]).abs().amax() > 1e-3  # the unconditional rows did see their input
    # The pipeline's default unconditional half is zeros (the release's), and the override is wired.
    kw = dict(seed=4, steps=2, ref_strength=0.8, output_type="float")
    base = pipe(actor, expressions[:b], **kw)
    np.testing.assert_array_equal(base, pipe(actor, expressions[:b], uncond_expressions=np.zeros((b, 55)), **kw))
    assert np.abs(base - pipe(actor, expressions[:b], uncond_expressions=expressions[1:1 + b], **kw)).max() > 1e-4


def test_embeds_layout():
    expr = check_expressions(np.arange(110, dtype=np.float32).reshape(2, 55))
    (cfg,) = expression_embeds(expr, cfg=True, device="cpu", dtype=torch.float16)
    assert cfg.shape == (4, 1, 55) and cfg.dtype == torch.float16
    assert (cfg[:2] == 0).all() and torch.equal(cfg[2:, 0].float(), expr.half().float())
    (plain,) = expression_embeds(expr, cfg=False, device="cpu", dtype=torch.float32)
    assert plain.shape == (2, 1, 55)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 54)), r"\(B, 55\).*got \(2, 54\)"),
    (np.zeros(55), r"got \(55,\)"),
    (np.zeros((0, 55)), r"got \(0, 55\)"),
    (np.array([[0.0] * 54 + [np.nan]] * 2), r"NaN or infinite values in frame\(s\) \[0, 1\]"),
])
def test_bad_expressions_are_rejected(pipe, actor, bad, match):
    with pytest.raises(RetargetError, match=match):
        pipe(actor, bad, steps=1)


def test_adapter_file_errors(tmp_path):
    from retarget.components import load_exp_adapter_state
    from retarget.weights import WeightsError

    with pytest.raises(WeightsError, match="missing .*exp_adapter.bin"):
        load_exp_adapter_state(tmp_path / "exp_adapter.bin")
    truncated = tmp_path / "trunc.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(8, 55)}, "ip_adapter": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(WeightsError, match="trunc.bin is not usable"):
        load_exp_adapter_state(truncated)
    wrong = tmp_path / "wrong.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(8, 54)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2, 2)}},
               wrong)
    with pytest.raises(WeightsError, match="takes 54-d inputs"):
        load_exp_adapter_state(wrong)
    flat = tmp_path / "flat.bin"
    torch.save({"proj.weight": torch.zeros(8, 55)}, flat)
    with pytest.raises(WeightsError, match="not an IP-Adapter file"):
        load_exp_adapter_state(flat)


def test_adapter_not_fitting_the_unet(pipe, tiny_layout):
    """An adapter for another UNet (layer sizes differ) is named, not a traceback from diffusers."""
    from diffusers import UNet2DConditionModel

    from retarget.adapters.expression import load_expression_adapter
    from retarget.pipeline import RetargetPipeline
    from retarget.weights import WeightsError

    unet = UNet2DConditionModel.from_pretrained(tiny_layout.arc2face_unet).eval()
    other = RetargetPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                             scheduler=pipe.scheduler)
    state = {"image_proj": {"proj.weight": torch.zeros(4 * 768, 55), "proj.bias": torch.zeros(4 * 768),
                            "norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)},
             "ip_adapter": {"1.to_k_ip.weight": torch.zeros(320, 768), "1.to_v_ip.weight": torch.zeros(320, 768)}}
    with pytest.raises(WeightsError, match="some.bin does not fit the Arc2Face UNet"):
        load_expression_adapter(other, state, "some.bin")
