"""RetargetPipeline end to end on the tiny weights: stock-diffusers equality, batching, noise modes,
LCM mode, actor preparation from a real photo, and the errors users see."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from render.errors import RetargetError

from .conftest import STEPS

ATOL = 1e-5  # fp32 CPU, pixels in [0, 1]
BATCH_ATOL = 1e-4  # batched vs single: different GEMM shapes may round differently


def test_equals_stock_stable_diffusion(pipe, actor, expressions, make_stock, stock_unet):
    """(1) Expression scale 0, reference off == StableDiffusionPipeline with the same components,
    prompt embeddings, scheduler and seed (frames in one batch, per-frame noise from one generator)."""
    sd = make_stock(stock_unet)
    b = 2
    theirs = sd(prompt_embeds=actor.id_embeds.expand(b, -1, -1), negative_prompt_embeds=actor.uncond_embeds.expand(b, -1, -1),
                num_inference_steps=STEPS, guidance_scale=3.0, generator=torch.Generator().manual_seed(9),
                output_type="np").images
    ours = pipe(actor, expressions[:b], generator=torch.Generator().manual_seed(9), steps=STEPS, guidance=3.0,
                exp_scale=0.0, ref_strength=0.0, per_frame_noise=True, output_type="float")
    assert ours.shape == theirs.shape == (b, 64, 64, 3)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    # uint8 output is the same pictures, rounded as diffusers' numpy_to_pil does
    u8 = pipe(actor, expressions[:b], generator=torch.Generator().manual_seed(9), steps=STEPS, exp_scale=0.0,
              ref_strength=0.0, per_frame_noise=True)
    assert u8.dtype == np.uint8 and np.abs(u8.astype(int) - (theirs * 255).round().astype(int)).max() <= 1


@pytest.mark.parametrize("scheduler", ["dpm++", "lcm"])
def test_batch_equals_single_frames(pipe, actor, expressions, scheduler):
    """(3) A batch of B frames == B single-frame calls (all adapters on; LCM injects noise every step)."""
    kw = dict(seed=11, scheduler=scheduler, ref_strength=0.8, exp_scale=1.0, output_type="float",
              steps=STEPS if scheduler == "dpm++" else 4)
    batch = pipe(actor, expressions, **kw)
    for i in range(len(expressions)):
        np.testing.assert_allclose(pipe(actor, expressions[i:i + 1], **kw)[0], batch[i], atol=BATCH_ATOL, rtol=0)


def test_per_frame_noise_depends_on_frame_index_only(pipe, actor, expressions):
    """Per-frame noise: frame i's noise comes from (seed, frame index), so any batching gives the same frames;
    frames with the same expression differ (different noise), unlike shared noise."""
    same = np.repeat(expressions[:1], 3, axis=0)
    kw = dict(seed=3, steps=STEPS, per_frame_noise=True, output_type="float")
    batch = pipe(actor, same, frame_indices=[10, 11, 12], **kw)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3
    np.testing.assert_allclose(pipe(actor, same[:1], frame_indices=[11], **kw)[0], batch[1], atol=BATCH_ATOL, rtol=0)
    shared = pipe(actor, same, seed=3, steps=STEPS, output_type="float")
    # Rows 0 and 2 of one batch are equal by design, but fp32 GEMMs may sum each row in another
    # order (seen: 2e-6 on pixels in [0, 1] on AMD EPYC); 1e-5 is well under the 1e-3 that
    # separates frames with different noise above.
    np.testing.assert_allclose(shared[0], shared[2], atol=1e-5, rtol=0)


def test_lcm_mode(pipe, actor, expressions):
    """LCM-LoRA + LCMScheduler: 4 steps, guidance 1 (no CFG rows); a different sampler gives other frames."""
    lcm = pipe(actor, expressions[:2], seed=1, scheduler="lcm", output_type="float")
    dpm = pipe(actor, expressions[:2], seed=1, steps=4, guidance=1.0, output_type="float")
    assert lcm.shape == (2, 64, 64, 3) and np.isfinite(lcm).all()
    assert np.abs(lcm - dpm).max() > 1e-3
    assert "lcm" in pipe.unet.peft_config and "reference" in pipe.unet.peft_config


def test_latent_output_and_guidance(pipe, actor, expressions):
    lat = pipe(actor, expressions[:2], seed=2, steps=2, output_type="latent")
    assert lat.shape == (2, 4, 8, 8)
    g1 = pipe(actor, expressions[:1], seed=2, steps=2, guidance=1.0, output_type="latent")
    assert (g1 - lat[:1]).abs().amax() > 1e-3  # guidance 3 vs no CFG


def test_uint8_images_are_the_rounded_floats(pipe, actor, expressions):
    """uint8 output is made on the device now (no host pass over the pixels): the same fp32
    multiply and round-half-to-even as numpy's, so exactly the bits of round(255 x) of the floats."""
    f = pipe(actor, expressions[:3], seed=5, steps=2, output_type="float")
    u = pipe(actor, expressions[:3], seed=5, steps=2)
    assert u.dtype == np.uint8 and u.shape == f.shape
    np.testing.assert_array_equal(u, (f * 255).round().astype(np.uint8))
    assert len(np.unique(u)) > 50  # real images, not a constant


@pytest.mark.parametrize("kw, match", [
    (dict(scheduler="ddim"), "scheduler must be one of"),
    (dict(exp_scale=-1.0), "exp_scale must be a finite number >= 0"),
    (dict(ref_strength=float("nan")), "ref_strength must be a finite number"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(output_type="pil"), "output_type must be"),
    (dict(generator=[torch.Generator()]), "1 generators for 2 frames"),
])
def test_bad_call_arguments(pipe, actor, expressions, kw, match):
    with pytest.raises(RetargetError, match=match):
        pipe(actor, expressions[:2], **kw)


def test_reference_needs_a_bank(pipe, actor, expressions):
    with pytest.raises(RetargetError, match="ref_strength > 0 needs an actor prepared with its reference"):
        pipe(replace(actor, bank=None), expressions[:1], steps=1)


# ---------------------------------------------------------------------- actor from a photo

def test_prepare_actor_from_photo(pipe, astronaut_rgb):
    actor = pipe.prepare_actor(astronaut_rgb, seed=1)
    assert actor.face_report.startswith("1 face found")
    assert actor.crop.shape == (512, 512, 3) and actor.M.shape == (2, 3)
    assert actor.id_embeds.shape == actor.uncond_embeds.shape == (1, 77, 768)
    assert actor.ref_latent.shape == (1, 4, 8, 8) and actor.bank is not None
    assert abs(float(np.linalg.norm(actor.arcface)) - 1) < 1e-5
    again = pipe.prepare_actor(astronaut_rgb, seed=1)
    torch.testing.assert_close(again.ref_latent, actor.ref_latent, atol=0, rtol=0)  # seeded
    plain = pipe.prepare_actor(astronaut_rgb, reference=False)
    assert plain.bank is None and float(plain.arcface @ actor.arcface) > 0.9  # same face, other crop


def test_prepare_actor_several_faces_largest_wins(pipe, astronaut_rgb):
    import cv2

    canvas = np.zeros((512, 900, 3), np.uint8)
    canvas[:, :512] = astronaut_rgb
    canvas[100:356, 600:856] = cv2.resize(astronaut_rgb, (256, 256), interpolation=cv2.INTER_AREA)
    actor = pipe.prepare_actor(canvas, seed=1)
    assert actor.face_report.startswith("2 faces found; using the largest (bbox")
    x0 = float(actor.face_report.split("bbox ")[1].split(",")[0])
    assert x0 < 512  # the big face on the left


def test_prepare_actor_without_face(pipe):
    with pytest.raises(RetargetError, match="no face found in the actor image"):
        pipe.prepare_actor(np.full((256, 256, 3), 127, np.uint8))
    with pytest.raises(RetargetError, match=r"\(H, W, 3\) uint8"):
        pipe.prepare_actor(np.zeros((256, 256), np.uint8))


# ---------------------------------------------------------------------- loading

def _layout_without(tiny_weights, tmp_path, missing: str, replace_with: bytes | None = None):
    """A weights folder of symlinks to the tiny set, with one release path absent or replaced."""
    from retarget.weights import BY_NAME, WeightsLayout

    rel = BY_NAME[missing].path
    for item in tiny_weights.iterdir():
        if item.name != rel.split("/")[0]:
            os.symlink(item, tmp_path / item.name)
    if "/" in rel:
        (tmp_path / rel).parent.mkdir(parents=True)
        for sib in (tiny_weights / rel).parent.iterdir():
            if sib.name != rel.split("/")[-1]:
                os.symlink(sib, tmp_path / rel.rsplit("/", 1)[0] / sib.name)
    if replace_with is not None:
        (tmp_path / rel).write_bytes(replace_with)
    return WeightsLayout(tmp_path)


@pytest.mark.parametrize("missing", ["exp_adapter", "ref_adapter_lora", "arc2face_unet"])
def test_missing_weight_file_is_named(tiny_weights, tmp_path, missing):
    from retarget.pipeline import RetargetPipeline
    from retarget.weights import BY_NAME, WeightsError

    layout = _layout_without(tiny_weights, tmp_path, missing)
    with pytest.raises(WeightsError, match=f"missing .*{BY_NAME[missing].path.split('/')[0]}"):
        RetargetPipeline.from_weights(layout)


@pytest.mark.parametrize("broken", ["exp_adapter", "ref_adapter_lora"])
def test_corrupt_weight_file_is_named(tiny_weights, tmp_path, broken):
    from retarget.pipeline import RetargetPipeline
    from retarget.weights import BY_NAME, WeightsError

    data = (tiny_weights / BY_NAME[broken].path).read_bytes()
    layout = _layout_without(tiny_weights, tmp_path, broken, replace_with=data[: len(data) // 2])
    with pytest.raises(WeightsError, match=BY_NAME[broken].path.split("/")[-1] + " is not usable"):
        RetargetPipeline.from_weights(layout)


def test_lcm_lora_missing_is_named(tiny_weights, tmp_path, actor, expressions):
    from retarget.pipeline import RetargetPipeline
    from retarget.weights import WeightsError

    layout = _layout_without(tiny_weights, tmp_path, "lcm_lora")
    other = RetargetPipeline.from_weights(layout)
    with pytest.raises(WeightsError, match="missing .*lcm_lora"):
        other(actor, expressions[:1], scheduler="lcm")
    with pytest.raises(WeightsError, match="missing .*lcm_lora"):
        RetargetPipeline.from_weights(layout, lcm=True)


def test_cpu_half_precision_is_refused(tiny_layout):
    from retarget.pipeline import RetargetPipeline

    with pytest.raises(RetargetError, match="float32"):
        RetargetPipeline.from_weights(tiny_layout, device="cpu", dtype=torch.float16)
