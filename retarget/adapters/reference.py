"""The Reference Adapter (SPEC.md §4) as attention processors on the self-attention (attn1) layers.

One `ReferenceAttnProcessor` sits on every attn1 of the UNet, all sharing one `ReferenceState`:
- mode "write": store the processor's input (the block's normalised hidden states) in the bank under
  the processor's name, then do plain self-attention. The bank's order is the order of execution:
  down, mid, up blocks, i.e. the release's block order; the reader finds its block by name.
- mode "read": rows from `read_from` on (the conditional half with CFG) take keys/values from their own
  states concatenated, along the token axis, with the stored states of the same block; earlier rows
  (the unconditional half) do plain self-attention.
- mode "off": plain self-attention (diffusers' `AttnProcessor2_0`, so "off" is stock SD numerically).
The processors call `attn.to_q/to_k/to_v/to_out`, so a peft LoRA on those layers (the reference LoRA)
applies as it does in the release. IP-Adapter processors on attn2 are untouched.

Speed (same numbers): `reading(..., unet=...)` projects the bank's keys/values once per loop instead of once
per step (they depend only on the bank and the weights, fixed within a loop), and a CFG batch's rows share
one q/k/v/out projection (the unconditional rows just skip the bank in the attention itself).
`ReferenceState.fast = False` restores the step-by-step path (benchmark baseline, equality tests).

The writer is "a frozen copy of the UNet without LoRA" in the release; `writer_pass` realises it as the
same module with LoRA disabled, attn2 set to plain cross-attention and the IP-Adapter projection
detached for the duration (tests check it equals a separate copy), which saves a second UNet in memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

READ, WRITE, OFF = "read", "write", "off"


@dataclass
class ReferenceBank:
    """Writer output: one (1, tokens, channels) tensor per transformer block, keyed by attn1 processor
    name, in block order (down, mid, up). Depends only on the reference image and identity."""

    states: dict[str, torch.Tensor]

    @property
    def names(self) -> list[str]:
        return list(self.states)

    def to(self, device=None, dtype=None) -> "ReferenceBank":
        return ReferenceBank({k: v.to(device=device, dtype=dtype) for k, v in self.states.items()})


@dataclass
class ReferenceState:
    """Shared by all reference processors of one UNet; the pipeline switches `mode` around UNet calls."""

    mode: str = OFF
    bank: dict[str, torch.Tensor] = field(default_factory=dict)
    read_from: int = 0
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # bank projected, per loop
    fast: bool = True  # False: project the bank every call and each CFG half apart (the original path)


def _is_self_attention(name: str) -> bool:
    return name.endswith("attn1.processor")


class ReferenceAttnProcessor:
    """Self-attention that writes to or reads from the reference bank (see module docstring)."""

    def __init__(self, name: str, state: ReferenceState):
        self.name = name
        self.state = state
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        state = self.state
        if state.mode == WRITE:
            state.bank[self.name] = hidden_states.detach().clone()
        if state.mode != READ or encoder_hidden_states is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ref = state.bank.get(self.name)
        if ref is None:
            raise RuntimeError(f"reference bank has no states for {self.name}: written by another UNet?")
        split = min(max(state.read_from, 0), hidden_states.shape[0])
        if split == hidden_states.shape[0]:
            return self.plain(attn, hidden_states, None, attention_mask, temb)
        if state.fast:
            kv = state.kv.get(self.name)
            return self.read(attn, hidden_states, ref, attention_mask, kv=kv, plain_rows=split)
        read = self.read(attn, hidden_states[split:], ref, attention_mask)
        if split == 0:
            return read
        plain = self.plain(attn, hidden_states[:split], None, attention_mask, temb)
        return torch.cat([plain, read], dim=0)

    @staticmethod
    def read(attn, hidden_states: torch.Tensor, ref: torch.Tensor, attention_mask=None, *,
             kv: tuple[torch.Tensor, torch.Tensor] | None = None, plain_rows: int = 0) -> torch.Tensor:
        """attn(q = h, k = v = cat([h, ref], tokens)) for h (n, N, C) and ref (1 or n, M, C).

        Equals `AttnProcessor2_0` called with encoder_hidden_states=cat([h, ref]) (what the release does),
        but projects the shared reference tokens once instead of once per row. kv: `project_bank`'s
        (to_k(ref), to_v(ref)) when already computed. plain_rows: the first rows do plain self-attention
        (keys/values from h alone: the unconditional CFG half), sharing the projections with the rest.
        """
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("reference reading supports the SD 3-D self-attention of transformer blocks")
        if attention_mask is not None:
            raise NotImplementedError("reference reading does not take an attention mask")
        n = hidden_states.shape[0]
        s = plain_rows
        r = n - s  # rows that read the bank
        if kv is None:
            kv = project_bank(attn, ref.to(hidden_states.dtype))
        ref_k, ref_v = kv
        query = attn.to_q(hidden_states)
        key_h = attn.to_k(hidden_states)
        value_h = attn.to_v(hidden_states)
        head_dim = key_h.shape[-1] // attn.heads

        def heads(x):
            return x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2)

        def sdpa(q, k, v):
            q, k, v = heads(q), heads(k), heads(v)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            return o.transpose(1, 2).reshape(o.shape[0], -1, attn.heads * head_dim).to(q.dtype)

        key = torch.cat([key_h[s:], ref_k.expand(r, -1, -1)], dim=1)
        value = torch.cat([value_h[s:], ref_v.expand(r, -1, -1)], dim=1)
        out = sdpa(query[s:], key, value)
        if s:
            out = torch.cat([sdpa(query[:s], key_h[:s], value_h[:s]), out], dim=0)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def project_bank(attn, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_k(ref), to_v(ref)) of one attn1 layer for its stored states ref (1, M, C): the bank's keys and
    values, which depend only on the bank and the layer's (possibly LoRA-fused) weights."""
    return attn.to_k(ref), attn.to_v(ref)


def install_reference_processors(unet) -> ReferenceState:
    """Put a ReferenceAttnProcessor (mode "off") on every attn1 of `unet`, keeping the other processors.

    Call after loading the IP-Adapter: diffusers' IP-Adapter loader resets all processors.
    """
    state = ReferenceState()
    procs = dict(unet.attn_processors)
    for name in procs:
        if _is_self_attention(name):
            procs[name] = ReferenceAttnProcessor(name, state)
    unet.set_attn_processor(procs)
    return state


def _lora_enabled(unet) -> bool | None:
    """True/False when `unet` carries peft LoRA layers (enabled or not), None when it has none."""
    for module in unet.modules():
        if hasattr(module, "lora_A") and hasattr(module, "disable_adapters"):
            return not module.disable_adapters
    return None


@contextlib.contextmanager
def writer_pass(unet, state: ReferenceState):
    """Within the block, `unet` computes what the release's frozen reference UNet computes, and its attn1
    processors write the bank: LoRA disabled, attn2 plain cross-attention, no IP-Adapter projection."""
    from retarget.adapters import fusion

    fusion.unfuse(unet)  # the writer sees the base weights, never a fused LoRA
    saved = unet.attn_processors
    writer = {name: p if _is_self_attention(name) else AttnProcessor2_0() for name, p in saved.items()}
    hid_proj = unet.encoder_hid_proj
    lora = _lora_enabled(unet)
    unet.set_attn_processor(writer)
    unet.encoder_hid_proj = None
    if lora:
        unet.disable_lora()
    state.mode, state.bank = WRITE, {}
    try:
        yield state
    finally:
        state.mode = OFF
        unet.set_attn_processor(saved)
        unet.encoder_hid_proj = hid_proj
        if lora:
            unet.enable_lora()


@torch.no_grad()
def write_bank(unet, state: ReferenceState, ref_latent: torch.Tensor, prompt_embeds: torch.Tensor) -> ReferenceBank:
    """Run the writer once: latent (1, 4, h, w) of the reference image (already times the VAE scaling
    factor), timestep 0, identity prompt embeds (1, 77, 768) as encoder states. Returns the bank."""
    with writer_pass(unet, state):
        t = torch.zeros(ref_latent.shape[0], device=ref_latent.device, dtype=torch.long)
        unet(ref_latent, t, encoder_hidden_states=prompt_embeds, return_dict=False)
        bank = ReferenceBank(dict(state.bank))
    expected = {n for n in unet.attn_processors if _is_self_attention(n)}
    if set(bank.names) != expected:
        raise RuntimeError("reference writer did not visit every self-attention layer")
    return bank


@contextlib.contextmanager
def reading(state: ReferenceState, bank: ReferenceBank | None, read_from: int, unet=None):
    """Within the block, rows >= read_from of every UNet call read `bank`; with bank None, plain attention.

    unet: the UNet whose processors share `state`; given (and `state.fast`), the bank's keys/values are
    projected once here with its current weights, so the weights and LoRA scales must not change inside
    the block."""
    if bank is None:
        state.mode = OFF
        yield state
        return
    state.mode, state.bank, state.read_from = READ, bank.states, read_from
    try:
        if unet is not None and state.fast:
            with torch.no_grad():
                for name, ref in bank.states.items():
                    attn = unet.get_submodule(name.removesuffix(".processor"))
                    state.kv[name] = project_bank(attn, ref.to(attn.to_k.weight.dtype))
        yield state
    finally:
        state.mode, state.bank, state.read_from, state.kv = OFF, {}, 0, {}
