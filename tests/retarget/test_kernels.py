"""Kernel switches (retarget/kernels.py, cuda_graph.py, fp8.py) compute what the default path computes
(fp32 CPU, tiny weights).

Tolerances: KERNEL_ATOL = 1e-4 on float pixels in [0, 1] where another kernel sums in another order
(NHWC convolutions, the CPU flash-attention kernel vs math, another decode chunking): fp32 rounding of
~1e-7 relative per op, carried through 3-4 denoising steps and the VAE (measured here: <= 2.3e-6).
What only copies values (static buffers, memory format switched back, module swaps) must be bit-exact.
"""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import torch

from render.errors import RetargetError
from retarget import kernels
from retarget.adapters.reference import reading
from retarget.cuda_graph import GraphedUNet
from retarget.fp8 import Fp8Linears, fp8_targets

from .conftest import STEPS

KERNEL_ATOL = 1e-4


@pytest.fixture
def kpipe(pipe):
    """The session pipeline with its kernel switches put back to the defaults after the test."""
    yield pipe
    pipe.kernels = kernels.KernelOptions()
    pipe._kernel_state.reset()
    kernels.set_memory_format(pipe.unet, False)
    kernels.set_memory_format(pipe.vae, False)
    pipe.unfuse_loras()


def _call(pipe, actor, expressions, **kw):
    kw = dict(dict(seed=3, steps=STEPS, ref_strength=0.8, output_type="float"), **kw)
    return pipe(actor, expressions[:2], **kw)


def _is_nhwc(module) -> bool:
    w = next(p for p in module.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


# ---------------------------------------------------------------- channels_last

def test_channels_last_equals_default(kpipe, actor, expressions):
    """UNet and VAE in NHWC: same frames within fp32 rounding; back to NCHW: the same bits as before."""
    want = _call(kpipe, actor, expressions)
    kpipe.kernels.channels_last = kpipe.kernels.vae_channels_last = True
    got = _call(kpipe, actor, expressions)
    assert _is_nhwc(kpipe.unet) and _is_nhwc(kpipe.vae)
    np.testing.assert_allclose(got, want, atol=KERNEL_ATOL, rtol=0)
    kpipe.kernels.channels_last = kpipe.kernels.vae_channels_last = False
    again = _call(kpipe, actor, expressions)
    assert not _is_nhwc(kpipe.unet) and not _is_nhwc(kpipe.vae)
    np.testing.assert_array_equal(again, want)


# ---------------------------------------------------------------- attention backend

@pytest.mark.parametrize("backend", ["math", "flash"])
def test_attention_backend_on_cpu_equals_auto(kpipe, actor, expressions, backend):
    """The CPU's two SDPA kernels (math; torch's C++ flash, which "auto" picks) give the same frames."""
    want = _call(kpipe, actor, expressions)
    kpipe.kernels.attention_backend = backend
    np.testing.assert_allclose(_call(kpipe, actor, expressions), want, atol=KERNEL_ATOL, rtol=0)


def test_attention_backend_choice_is_applied():
    """Inside the context the dispatcher picks the preferred kernel (math vs the CPU's flash default)."""
    q = torch.randn(1, 2, 16, 8)
    assert kernels.sdpa_choice(q, q, q) == "flash"
    with kernels.attention_backend("math", "cpu"):
        assert kernels.sdpa_choice(q, q, q) == "math"


def test_attention_backend_errors(kpipe, actor, expressions):
    """An unknown name, and a CUDA-only kernel on the CPU, fail the call with a message naming the option."""
    kpipe.kernels.attention_backend = "fastest"
    with pytest.raises(RetargetError, match="attention_backend must be one of auto, cudnn, flash"):
        _call(kpipe, actor, expressions)
    for name in ("cudnn", "efficient"):
        kpipe.kernels.attention_backend = name
        with pytest.raises(RetargetError, match=f"attention_backend '{name}' is a CUDA kernel.*on cpu"):
            _call(kpipe, actor, expressions)


# ---------------------------------------------------------------- CUDA graph runner

def _unet_inputs(pipe, actor, b, t, seed):
    s = pipe.unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, s, s, generator=g)
    embeds = [torch.randn(b, 1, 55, generator=g)]
    return x, torch.tensor(t), actor.id_embeds.expand(b, -1, -1), embeds


def _plain(pipe, x, t, prompt, embeds):
    return pipe.unet(x, t, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": embeds},
                     return_dict=False)[0]


def test_static_step_equals_plain_unet(kpipe, actor):
    """The graph runner's static-buffer path (no capture, as on the CPU) == the plain UNet call, bit for bit,
    across timesteps and batch sizes (one StaticStep per shape), with the bank's K/V swapped into its buffers."""
    kpipe._use_loras({"reference": 0.8, "lcm": 1.0})
    state = kpipe.reference_state
    runner = GraphedUNet(kpipe.unet, state, capture=False)
    with torch.no_grad(), reading(state, actor.bank, read_from=0, unet=kpipe.unet):
        for b, t, seed in [(2, 999, 0), (2, 259, 1), (1, 499, 2), (2, 19, 3)]:
            x, tt, prompt, embeds = _unet_inputs(kpipe, actor, b, t, seed)
            want = _plain(kpipe, x, tt, prompt, embeds)
            got = runner(x, tt, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": embeds})[0]
            assert torch.equal(got, want)
        assert len(runner.steps) == 2  # B=2 and B=1
        step = runner.steps[next(iter(runner.steps))]
        name = next(iter(step.kv))
        assert state.kv[name] is step.kv[name] or any(state.kv[name] is s.kv[name] for s in runner.steps.values())


def test_graph_runner_leaves_unfolded_lora_eager(kpipe, actor):
    """With peft's LoRA layers in the tree (scales are Python numbers a graph would freeze): no static step."""
    kpipe.unfuse_loras()
    kpipe._set_loras({"reference": 0.8})
    runner = GraphedUNet(kpipe.unet, kpipe.reference_state, capture=True)
    x, t, prompt, embeds = _unet_inputs(kpipe, actor, 1, 500, 0)
    with torch.no_grad():
        got = runner(x, t, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": embeds})[0]
        want = _plain(kpipe, x, t, prompt, embeds)
    assert torch.equal(got, want) and not runner.steps and not runner.failed


def test_cuda_graph_on_cpu_warns_once_and_runs_eager(kpipe, actor, expressions):
    want = _call(kpipe, actor, expressions, scheduler="lcm", steps=4)
    kpipe.kernels.cuda_graph = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [_call(kpipe, actor, expressions, scheduler="lcm", steps=4) for _ in range(2)]
    msgs = [str(w.message) for w in caught if "cuda_graph" in str(w.message)]
    assert msgs == ["cuda_graph needs a CUDA device; the pipeline is on cpu: running eager"]
    for g in got:
        np.testing.assert_array_equal(g, want)


def test_capture_failure_falls_back_to_eager(kpipe, actor, expressions, monkeypatch):
    """A capture that fails (here injected) warns once, leaves that shape eager, and the frames are those of
    the default path; the runner set by hand is used on the CPU too."""
    want = _call(kpipe, actor, expressions, scheduler="lcm", steps=4)
    runner = GraphedUNet(kpipe.unet, kpipe.reference_state, capture=True)
    calls = []

    def failing_capture(step):
        calls.append(step)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_capture", failing_capture)
    kpipe.kernels.cuda_graph = True
    kpipe._kernel_state.graphs = runner
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [_call(kpipe, actor, expressions, scheduler="lcm", steps=4) for _ in range(2)]
    msgs = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert len(msgs) == 1 and "operation not permitted" in msgs[0]
    assert len(calls) == 1 and len(runner.failed) == 1 and not runner.steps  # tried once, then eager
    for g in got:
        np.testing.assert_array_equal(g, want)


def test_static_runner_in_the_pipeline_equals_default(kpipe, actor, expressions):
    """The whole fast-mode call through the runner's static buffers == the default call, bit for bit."""
    want = _call(kpipe, actor, expressions, scheduler="lcm", steps=4)
    kpipe.kernels.cuda_graph = True
    kpipe._kernel_state.graphs = runner = GraphedUNet(kpipe.unet, kpipe.reference_state, capture=False)
    got = _call(kpipe, actor, expressions, scheduler="lcm", steps=4)
    np.testing.assert_array_equal(got, want)
    assert len(runner.steps) == 1


# ---------------------------------------------------------------- VAE decode

def test_decode_switches_equal_default(kpipe):
    """NHWC VAE, other chunk sizes and cuDNN autotuning (no-op on the CPU): the same images."""
    s = kpipe.unet.config.sample_size
    lat = torch.randn(3, 4, s, s, generator=torch.Generator().manual_seed(1))
    want = kpipe.decode(lat)
    kpipe.kernels.vae_channels_last = True
    np.testing.assert_allclose(kpipe.decode(lat), want, atol=KERNEL_ATOL, rtol=0)
    kpipe.kernels = kernels.KernelOptions(decode_batch=1, cudnn_benchmark=True)
    np.testing.assert_allclose(kpipe.decode(lat), want, atol=KERNEL_ATOL, rtol=0)
    assert torch.backends.cudnn.benchmark is False  # put back after the decode


def test_compiled_decoder_sees_one_shape_and_gives_the_same_images(kpipe):
    """compile_decoder(rows=2): 5 latents reach the compiled decode as 2, 2 and 2 rows whatever the
    decode's own chunk size (the last chunk padded with its last latent, the copy dropped) and give the
    eager images (dynamo's "eager"
    backend: the graph dynamo traces, run by PyTorch itself; KERNEL_ATOL as other chunkings)."""
    s = kpipe.unet.config.sample_size
    lat = torch.randn(5, 4, s, s, generator=torch.Generator().manual_seed(2))
    want = kpipe.decode(lat, batch=2, uint8=True)
    shapes = []

    def backend(gm, example_inputs):
        shapes.extend(tuple(t.shape) for t in example_inputs  # the latents among the graph's inputs
                      if isinstance(t, torch.Tensor) and t.ndim == 4 and tuple(t.shape[1:]) == (4, s, s))
        return gm.forward

    torch._dynamo.reset()
    try:
        kpipe.compile_decoder(rows=2, backend=backend, dynamic=False)
        got_float = kpipe.decode(lat)
        got = kpipe.decode(lat, batch=4, uint8=True)
    finally:
        kpipe.compile_decoder(None)
        torch._dynamo.reset()
    assert shapes and set(shapes) == {(2, 4, s, s)}  # compiled once, for the one chunk shape
    assert got.shape == want.shape == (5, 8 * s, 8 * s, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).max() <= 1  # a pixel at a rounding edge may move by one level
    np.testing.assert_allclose(got_float, kpipe.decode(lat, batch=2), atol=KERNEL_ATOL, rtol=0)


def test_vae_upcast_decodes_in_float32(pipe):
    """vae_upcast on a half-precision VAE decodes with a float32 copy of it: what that VAE computes in fp32
    (the half weights, exactly representable in fp32), unlike its bf16 decode; the half VAE is left as it was."""
    import copy

    vae16 = copy.deepcopy(pipe.vae).to(torch.bfloat16)
    fake = types.SimpleNamespace(vae=vae16, kernels=kernels.KernelOptions(vae_upcast=True), _kernel_state=None)
    s = pipe.unet.config.sample_size
    lat = torch.randn(2, 4, s, s, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = copy.deepcopy(vae16).float().decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
        low = vae16.decode((lat / pipe.vae.config.scaling_factor).to(torch.bfloat16), return_dict=False)[0].float()
        with kernels.decoding(fake, 8) as (vae, batch):
            assert vae is not vae16 and vae.dtype == torch.float32 and batch == 8
            up = vae.decode(lat.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    assert vae16.dtype == torch.bfloat16
    assert torch.equal(up, ref) and (low - ref).abs().max() > 1e-3


# ---------------------------------------------------------------- FP8

def test_fp8_targets_are_the_attention_and_feed_forward_linears(kpipe):
    kpipe._use_loras({"reference": 0.8})  # folded: the LoRA'd projections are plain Linears again
    names = fp8_targets(kpipe.unet)
    blocks = {n.split(".attn")[0].split(".ff")[0] for n in names}
    assert len(names) == 10 * len(blocks) > 0
    assert all(".transformer_blocks." in n for n in names)
    assert not any("lora" in n or "_ip" in n or "time_emb" in n for n in names)


def test_fp8_needs_torchao(kpipe, monkeypatch):
    """The guard: without torchao, one clear error naming the package (the FP8 deviation check itself is
    GPU-only and lives in bench/pipeline.py's fp8 variant)."""
    from retarget import fp8

    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(RetargetError, match=r"need torchao: pip install 'torchao>=0.18'"):
        fp8.import_torchao()


def test_fp8_on_cpu_fails_clearly(kpipe, actor, expressions):
    kpipe.kernels.fp8 = True
    with pytest.raises(RetargetError, match="FP8 linear layers .* need a CUDA GPU of compute capability >= 8.9"):
        _call(kpipe, actor, expressions)


def test_fp8_swap_plumbing(kpipe, actor, expressions):
    """The swap machinery with stand-in quantizers: exact copies give the same bits (and the originals are
    back after the call); weights rounded to bf16 change the frames a little (the copies are what runs)."""
    want = _call(kpipe, actor, expressions)
    kpipe.kernels.fp8 = True
    kpipe._kernel_state.fp8 = Fp8Linears(quantize=lambda holder: None)
    before = dict(kpipe.unet.named_modules())
    np.testing.assert_array_equal(_call(kpipe, actor, expressions), want)
    after = dict(kpipe.unet.named_modules())
    assert all(after[n] is m for n, m in before.items())

    def to_bf16(holder):
        for m in holder.values():
            m.weight.data = m.weight.data.to(torch.bfloat16).float()

    kpipe._kernel_state.fp8 = Fp8Linears(quantize=to_bf16)
    got = _call(kpipe, actor, expressions)
    assert 0 < np.abs(got - want).max() < 0.05


def test_graph_signature_follows_the_settings_a_graph_freezes(kpipe, actor):
    """A new Expression Adapter scale or LoRA strength is a new signature (a captured graph would have frozen
    the old one), and the static path still equals the plain call."""
    state = kpipe.reference_state
    runner = GraphedUNet(kpipe.unet, state, capture=False)
    x, t, prompt, embeds = _unet_inputs(kpipe, actor, 1, 500, 4)
    keys = []
    try:
        for exp_scale, strength in [(1.0, 0.8), (0.5, 0.8), (0.5, 0.4)]:
            kpipe._use_loras({"reference": strength})
            kpipe.set_ip_adapter_scale(exp_scale)
            with torch.no_grad(), reading(state, actor.bank, read_from=0, unet=kpipe.unet):
                keys.append(runner.signature(x, t, prompt, embeds))
                got = runner(x, t, encoder_hidden_states=prompt, added_cond_kwargs={"image_embeds": embeds})[0]
                assert torch.equal(got, _plain(kpipe, x, t, prompt, embeds))
    finally:
        kpipe.set_ip_adapter_scale(1.0)
    assert len(set(keys)) == 3 and len(runner.steps) == 3
