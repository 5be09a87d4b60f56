"""Kernel switches for the denoising loop and the VAE decode: memory format, SDPA backend, CUDA graphs,
cuDNN autotuning, VAE decode settings and FP8 linear layers (issue 14, "kernel work").

Every switch lives in `KernelOptions` (`pipe.kernels`), off by default: each is measured alone against
the default by `bench/pipeline.py` and flipping a default is one line in the dataclass below. Each keeps
the output unchanged within float rounding (tests/retarget/test_kernels.py), except FP8, whose deviation
the bench reports beside its speed.

    pipe.kernels.channels_last = True        # UNet in NHWC (meant for CUDA; runs anywhere)
    pipe.kernels.attention_backend = "flash" # preferred SDPA kernel inside the denoising loop
    pipe.kernels.cuda_graph = True           # replay one captured UNet step per batch shape (CUDA)
    pipe.kernels.fp8 = True                  # torchao FP8 attention/feed-forward Linears (H100/H200/Ada)

The pipeline calls `denoising(pipe, unet)` around its loop and `decoding(pipe, batch)` around the VAE
decode; both apply the options lazily (a memory-format change converts the weights once, on the first
call after the switch).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from render.errors import RetargetError

ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
# The backends torch runs on the CPU: its C++ flash kernel and the reference math; the others are CUDA kernels.
CPU_BACKENDS = ("auto", "flash", "math")


@dataclass
class KernelOptions:
    """The pipeline's kernel switches (all off = the measured default path).

    channels_last: UNet weights (and so activations) in NHWC memory format during the loop.
    vae_channels_last: the same for the VAE (decode).
    attention_backend: "auto" (torch's dispatcher), or the SDPA kernel to prefer inside the denoising loop:
        "cudnn", "flash", "efficient" (CUDA; "flash" also on the CPU) or "math" (everywhere). Shapes the
        preferred kernel cannot run fall back to torch's usual order, so a choice never fails a call.
    cuda_graph: capture one UNet step per input shape into a CUDA graph and replay it (retarget/cuda_graph.py);
        meant for the fast mode, where 4 steps of small batches are launch-bound. Needs a CUDA device; any
        capture failure falls back to eager with one warning.
    cudnn_benchmark: torch.backends.cudnn.benchmark on for the loop and the decode (autotuned convolutions).
    decode_batch: frames per VAE decode chunk instead of the call's `decode_batch` (None: the call's).
    vae_upcast: decode with a float32 copy of the VAE (the diffusers `force_upcast` remedy for fp16 VAEs).
    fp8: the UNet's attention projections and feed-forward Linears in FP8 through torchao (retarget/fp8.py);
        a CUDA GPU of compute capability >= 8.9. Not exact: the bench reports its deviation.
    """

    channels_last: bool = False
    vae_channels_last: bool = False
    attention_backend: str = "auto"
    cuda_graph: bool = False
    cudnn_benchmark: bool = False
    decode_batch: int | None = None
    vae_upcast: bool = False
    fp8: bool = False


@dataclass
class KernelState:
    """What the switches built and keep between calls: the CUDA graph runner, the FP8 layers, the fp32 VAE."""

    graphs: object = None  # cuda_graph.GraphedUNet
    fp8: object = None  # fp8.Fp8Linears
    vae32: nn.Module | None = None
    cpu_graph_warned: bool = False
    extra: dict = field(default_factory=dict)

    def reset(self) -> None:
        """Drop everything built for the current weights and device (after `pipe.to(...)`)."""
        self.graphs, self.fp8, self.vae32 = None, None, None


def _backend_enum():
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


# torch's own default priority order (flash, efficient, math, cuDNN), used after the preferred kernel
DEFAULT_ORDER = ("flash", "efficient", "math", "cudnn")


def check_attention_backend(name: str, device: torch.device | str) -> str:
    """`name` when it is a known backend that runs on `device`; RetargetError otherwise."""
    if name not in ATTENTION_BACKENDS:
        raise RetargetError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if torch.device(device).type != "cuda" and name not in CPU_BACKENDS:
        raise RetargetError(f"attention_backend {name!r} is a CUDA kernel and the pipeline is on "
                            f"{torch.device(device).type}; use one of {', '.join(CPU_BACKENDS)}")
    return name


def attention_backend(name: str, device: torch.device | str):
    """Context manager: inside it, scaled_dot_product_attention prefers the `name` kernel ("auto": no change).

    "math" allows only the math kernel; the others put `name` first and torch's default order after it
    (`sdpa_kernel(..., set_priority=True)`), so a shape the kernel cannot run (e.g. a head size cuDNN
    lacks) takes the next one instead of failing."""
    check_attention_backend(name, device)
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    enum = _backend_enum()
    if name == "math":
        return sdpa_kernel([enum["math"]])
    order = [enum[name]] + [enum[n] for n in DEFAULT_ORDER if n != name]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without priorities: the kernel, with math as the safety net
        return sdpa_kernel([enum[name], enum["math"]])


def sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The kernel torch's dispatcher picks for these (n, heads, tokens, head_dim) tensors under the current
    sdpa settings: "flash", "efficient", "cudnn", "math" (or "unknown" where torch does not say)."""
    names = {int(e.value): n for n, e in _backend_enum().items()}
    try:
        return names.get(int(torch._fused_sdp_choice(q, k, v)), "unknown")
    except Exception:  # a private torch function: never let a report stop the work
        return "unknown"


def set_memory_format(module: nn.Module, channels_last: bool) -> bool:
    """Put `module`'s 4-D weights in channels_last (NHWC) or back in contiguous (NCHW) format, in place
    (the parameter objects are kept, so LoRA fusion's saved weights stay valid). Returns True when it
    changed anything; a second call with the same value costs nothing."""
    want = torch.channels_last if channels_last else torch.contiguous_format
    if getattr(module, "_retarget_memory_format", torch.contiguous_format) == want:
        return False
    module.to(memory_format=want)
    module._retarget_memory_format = want
    return True


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    if not on:
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _state(pipe) -> KernelState:
    if getattr(pipe, "_kernel_state", None) is None:
        pipe._kernel_state = KernelState()
    return pipe._kernel_state


@contextlib.contextmanager
def denoising(pipe, unet):
    """Around a denoising loop: applies `pipe.kernels` and yields the UNet callable to use for the steps
    (`unet` itself, or the CUDA graph runner wrapping it). Checks the options before any work."""
    opts: KernelOptions = pipe.kernels
    device = pipe.device
    backend = attention_backend(opts.attention_backend, device)
    set_memory_format(pipe.unet, opts.channels_last)
    state = _state(pipe)
    step = unet
    with contextlib.ExitStack() as stack:
        if opts.fp8:
            from retarget import fp8 as fp8mod

            if state.fp8 is None:
                state.fp8 = fp8mod.Fp8Linears()
            stack.enter_context(state.fp8.swapped(pipe.unet))
        stack.enter_context(backend)
        stack.enter_context(_cudnn_benchmark(opts.cudnn_benchmark))
        if opts.cuda_graph:
            step = _graph_runner(pipe, unet, state, opts)
        yield step


def _graph_runner(pipe, unet, state: KernelState, opts: KernelOptions):
    import warnings

    from retarget.cuda_graph import GraphedUNet

    if pipe.device.type != "cuda" and state.graphs is None:  # (a runner set by hand, as tests do, is used)
        if not state.cpu_graph_warned:
            warnings.warn(f"cuda_graph needs a CUDA device; the pipeline is on {pipe.device.type}: running eager",
                          stacklevel=4)
            state.cpu_graph_warned = True
        return unet
    if unet is not pipe.unet:  # a torch.compile'd UNet captures its own graphs ("reduce-overhead")
        return unet
    if state.graphs is None:
        state.graphs = GraphedUNet(pipe.unet, pipe.reference_state)
    state.graphs.extra_key = (opts.channels_last, opts.attention_backend, opts.fp8, opts.cudnn_benchmark)
    return state.graphs


@contextlib.contextmanager
def decoding(pipe, batch: int):
    """Around a VAE decode: yields (vae, frames per chunk) with `pipe.kernels` applied."""
    opts: KernelOptions = pipe.kernels
    state = _state(pipe)
    vae = pipe.vae
    if opts.vae_upcast and vae.dtype != torch.float32:
        if state.vae32 is None:
            state.vae32 = copy.deepcopy(vae).to(torch.float32)
        vae = state.vae32
    set_memory_format(vae, opts.vae_channels_last)
    with _cudnn_benchmark(opts.cudnn_benchmark):
        yield vae, max(1, int(opts.decode_batch or batch))
