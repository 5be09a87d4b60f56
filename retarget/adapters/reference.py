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
        read = self.read(attn, hidden_states[split:], ref, attention_mask)
        if split == 0:
            return read
        plain = self.plain(attn, hidden_states[:split], None, attention_mask, temb)
        return torch.cat([plain, read], dim=0)

    @staticmethod
    def read(attn, hidden_states: torch.Tensor, ref: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """attn(q = h, k = v = cat([h, ref], tokens)) for h (n, N, C) and ref (1 or n, M, C).

        Equals `AttnProcessor2_0` called with encoder_hidden_states=cat([h, ref]) (what the release does),
        but projects the shared reference tokens once instead of once per row.
        """
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("reference reading supports the SD transformer blocks' 3-D self-attention")
        if attention_mask is not None:
            raise NotImplementedError("reference reading does not take an attention mask")
        n = hidden_states.shape[0]
        ref = ref.to(hidden_states.dtype)
        query = attn.to_q(hidden_states)
        key = torch.cat([attn.to_k(hidden_states), attn.to_k(ref).expand(n, -1, -1)], dim=1)
        value = torch.cat([attn.to_v(hidden_states), attn.to_v(ref).expand(n, -1, -1)], dim=1)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(n, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(n, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(n, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(n, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


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
def reading(state: ReferenceState, bank: ReferenceBank | None, read_from: int):
    """Within the block, rows >= read_from of every UNet call read `bank`; with bank None, plain attention."""
    if bank is None:
        state.mode = OFF
        yield state
        return
    state.mode, state.bank, state.read_from = READ, bank.states, read_from
    try:
        yield state
    finally:
        state.mode, state.bank, state.read_from = OFF, {}, 0
