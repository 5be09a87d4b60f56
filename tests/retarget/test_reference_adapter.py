"""Reference Adapter: the writer, the bank, the reader processors, the reference LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from retarget.adapters.reference import (
    OFF, ReferenceAttnProcessor, install_reference_processors, reading, write_bank,
)

from .conftest import STEPS

ATOL = 1e-5  # fp32 CPU, pixels in [0, 1]


def test_read_equals_release_formulation(pipe, actor):
    """The reader equals attn1 called with encoder_hidden_states = cat([h, bank]) (the release's way),
    with the reference LoRA active on to_q/to_k/to_v/to_out."""
    pipe._set_loras({"reference": 0.8})
    name = actor.bank.names[0]
    attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
    ref = actor.bank.states[name]
    h = torch.randn(3, ref.shape[1], ref.shape[2], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ReferenceAttnProcessor.read(attn, h, ref)
        theirs = AttnProcessor2_0()(attn, h, encoder_hidden_states=torch.cat([h, ref.expand(3, -1, -1)], dim=1))
        plain = AttnProcessor2_0()(attn, h)
    # Keys/values of h and of the bank projected apart vs of their concatenation: other GEMM shapes,
    # so fp32 sums in another order (CPU- and shape-dependent); 1e-5 of the largest value.
    torch.testing.assert_close(ours, theirs, atol=1e-5 * float(theirs.abs().max()), rtol=0)
    assert (ours - plain).abs().amax() > 1e-3


def test_bank_layout(pipe, actor):
    """One (1, tokens, channels) tensor per transformer block, in execution order down, mid, up."""
    names = actor.bank.names
    assert len(names) == sum(n.endswith("attn1.processor") for n in pipe.unet.attn_processors)
    kinds = [n.split(".")[0] for n in names]
    assert kinds == sorted(kinds, key=["down_blocks", "mid_block", "up_blocks"].index)
    for name, v in actor.bank.states.items():
        attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
        assert v.shape[0] == 1 and v.shape[2] == attn.to_q.in_features


def test_shared_writer_equals_separate_frozen_copy(pipe, actor, tiny_layout):
    """The writer pass on the adapted UNet (LoRA, IP-Adapter, reader processors present but switched
    off for the pass) equals a separate plain copy of the Arc2Face UNet, as the release uses."""
    from diffusers import UNet2DConditionModel

    frozen = UNet2DConditionModel.from_pretrained(tiny_layout.arc2face_unet).eval()
    state = install_reference_processors(frozen)
    theirs = write_bank(frozen, state, actor.ref_latent, actor.id_embeds)
    pipe._set_loras({"reference": 1.0})
    before = dict(pipe.unet.attn_processors)
    ours = pipe.write_bank(actor.ref_latent, actor.id_embeds)
    assert ours.names == theirs.names
    for name in ours.names:
        torch.testing.assert_close(ours.states[name], theirs.states[name], atol=1e-6, rtol=0)
    # and everything is put back: processors, IP projection, LoRA on, mode off
    assert dict(pipe.unet.attn_processors) == before
    assert pipe.unet.encoder_hid_proj is not None and pipe.reference_state.mode == OFF
    from retarget.adapters.reference import _lora_enabled

    assert _lora_enabled(pipe.unet) is True


def test_cached_bank_equals_writer_per_frame(pipe, actor, expressions):
    """(4) One writer pass for the batch == re-running the writer before every single frame."""
    from dataclasses import replace

    kw = dict(seed=5, steps=STEPS, ref_strength=0.8, output_type="float")
    batch = pipe(actor, expressions, **kw)
    for i, e in enumerate(expressions):
        fresh = replace(actor, bank=pipe.write_bank(actor.ref_latent, actor.id_embeds))
        np.testing.assert_allclose(pipe(fresh, e[None], **kw)[0], batch[i], atol=ATOL, rtol=0)


def test_strength_zero_is_reference_off(pipe, actor, expressions):
    """(5) ref_strength 0 with the bank present == an actor without reference; > 0 changes the frames."""
    from dataclasses import replace

    kw = dict(seed=6, steps=STEPS, output_type="float")
    with_bank = pipe(actor, expressions[:2], ref_strength=0.0, **kw)
    no_ref = pipe(replace(actor, bank=None, ref_latent=None), expressions[:2], ref_strength=0.0, **kw)
    np.testing.assert_array_equal(with_bank, no_ref)
    on = pipe(actor, expressions[:2], ref_strength=0.8, **kw)
    weaker = pipe(actor, expressions[:2], ref_strength=0.4, **kw)
    assert np.abs(on - no_ref).max() > 1e-3 and np.abs(on - weaker).max() > 1e-4


def test_unconditional_half_reads_no_bank(pipe, actor):
    """With CFG only rows >= B read the bank: the unconditional rows equal a plain UNet call."""
    b = 2
    pipe._set_loras({"reference": 0.8})
    x = torch.randn(2 * b, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompt = torch.cat([actor.uncond_embeds.expand(b, -1, -1), actor.id_embeds.expand(b, -1, -1)])
    embeds = [torch.zeros(2 * b, 1, 55)]
    with torch.no_grad():
        with reading(pipe.reference_state, actor.bank, read_from=b):
            read = pipe.unet(x, 300, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": embeds})[0]
        plain = pipe.unet(x, 300, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": embeds})[0]
    # The reader runs the unconditional rows as a sub-batch of b (the plain call: one batch of 2b):
    # other GEMM shapes, fp32 sums in another order; 1e-5 of the largest value, far under the 1e-3 below.
    torch.testing.assert_close(read[:b], plain[:b], atol=1e-5 * float(plain[:b].abs().max()), rtol=0)
    assert (read[b:] - plain[b:]).abs().amax() > 1e-3


def test_reference_latent_sample_and_mode(pipe, face_crop):
    a = pipe.encode_reference(face_crop, generator=torch.Generator().manual_seed(1))
    b = pipe.encode_reference(face_crop, generator=torch.Generator().manual_seed(1))
    c = pipe.encode_reference(face_crop, generator=torch.Generator().manual_seed(2))
    m = pipe.encode_reference(face_crop, mode="mode")
    assert a.shape == (1, 4, 8, 8)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # seeded: runs reproduce
    assert (a - c).abs().amax() > 1e-4 and (a - m).abs().amax() > 1e-4
    torch.testing.assert_close(m, pipe.encode_reference(face_crop, mode="mode"), atol=0, rtol=0)
    from render.errors import RetargetError

    with pytest.raises(RetargetError, match="ref_latent must be one of"):
        pipe.encode_reference(face_crop, mode="mean")
