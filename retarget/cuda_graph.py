"""One UNet step captured in a CUDA graph and replayed, for the launch-bound fast mode (LCM, 4 steps).

`GraphedUNet(unet, reference_state)` is called like the UNet in the denoising loop. Per input signature
(shapes and dtypes of the latents, prompt and expression embeddings, the reference mode and the bank's
keys/values, the folded LoRA scales, the Expression Adapter scale, where the weights live) it keeps one
`StaticStep`: static input buffers, the captured graph and its output. Each call copies its inputs into
the buffers and replays; the timestep is an input buffer too, so one graph serves every step.

What must hold for a replay to compute what the eager call computes, and how it is kept:
- nothing data-dependent on the CPU inside the UNet: diffusers' UNet and our processors branch on shapes
  and on Python settings only, which are in the signature;
- the LoRA scales are Python numbers in peft's layers: graphs are used only with the LoRA folded into
  the weights (`fusion.fused_key` not None, so no peft layer is in the tree), and the fused key is in the
  signature; folding writes the weights in place, so a graph never reads freed memory;
- the bank's projected keys/values (`ReferenceState.kv`, recomputed per call by `reading`) are copied into
  the graph's own buffers, which then replace them in `state.kv` for the rest of the loop;
- everything else (a reference bank projected inside the step, the writer pass, unfolded LoRA) runs eager.
Any failure while capturing (an op that syncs with the CPU, out of memory) warns once and leaves that
signature eager for the life of the runner.
"""

from __future__ import annotations

import warnings

import torch

from retarget.adapters import fusion
from retarget.adapters.reference import OFF, READ


class StaticStep:
    """Static input buffers for one signature, and (after `capture`) the graph that reads them.

    Without a graph, `run` calls the UNet on the buffers eagerly: the same numbers as a plain call (this
    is what the CPU tests check) and the warm-up path before capture."""

    def __init__(self, unet, state, sample, timestep, prompt, embeds):
        self.unet, self.state = unet, state
        self.sample = sample.clone()
        self.timestep = timestep.to(sample.device).clone()  # a CPU timestep would be a captured host copy
        self.prompt = prompt.clone()
        self.embeds = [e.clone() for e in embeds]
        # the bank's keys/values as the graph reads them; state.kv entries are swapped for these
        self.kv = {name: (k.clone(), v.clone()) for name, (k, v) in state.kv.items()}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def _load(self, sample, timestep, prompt, embeds) -> None:
        self.sample.copy_(sample)
        self.timestep.copy_(timestep)
        self.prompt.copy_(prompt)
        for buf, e in zip(self.embeds, embeds):
            buf.copy_(e)
        kv = self.state.kv
        for name, pair in self.kv.items():
            if kv.get(name) is not pair:
                pair[0].copy_(kv[name][0])
                pair[1].copy_(kv[name][1])
                kv[name] = pair

    def _eager(self) -> torch.Tensor:
        return self.unet(self.sample, self.timestep, encoder_hidden_states=self.prompt,
                         added_cond_kwargs={"image_embeds": self.embeds}, return_dict=False)[0]

    def capture(self, pool=None, warmup: int = 2) -> None:
        """Warm up on a side stream (cuDNN/cuBLAS choose their kernels and workspaces), then capture."""
        self._load(self.sample, self.timestep, self.prompt, self.embeds)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA work (a job's overlapped stages) may go on during the capture
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = self._eager()
        self.graph, self.out = graph, out

    def run(self, sample, timestep, prompt, embeds) -> torch.Tensor:
        """eps for these inputs: copied into the buffers, then the graph replayed (or the UNet called)."""
        self._load(sample, timestep, prompt, embeds)
        if self.graph is None:
            return self._eager().clone()
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites the graph's output


class _IPScales:
    """The Expression Adapter scales of a UNet's attn2 processors (Python numbers a graph freezes), read
    from the processors found once; found again when a processor was replaced (e.g. adapters reloaded)."""

    def __init__(self, unet):
        self.unet = unet
        self.pairs: list = []

    def _find(self) -> None:
        self.pairs = [(m, m.processor) for m in self.unet.modules()
                      if hasattr(m, "processor") and hasattr(m.processor, "to_k_ip")]

    def __call__(self) -> tuple:
        if not self.pairs or any(m.processor is not p for m, p in self.pairs):
            self._find()
        return tuple(tuple(p.scale) if isinstance(p.scale, (list, tuple)) else (p.scale,) for _, p in self.pairs)


class GraphedUNet:
    """Drop-in for the UNet inside the denoising loop: `runner(x, t, encoder_hidden_states=...,
    added_cond_kwargs={"image_embeds": [...]}, return_dict=False) -> (eps,)`. See the module docstring.

    capture: None (default) captures graphs on CUDA and runs the static buffers eagerly elsewhere; False
    never captures; True always tries (tests inject a failing capture this way)."""

    def __init__(self, unet, state, *, capture: bool | None = None):
        self.unet, self.state = unet, state
        self.capture = capture
        self.steps: dict[tuple, StaticStep] = {}
        self.failed: dict[tuple, str] = {}
        self.warned = False
        self.extra_key: tuple = ()
        self.pool = None
        self.replays = 0
        self._ip_scales = _IPScales(unet)

    def signature(self, sample, timestep, prompt, embeds) -> tuple | None:
        """The key of the graph that serves these inputs, or None when they must run eager."""
        state = self.state
        fused = fusion.fused_key(self.unet)
        if fused is None or state.mode not in (OFF, READ) or (state.mode == READ and not state.fast):
            return None
        if not torch.is_tensor(timestep) or timestep.numel() != 1:
            return None
        kv = tuple((n, tuple(k.shape), tuple(v.shape), k.dtype) for n, (k, v) in sorted(state.kv.items()))
        if state.mode == READ and len(kv) != len(state.bank):
            return None
        return (tuple(sample.shape), sample.dtype, str(sample.device), tuple(timestep.shape), timestep.dtype,
                tuple(prompt.shape), prompt.dtype, tuple(tuple(e.shape) for e in embeds),
                state.mode, state.read_from, kv, fused, self._ip_scales(),
                self.unet.conv_in.weight.data_ptr(), self.extra_key)

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False,
                 **kwargs):
        embeds = list((added_cond_kwargs or {}).get("image_embeds") or [])
        extra = set(added_cond_kwargs or {}) - {"image_embeds"}
        key = None if kwargs or extra or not embeds or return_dict else \
            self.signature(sample, timestep, encoder_hidden_states, embeds)
        if key is None or key in self.failed:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kwargs)
        step = self.steps.get(key)
        if step is None:
            step = StaticStep(self.unet, self.state, sample, timestep, encoder_hidden_states, embeds)
            capture = self.capture if self.capture is not None else sample.device.type == "cuda"
            if capture:
                try:
                    self._capture(step)
                except Exception as e:  # noqa: BLE001 - any capture failure means: run this shape eager
                    self.failed[key] = f"{e.__class__.__name__}: {e}"
                    if sample.device.type == "cuda":
                        try:  # let the failed capture's work finish before the eager call
                            torch.cuda.synchronize()
                        except Exception:  # noqa: BLE001
                            pass
                    if not self.warned:
                        self.warned = True
                        warnings.warn(f"CUDA graph capture failed ({self.failed[key][:200]}); the UNet runs "
                                      "eager for this batch shape", stacklevel=2)
                    return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs, return_dict=False)
            self.steps[key] = step
        self.replays += step.graph is not None
        return (step.run(sample, timestep, encoder_hidden_states, embeds),)

    def _capture(self, step: StaticStep) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time: one memory pool
        step.capture(self.pool)

    def clear(self) -> None:
        """Drop every graph and buffer (their memory goes back to the allocator)."""
        self.steps.clear()
        self.failed.clear()
