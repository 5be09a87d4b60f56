"""The pipeline's speed-ups compute what the plain path computes (fp32 CPU, tiny weights).

- LoRA fusion (retarget/adapters/fusion.py): reference LoRA and LCM-LoRA folded into the weights for the
  loop == peft's unfused LoRA layers, within FUSE_ATOL on float pixels in [0, 1]; switching strengths
  between calls re-folds, and unfusing gives back the loaded weights bit for bit.
- Fast reference reading (bank keys/values projected once per loop, one projection for both CFG halves)
  == the step-by-step reader, within ATOL.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from retarget.adapters import fusion
from retarget.adapters.reference import ReferenceAttnProcessor, reading

from .conftest import STEPS

ATOL = 1e-5  # same arithmetic in another order: fp32 rounding only (pixels in [0, 1])
FUSE_ATOL = 1e-5  # W x + B(A x) s  vs  (W + s B A) x in fp32


@contextlib.contextmanager
def switches(pipe, *, fuse: bool, fast: bool):
    """Set the pipeline's speed switches for the block and put the session pipe back as it was."""
    saved = pipe.fuse_loras, pipe.reference_state.fast
    pipe.fuse_loras, pipe.reference_state.fast = fuse, fast
    try:
        yield pipe
    finally:
        pipe.unfuse_loras()
        pipe.fuse_loras, pipe.reference_state.fast = saved


def _weights(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _peft_layers(unet) -> int:
    from peft.tuners.lora.layer import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in unet.modules())


def _render(pipe, actor, expressions, *, fuse, fast=True, **kw):
    with switches(pipe, fuse=fuse, fast=fast):
        return pipe(actor, expressions, **kw)


@pytest.mark.parametrize("scheduler", ["dpm++", "lcm"])
def test_fused_lora_equals_unfused(pipe, actor, expressions, scheduler):
    """Reference LoRA (and LCM-LoRA) folded into the weights == peft's LoRA layers; while fused the UNet
    holds no peft layers, and the fused set is the call's adapters and scales."""
    kw = dict(seed=4, scheduler=scheduler, ref_strength=0.8, output_type="float",
              steps=STEPS if scheduler == "dpm++" else 4)
    plain = _render(pipe, actor, expressions[:2], fuse=False, **kw)
    with switches(pipe, fuse=True, fast=True):
        fused = pipe(actor, expressions[:2], **kw)
        expected = (("lcm", 1.0), ("reference", 0.8)) if scheduler == "lcm" else (("reference", 0.8),)
        assert fusion.fused_key(pipe.unet) == expected
        assert _peft_layers(pipe.unet) == 0
    np.testing.assert_allclose(fused, plain, atol=FUSE_ATOL, rtol=0)
    assert _peft_layers(pipe.unet) > 0  # unfused again: wrappers back


def test_strength_switches_refuse_and_restore_exactly(pipe, actor, expressions):
    """0.8 -> 0.4 -> lcm -> 0 -> 0.8 in one fused pipeline: every call equals the unfused path, the
    repeated 0.8 gives the same bits as the first, and unfusing restores the loaded weights exactly."""
    before = _weights(pipe.unet)
    calls = [dict(ref_strength=0.8), dict(ref_strength=0.4), dict(ref_strength=0.8, scheduler="lcm"),
             dict(ref_strength=0.0), dict(ref_strength=0.8)]
    base = dict(seed=8, steps=STEPS, output_type="float")
    plain = [_render(pipe, actor, expressions[:1], fuse=False, **base, **c) for c in calls]
    with switches(pipe, fuse=True, fast=True):
        fused = [pipe(actor, expressions[:1], **base, **c) for c in calls]
        assert fusion.fused_key(pipe.unet) == (("reference", 0.8),)
    for f, p in zip(fused, plain):
        np.testing.assert_allclose(f, p, atol=FUSE_ATOL, rtol=0)
    np.testing.assert_array_equal(fused[0], fused[-1])
    assert np.abs(fused[0] - fused[1]).max() > 1e-4  # the strength did change the frames
    after = _weights(pipe.unet)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


def test_strength_zero_runs_the_base_model(pipe, actor, expressions):
    """ref_strength 0 (no LCM): nothing folded in, the peft layers out of the loop, weights untouched."""
    before = _weights(pipe.unet)
    with switches(pipe, fuse=True, fast=True):
        off = pipe(actor, expressions[:1], seed=2, steps=STEPS, ref_strength=0.0, output_type="float")
        assert fusion.fused_key(pipe.unet) == () and _peft_layers(pipe.unet) == 0
        assert not pipe.unet._retarget_fused.backups
    plain = _render(pipe, actor, expressions[:1], fuse=False, seed=2, steps=STEPS, ref_strength=0.0,
                    output_type="float")
    np.testing.assert_array_equal(off, plain)
    assert all(torch.equal(v, before[k]) for k, v in _weights(pipe.unet).items())


def test_writer_and_peft_calls_after_a_fused_call(pipe, actor, expressions):
    """After a fused call: the writer sees the base weights (same bank as the actor's), and switching
    adapters by hand unfuses first (no LoRA applied twice)."""
    s = pipe.unet.config.sample_size
    x = torch.randn(2, 4, s, s, generator=torch.Generator().manual_seed(3))
    prompt = actor.id_embeds.expand(2, -1, -1)
    embeds = {"image_embeds": [torch.zeros(2, 1, 55)]}
    with switches(pipe, fuse=False, fast=True):
        pipe._set_loras({"reference": 0.5})
        with torch.no_grad():
            want = pipe.unet(x, 200, encoder_hidden_states=prompt, added_cond_kwargs=embeds)[0]
    with switches(pipe, fuse=True, fast=True):
        pipe(actor, expressions[:1], seed=1, steps=1, ref_strength=0.8)
        assert fusion.fused_key(pipe.unet) is not None
        bank = pipe.write_bank(actor.ref_latent, actor.id_embeds)
        assert fusion.fused_key(pipe.unet) is None
        for name in actor.bank.names:
            torch.testing.assert_close(bank.states[name], actor.bank.states[name], atol=1e-6, rtol=0)
        pipe(actor, expressions[:1], seed=1, steps=1, ref_strength=0.8)
        pipe._set_loras({"reference": 0.5})
        with torch.no_grad():
            got = pipe.unet(x, 200, encoder_hidden_states=prompt, added_cond_kwargs=embeds)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_fast_reader_equals_step_by_step_reader(pipe, actor, expressions):
    """Bank keys/values projected once per loop and one projection for both CFG halves == projecting
    the bank every step and each half apart (the original reader), end to end and per layer."""
    kw = dict(seed=5, steps=STEPS, ref_strength=0.8, output_type="float")
    slow = _render(pipe, actor, expressions, fuse=False, fast=False, **kw)
    fast = _render(pipe, actor, expressions, fuse=False, fast=True, **kw)
    np.testing.assert_allclose(fast, slow, atol=ATOL, rtol=0)

    pipe._set_loras({"reference": 0.8})
    name = actor.bank.names[-1]
    attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
    ref = actor.bank.states[name]
    h = torch.randn(4, ref.shape[1], ref.shape[2], generator=torch.Generator().manual_seed(1))
    proc = pipe.unet.attn_processors[name]
    with torch.no_grad(), switches(pipe, fuse=False, fast=False):
        with reading(pipe.reference_state, actor.bank, read_from=2):
            want = proc(attn, h)
    with torch.no_grad(), switches(pipe, fuse=False, fast=True):
        with reading(pipe.reference_state, actor.bank, read_from=2, unet=pipe.unet):
            assert set(pipe.reference_state.kv) == set(actor.bank.names)
            got = proc(attn, h)
        assert pipe.reference_state.kv == {}  # the projections live for one loop only
        got_uncached = ReferenceAttnProcessor.read(attn, h, ref, plain_rows=2)
    # One projection for both CFG halves vs each half apart: other GEMM shapes, so fp32 sums in
    # another order (CPU- and shape-dependent); 1e-5 of the largest value.
    tol = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    torch.testing.assert_close(got_uncached, want, atol=tol, rtol=0)


def test_conv_and_linear_lora_fuse_exactly():
    """Fusion of peft LoRA on a 3x3 conv, a 1x1 conv and a linear layer (the LCM-LoRA also covers the
    UNet's convolutions) == the unfused layers, and unfusing restores every weight bit for bit."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.block = nn.ModuleList([nn.Conv2d(6, 5, 1), nn.Linear(5, 7)])

        def forward(self, x):
            y = self.block[0](self.conv(x))
            return self.block[1](y.permute(0, 2, 3, 1))

    net = Net().eval()
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "block.0", "block.1"], init_lora_weights=False)
    net = inject_adapter_in_model(cfg, net, adapter_name="a")
    net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["conv", "block.1"],
                                             init_lora_weights=False), net, adapter_name="b")
    for m in net.modules():
        if hasattr(m, "set_scale") and hasattr(m, "lora_A"):
            m.set_adapter(["a", "b"])
            m.set_scale("a", 0.7)
            m.set_scale("b", 1.3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = net(x)
        assert fusion.fusable(net, ["a", "b"])
        fusion.fuse(net, ["a", "b"], key=(("a", 0.7), ("b", 1.3)))
        assert _peft_layers(net) == 0 and type(net.block[0]) is nn.Conv2d
        got = net(x)
        assert fusion.unfuse(net) and not fusion.unfuse(net)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
