"""The model side of training: the release pipeline with the adapter to train unfrozen, and one loss.

`build_training_pipeline` loads the release (SPEC.md §1) through the same components as
`RetargetPipeline.from_weights`, with the Expression Adapter and the reference LoRA either as released
(fine-tuning) or fresh (`formats.fresh_*`), installed by the pipeline's own `setup_adapters`. Everything is
frozen except the adapter being trained.

`Objective.loss` is the base model's noise-prediction loss (SD 1.5: epsilon, or v if the scheduler config
says so) on a batch, with condition dropout so that classifier-free guidance keeps working:
- identity -> the empty-prompt embedding (`drop_identity`), as the unconditional CFG half at inference;
- expression -> zeros (`drop_expression`), the Expression Adapter's unconditional input at inference;
- reference (reference mode) -> no bank read, plain self-attention (`drop_reference`), as the
  unconditional half does at inference.
Every random draw of a sample (timestep, noise, VAE sample, dropout) comes from a generator seeded by
(seed, global sample position) on the CPU, so a sample's loss does not depend on batching, process count,
device or on where a run was resumed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from render.errors import RetargetError
from retarget.train import formats

MODES = ("expression", "reference")
IDENTITY_CACHE = 4096  # prompt embeddings kept (77 x 768 floats each, 236 kB in fp32)


@dataclass
class TrainingModel:
    """pipe: RetargetPipeline; params: trainable parameters by name; key_map / file_shapes: the Expression
    Adapter's file naming (expression mode, see formats.image_proj_key_map)."""

    pipe: object
    mode: str
    params: dict
    key_map: dict | None = None
    file_shapes: dict | None = None

    def adapter_state(self) -> dict:
        """The trained adapter as the release file's contents (see formats)."""
        if self.mode == "expression":
            return formats.exp_adapter_state(self.pipe.unet, self.key_map, self.file_shapes)
        return formats.lora_state(self.pipe.unet)

    def save_adapter(self, root) -> str:
        """Write the trained adapter under `root` at its release path; returns that relative path."""
        from pathlib import Path

        if self.mode == "expression":
            formats.save_exp_adapter(self.adapter_state(), Path(root) / formats.EXP_FILE)
            return formats.EXP_FILE
        formats.save_lora(self.adapter_state(), Path(root) / formats.REF_FILE)
        return formats.REF_FILE

    def set_train_state(self) -> None:
        """Adapters as training uses them: expression mode without the Reference Adapter; reference mode with
        its LoRA at scale 1 (peft layers, never fused); the Expression Adapter at scale 1."""
        pipe = self.pipe
        pipe.unfuse_loras()
        pipe._set_loras({pipe_ref(): 1.0} if self.mode == "reference" else {})
        pipe.set_ip_adapter_scale(1.0)
        pipe.reference_state.mode = "off"


def pipe_ref() -> str:
    from retarget.pipeline import REF_ADAPTER

    return REF_ADAPTER


def build_training_pipeline(layout, mode: str, *, init: str = "release", rank: int = 16,
                            lora_targets: str = "attn1", seed: int = 0) -> TrainingModel:
    """The release pipeline (fp32, CPU) ready to train `mode` ("expression" or "reference").
    init "release": start from the released adapter file; "scratch": a fresh one (formats.fresh_*; the LoRA
    with `rank` on `lora_targets`). Raises WeightsError naming a missing or broken file."""
    from retarget import components
    from retarget.pipeline import RetargetPipeline

    if mode not in MODES:
        raise RetargetError(f"training mode must be one of {', '.join(MODES)}, got {mode!r}")
    if init not in ("release", "scratch"):
        raise RetargetError(f"--init must be 'release' or 'scratch', got {init!r}")
    unet = components.load_unet(layout)
    vae = components.load_vae(layout)
    text_encoder = components.load_text_encoder(layout)
    tokenizer = components.load_tokenizer(layout)
    scheduler = components.make_scheduler(components.load_scheduler_config(layout), "dpm++")
    exp_path, ref_path = layout.require("exp_adapter"), layout.require("ref_adapter_lora")
    exp_state = components.load_exp_adapter_state(exp_path)
    ref_state = components.load_lora_state(ref_path, "Reference Adapter LoRA")
    if init == "scratch" and mode == "expression":
        exp_state = formats.fresh_exp_adapter(unet, exp_state, seed=seed)
    if init == "scratch" and mode == "reference":
        ref_state = formats.fresh_lora(unet, rank, lora_targets, seed=seed)
    pipe = RetargetPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.layout = layout
    pipe.setup_adapters(exp_state, ref_state, exp_path=exp_path, ref_path=ref_path)
    return training_model(pipe, mode, exp_state["image_proj"])


def training_model(pipe, mode: str, exp_image_proj: dict) -> TrainingModel:
    """Freeze `pipe` (a RetargetPipeline with both adapters installed) except the adapter of `mode`.
    exp_image_proj: the `image_proj` dict the Expression Adapter was loaded from (its file naming)."""
    pipe.fuse_loras = False  # training needs peft's LoRA layers in place
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    if mode == "expression":
        params = formats.exp_adapter_params(pipe.unet)
        key_map = formats.image_proj_key_map(pipe.unet, exp_image_proj)
        shapes = {k: tuple(v.shape) for k, v in exp_image_proj.items()}
    else:
        params, key_map, shapes = formats.lora_params(pipe.unet), None, None
        if not params:
            raise RetargetError("the Reference Adapter file holds no LoRA layers for the UNet")
    for p in params.values():
        p.requires_grad_(True)
    model = TrainingModel(pipe, mode, params, key_map, shapes)
    model.set_train_state()
    return model


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The CPU generator of one sample: depends only on (seed, global sample position)."""
    return torch.Generator("cpu").manual_seed((int(seed) * 1_000_003 + int(position)) % (2**63 - 1))


def _to_model_images(images: np.ndarray, size: int, device, dtype) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, size, size) in [-1, 1] (INTER_AREA down, cubic up: as the pipeline)."""
    import cv2

    if images.shape[1] != size:
        interp = cv2.INTER_AREA if images.shape[1] > size else cv2.INTER_CUBIC
        images = np.stack([cv2.resize(im, (size, size), interpolation=interp) for im in images])
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.to(device=device, dtype=dtype) / 127.5 - 1.0


class Objective:
    """The noise-prediction loss of one mode (see the module docstring). `unet` is what the forward runs
    through (the accelerate-prepared module, DDP under data parallel); `model.pipe.unet` the module itself."""

    def __init__(self, model: TrainingModel, *, seed: int, drop_identity: float = 0.05,
                 drop_expression: float = 0.1, drop_reference: float = 0.1):
        from diffusers import DDPMScheduler

        for name, p in (("drop_identity", drop_identity), ("drop_expression", drop_expression),
                        ("drop_reference", drop_reference)):
            if not 0.0 <= p <= 1.0:
                raise RetargetError(f"--{name.replace('_', '-')} must be in [0, 1], got {p}")
        self.model = model
        self.seed = int(seed)
        self.p = (float(drop_identity), float(drop_expression), float(drop_reference))
        self.noise_scheduler = DDPMScheduler.from_config(model.pipe.scheduler.config)
        self.prediction = self.noise_scheduler.config.prediction_type
        self._uncond = None
        self._ids: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _identity(self, arcface: np.ndarray, index) -> torch.Tensor:
        """(B, 77, 768) identity prompt embeddings, one row at a time (so a row never depends on the batch it
        is in) and cached by item index (the text encoder is frozen: the same item always gives the same)."""
        rows = []
        for i, vec in enumerate(arcface):
            key = None if index is None else int(index[i])
            e = self._ids.get(key) if key is not None else None
            if e is None:
                e = self.model.pipe.identity.encode(vec[None])
                if key is not None:
                    self._ids[key] = e
                    if len(self._ids) > IDENTITY_CACHE:
                        self._ids.popitem(last=False)
            elif key is not None:
                self._ids.move_to_end(key)
            rows.append(e)
        return torch.cat(rows)

    def _draws(self, positions, latent_shape):
        T = self.noise_scheduler.config.num_train_timesteps
        t, drops, noise, eps, eps_ref = [], [], [], [], []
        for pos in positions:
            g = sample_generator(self.seed, pos)
            t.append(int(torch.randint(0, T, (1,), generator=g)))
            drops.append(torch.rand(3, generator=g) < torch.tensor(self.p))
            noise.append(torch.randn(latent_shape, generator=g))
            eps.append(torch.randn(latent_shape, generator=g))
            eps_ref.append(torch.randn(latent_shape, generator=g))
        return (torch.tensor(t), torch.stack(drops), torch.stack(noise), torch.stack(eps), torch.stack(eps_ref))

    @torch.no_grad()
    def _latents(self, images: np.ndarray, eps: torch.Tensor) -> torch.Tensor:
        pipe = self.model.pipe
        x = _to_model_images(images, pipe.image_size, pipe.device, pipe.vae.dtype)
        dist = pipe.vae.encode(x).latent_dist
        z = dist.mean + dist.std * eps.to(dist.mean.device, dist.mean.dtype)  # = dist.sample, our draw
        return z * pipe.vae.config.scaling_factor

    def forward_backward(self, batch: dict, unet=None, backward=None, scale: float = 1.0) -> float:
        """Forward `batch` through `unet` (default the model's), then `backward(loss * scale)` (default
        `loss.backward`) inside the reference-reading context; returns the unscaled loss (float)."""
        from retarget.adapters import reference as ref_adapter

        pipe = self.model.pipe
        unet = unet if unet is not None else pipe.unet
        device = pipe.device
        b = len(batch["positions"])
        c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
        t, drops, noise, eps, eps_ref = self._draws(batch["positions"], (c, s, s))
        drop_id, drop_exp, drop_ref = drops[:, 0], drops[:, 1], drops[:, 2]
        if self.model.mode == "reference":
            # Rows that skip the bank go first: the reader takes the bank from row `read_from` on.
            order = torch.argsort((~drop_ref).to(torch.int8), stable=True)
            t, drop_id, drop_exp, drop_ref = t[order], drop_id[order], drop_exp[order], drop_ref[order]
            noise, eps, eps_ref = noise[order], eps[order], eps_ref[order]
            batch = {k: (v[order.numpy()] if isinstance(v, np.ndarray) else v) for k, v in batch.items()}
        latents = self._latents(batch["target"], eps)
        noise = noise.to(device, latents.dtype)
        t = t.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)

        with torch.no_grad():
            ids = self._identity(batch["arcface"], batch.get("id_index")).to(device)
            if self._uncond is None:
                self._uncond = pipe.identity.encode_empty().to(device)
            prompt = torch.where(drop_id.to(device)[:, None, None], self._uncond.to(ids.dtype), ids)
        exp = torch.from_numpy(batch["exp"]).to(device=device, dtype=torch.float32)
        exp = torch.where(drop_exp.to(device)[:, None], torch.zeros_like(exp), exp)
        added = {"image_embeds": [exp[:, None, :]]}

        bank, read_from = None, b
        if self.model.mode == "reference":
            read_from = int(drop_ref.sum())
            if read_from < b:
                keep = slice(read_from, b)
                ref_lat = self._latents(batch["reference"][keep], eps_ref[keep])
                ref_ids = ids[keep]  # the reference and the target are one person (same video)
                bank = ref_adapter.write_bank(pipe.unet, pipe.reference_state, ref_lat, ref_ids)
        # unet=None: the bank's keys/values are projected in every call, with gradients through the LoRA.
        with ref_adapter.reading(pipe.reference_state, bank, read_from=read_from, unet=None):
            pred = unet(noisy, t, encoder_hidden_states=prompt, added_cond_kwargs=added, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            (backward or torch.Tensor.backward)(loss * scale)
        return float(loss.detach())


    def evaluate(self, batch: dict) -> float:
        """The loss of `batch` without gradients or updates (a fixed batch measures progress exactly)."""
        with torch.no_grad():
            return self.forward_backward(batch, backward=lambda loss: None)


def collate(data, mode: str, indices: list[int], positions: list[int]) -> dict:
    """A batch for `Objective`: expression mode, `indices` are items; reference mode, rows of `data.pairs`.
    Returns numpy arrays target (B, S, S, 3) uint8, arcface (B, 512) with id_index (B,) (the item it is
    from), exp (B, 55) [, reference (B, S, S, 3)] and the samples' global positions."""
    if mode == "expression":
        items = [data[i] for i in indices]
        out = {"target": np.stack([it["image"] for it in items])}
        ids = [it["arcface"] for it in items]
        out["id_index"] = np.asarray(indices, dtype=np.int64)
    else:
        pairs = [data.pairs[i] for i in indices]
        refs = [data[int(r)] for r, _ in pairs]
        items = [data[int(t)] for _, t in pairs]
        out = {"target": np.stack([it["image"] for it in items]),
               "reference": np.stack([r["image"] for r in refs])}
        ids = [r["arcface"] for r in refs]
        out["id_index"] = np.asarray([int(r) for r, _ in pairs], dtype=np.int64)
    out["arcface"] = np.stack(ids).astype(np.float32)
    out["exp"] = np.stack([it["exp"] for it in items]).astype(np.float32)
    out["positions"] = list(positions)
    return out
