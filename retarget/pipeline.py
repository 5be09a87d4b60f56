"""The retargeting pipeline: Arc2Face + Expression Adapter + Reference Adapter, many frames at once.

`RetargetPipeline.prepare_actor` does the once-per-video work (face, identity embedding, reference
latent, reference bank); `__call__` renders B frames of one actor in one batched denoising loop
(2B rows with classifier-free guidance), written out below in diffusers' style.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor

from render.errors import RetargetError
from retarget import components, kernels
from retarget.adapters import expression as exp_adapter
from retarget.adapters import fusion
from retarget.adapters import reference as ref_adapter
from retarget.identity import ArcFaceEmbedder, IdentityEncoder

REF_ADAPTER = "reference"
LCM_ADAPTER = "lcm"
DEFAULTS = {"dpm++": {"steps": 25, "guidance": 3.0}, "lcm": {"steps": 4, "guidance": 1.0}}
REF_LATENT_MODES = ("sample", "mode")


@dataclass
class Actor:
    """Everything about the actor that does not change from frame to frame.

    id_embeds / uncond_embeds: (1, 77, 768) prompt embeddings (identity; empty prompt) on the pipeline's
    device and dtype. arcface: (512,) float32 unit vector. ref_latent: (1, 4, h, w) VAE latent of the
    FFHQ-aligned reference (times the scaling factor), or None. bank: the writer's ReferenceBank, or None
    (reference off). crop: the FFHQ-aligned actor image (S, S, 3) uint8, M: (2, 3) float64 mapping
    actor-image pixels to crop pixels. face_report: one line about the detection, for the user.
    """

    id_embeds: torch.Tensor
    uncond_embeds: torch.Tensor
    arcface: np.ndarray
    ref_latent: torch.Tensor | None = None
    bank: ref_adapter.ReferenceBank | None = None
    crop: np.ndarray | None = None
    M: np.ndarray | None = None
    face_report: str = ""


# Frames per VAE decode chunk: 16 decoded in 14.5 ms/frame against 17.4 for 8, with the same pixels
# (H200, fp16, bench/results/pipeline_NVIDIA_H200_2026-12-03_kernels.json); 32 gained 1% more.
DECODE_BATCH = 16


def _clone_generator(g: torch.Generator) -> torch.Generator:
    c = torch.Generator(device=g.device)
    c.set_state(g.get_state())
    return c


def _generator(generator, seed, device="cpu"):
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))


class RetargetPipeline(DiffusionPipeline, IPAdapterMixin, StableDiffusionLoraLoaderMixin):
    """Arc2Face UNet + VAE + fine-tuned CLIP text encoder, with the Expression Adapter (IP-Adapter on attn2),
    the Reference Adapter (processors on attn1 + LoRA "reference") and optionally the LCM-LoRA ("lcm")."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components: list[str] = []

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.identity = IdentityEncoder(tokenizer, text_encoder)
        self.reference_state: ref_adapter.ReferenceState | None = None
        self.exp_projection = None
        self.layout = None
        self.arcface: ArcFaceEmbedder | None = None
        self.face_backend = None
        self._lcm_state: dict | None = None
        self._adapters: set[str] = set()
        # Speed switches (same numbers within float rounding; tests/retarget/test_pipeline_speed.py):
        # fold the call's LoRA scales into the weights for the loop, re-folded when they change.
        self.fuse_loras = True
        self._compiled_unet = None
        self._compiled_decode = None
        self._compiled_decode_rows = DECODE_BATCH
        # Kernel switches (retarget/kernels.py), all off by default; bench/pipeline.py measures each.
        self.kernels = kernels.KernelOptions()
        self._kernel_state = kernels.KernelState()
        self.set_progress_bar_config(disable=True)  # callers show progress per batch of frames

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weights(cls, layout, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                     lcm: bool = False, face_backend=None) -> "RetargetPipeline":
        """Load the release (SPEC.md §1) from `layout` (a WeightsLayout) onto `device` in `dtype`
        (fp16/bf16 on GPU, fp32 or bf16 on CPU). Missing or broken files raise WeightsError naming the file.
        The LCM-LoRA loads now with lcm=True, else on first use of scheduler="lcm"; faces are found with
        `face_backend` (default:
        tracking's "auto" backend, created on first use)."""
        device = torch.device(device)
        if device.type == "cpu" and dtype == torch.float16:
            raise RetargetError("float16 on the CPU is not supported; use float32 (or bfloat16) there")
        unet = components.load_unet(layout, dtype)
        vae = components.load_vae(layout, dtype)
        text_encoder = components.load_text_encoder(layout, dtype)
        tokenizer = components.load_tokenizer(layout)
        scheduler = components.make_scheduler(components.load_scheduler_config(layout), "dpm++")
        pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        pipe.layout = layout
        exp_path = layout.require("exp_adapter")
        ref_path = layout.require("ref_adapter_lora")
        pipe.setup_adapters(components.load_exp_adapter_state(exp_path),
                            components.load_lora_state(ref_path, "Reference Adapter LoRA"),
                            exp_path=exp_path, ref_path=ref_path)
        pipe.arcface = ArcFaceEmbedder(layout.require("arcface_onnx"),
                                       providers=None if device.type == "cuda" else ["CPUExecutionProvider"])
        pipe.face_backend = face_backend
        if lcm:
            pipe.load_lcm_lora()
        return pipe.to(device)

    def setup_adapters(self, exp_state: dict, ref_lora: dict | None, *, exp_path="exp_adapter.bin",
                       ref_path="pytorch_lora_weights.safetensors") -> None:
        """Install the Expression Adapter (diffusers' IP-Adapter loader), the reference processors on attn1
        (after the IP-Adapter: its loader resets all processors) and the reference LoRA (adapter "reference")."""
        self.exp_projection = exp_adapter.load_expression_adapter(self, exp_state, exp_path)
        self.reference_state = ref_adapter.install_reference_processors(self.unet)
        if ref_lora is not None:
            self._load_lora(ref_lora, REF_ADAPTER, ref_path)

    def _load_lora(self, state: dict, name: str, path) -> None:
        from diffusers.utils import logging as dlogging

        from retarget.weights import WeightsError

        previous = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # silence "no LoRA keys for CLIPTextModel": the release has none
        try:
            with warnings.catch_warnings():
                # peft warns when a second adapter joins the first; two named adapters is the design here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.load_lora_weights(dict(state), adapter_name=name)
        except Exception as e:
            msg = " ".join(str(e).split())[:200]
            raise WeightsError(f"{path} does not fit the Arc2Face UNet: {e.__class__.__name__}: {msg}") from None
        finally:
            dlogging.set_verbosity(previous)
        self._adapters.add(name)
        self._set_loras({})

    def load_lcm_lora(self, state: dict | None = None, path=None) -> None:
        """Load the LCM-LoRA (adapter "lcm"): `state`, else the layout's lcm_lora file."""
        if LCM_ADAPTER in self._adapters:
            return
        if state is None:
            if self.layout is None:
                raise RetargetError("scheduler 'lcm' needs the LCM-LoRA: pass its state dict to load_lcm_lora()")
            path = self.layout.require("lcm_lora")
            state = components.load_lora_state(path, "LCM-LoRA")
        self._load_lora(state, LCM_ADAPTER, path or "lcm_lora")

    def _set_loras(self, weights: dict[str, float]) -> None:
        """Activate exactly the adapters in `weights` (name -> scale) on peft's unfused LoRA layers;
        none -> LoRA layers bypassed. Undoes any fusion first."""
        fusion.unfuse(self.unet)
        active = {k: v for k, v in weights.items() if v != 0}
        if not self._adapters:
            return
        if not active:
            self.unet.disable_lora()
            return
        self.unet.enable_lora()
        self.unet.set_adapters(list(active), list(active.values()))

    def _use_loras(self, weights: dict[str, float]) -> None:
        """`_set_loras` for a denoising loop: with `fuse_loras`, the active adapters are folded into the
        weights (fusion.fuse), once per set of scales: a later call with the same scales reuses the
        fusion, other scales restore the original weights and fold again."""
        active = {k: float(v) for k, v in weights.items() if v != 0}
        key = tuple(sorted(active.items()))
        if self.fuse_loras and self._adapters and fusion.fused_key(self.unet) == key:
            return
        self._set_loras(weights)
        if self.fuse_loras and fusion.fusable(self.unet, list(active)):
            fusion.fuse(self.unet, list(active), key)

    def unfuse_loras(self) -> None:
        """Put the UNet back in its loaded state (base weights, peft LoRA layers). Calls do it themselves
        when needed; use it before saving or editing the UNet's weights yourself."""
        fusion.unfuse(self.unet)

    def to(self, *args, **kwargs):
        # Moving while fused would leave the wrappers' LoRA tensors (out of the module tree) behind.
        fusion.unfuse(self.unet)
        self._kernel_state.reset()  # graphs, FP8 copies, the fp32 VAE belong to the old placement
        return super().to(*args, **kwargs)

    def compile_unet(self, mode: str | None = "reduce-overhead", options: dict | None = None, **kwargs) -> None:
        """Opt-in: run the denoising loop through `torch.compile(unet, mode=mode, **kwargs)` (the writer
        stays eager). Each new batch size, scheduler or scale setting compiles again (seconds to minutes);
        mode None goes back to eager. options: inductor settings on top of `mode`'s (torch.compile takes
        a mode or options, not both, so the mode's own settings are spelled out with them)."""
        if mode is None:
            self._compiled_unet = None
        elif options:
            from torch._inductor import list_mode_options

            self._compiled_unet = torch.compile(self.unet, options={**list_mode_options(mode), **options}, **kwargs)
        else:
            self._compiled_unet = torch.compile(self.unet, mode=mode, **kwargs)

    def compile_decoder(self, mode: str | None = "default", rows: int = DECODE_BATCH, **kwargs) -> None:
        """Opt-in: VAE-decode through `torch.compile(vae.decode, mode=mode, **kwargs)` in chunks of `rows`
        frames: `decode` pads a shorter chunk with copies of its last latent (rows never mix: per-row
        group norm and attention), so one compiled shape serves every call; mode None goes back to eager.
        Not used with `kernels.vae_upcast` (that decodes a float32 copy of the VAE)."""
        self._compiled_decode = None if mode is None else torch.compile(self.vae.decode, mode=mode, **kwargs)
        self._compiled_decode_rows = max(1, int(rows))

    # ------------------------------------------------------------------ actor
    @property
    def image_size(self) -> int:
        """Output image size in pixels (512 for SD 1.5, 64 for the tiny weights)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def _face_backend(self):
        if self.face_backend is None:
            from tracking.faces import make_face_backend

            antelope = self.layout.optional("antelopev2") if self.layout is not None else None
            self.face_backend = make_face_backend("auto", antelopev2_dir=antelope)
        return self.face_backend

    @torch.no_grad()
    def prepare_actor(self, image_rgb: np.ndarray, *, generator: torch.Generator | None = None,
                      seed: int | None = None, ref_latent: str = "sample", reference: bool = True) -> Actor:
        """Once per video: find the actor's face (largest wins), FFHQ-align it, embed its identity, encode
        the reference latent and run the writer.

        image_rgb: (H, W, 3) uint8 RGB. generator / seed: draws the reference latent sample (default seed 0),
        kept apart from the frames' noise generator. ref_latent: "sample" (the release) or "mode".
        reference=False skips the reference (no crop/latent/bank) and embeds the face in the original image.
        Raises RetargetError when no face is found.
        """
        from tracking.align import arcface_crop, reference_and_identity

        image = np.asarray(image_rgb)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise RetargetError(f"actor image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        faces = self._face_backend().detect(image)
        if not faces:
            raise RetargetError("no face found in the actor image; use a photo with one clearly visible face")
        area = [float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])) for f in faces]
        face = faces[int(np.argmax(area))]
        box = ", ".join(f"{v:.0f}" for v in face.bbox)
        report = (f"1 face found (bbox {box})" if len(faces) == 1
                  else f"{len(faces)} faces found; using the largest (bbox {box})")
        if not reference:
            crop112, _ = arcface_crop(image, face.kps5)
            actor = self.make_actor(self.arcface(crop112)[0], None)
            actor.face_report = report
            return actor
        if face.lmk68 is None:
            raise RetargetError("the face backend gave no 68 landmarks, which FFHQ alignment of the reference needs")
        # Once per video: the FFHQ script's own alignment (ffhq_crop's fast warp is for per-frame work),
        # and, as the release does, the identity from the face found again on the aligned image.
        crop, M, crop112, found = reference_and_identity(image, face, self._face_backend(), size=512)
        if not found:
            report += "; no face found again on the aligned reference, identity keypoints carried from the photo"
        actor = self.make_actor(self.arcface(crop112)[0], crop, generator=generator, seed=seed, ref_latent=ref_latent)
        actor.M, actor.face_report = M, report
        return actor

    @torch.no_grad()
    def make_actor(self, arcface: np.ndarray, reference_rgb: np.ndarray | None, *,
                   generator: torch.Generator | None = None, seed: int | None = None,
                   ref_latent: str = "sample") -> Actor:
        """Actor from an ArcFace vector (512,) and, optionally, an aligned reference image (S, S, 3) uint8
        (resized to the model resolution). Encodes the prompt embeddings, the reference latent and the bank."""
        id_embeds = self.identity.encode(arcface).to(self.unet.dtype)
        uncond = self.identity.encode_empty().to(self.unet.dtype)
        vec = np.asarray(arcface, dtype=np.float32).reshape(-1)
        actor = Actor(id_embeds=id_embeds, uncond_embeds=uncond, arcface=vec / np.linalg.norm(vec))
        if reference_rgb is None:
            return actor
        actor.crop = np.asarray(reference_rgb)
        actor.ref_latent = self.encode_reference(actor.crop, generator=_generator(generator, seed), mode=ref_latent)
        actor.bank = self.write_bank(actor.ref_latent, id_embeds)
        return actor

    @torch.no_grad()
    def encode_reference(self, image_rgb: np.ndarray, *, generator: torch.Generator | None = None,
                         mode: str = "sample") -> torch.Tensor:
        """VAE latent (1, 4, h, w) of a reference image (S, S, 3) uint8, times the scaling factor.
        mode "sample": a draw of the latent distribution from `generator`; "mode": its mode."""
        import cv2

        if mode not in REF_LATENT_MODES:
            raise RetargetError(f"ref_latent must be one of {REF_LATENT_MODES}, got {mode!r}")
        img = np.asarray(image_rgb)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise RetargetError(f"reference image must be (S, S, 3) uint8 RGB, got {img.shape} {img.dtype}")
        size = self.image_size
        if img.shape[:2] != (size, size):
            interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
            img = cv2.resize(img, (size, size), interpolation=interp)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].to(self.device, self.vae.dtype) / 127.5 - 1.0
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if mode == "sample" else dist.mode()
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def write_bank(self, ref_latent: torch.Tensor, id_embeds: torch.Tensor) -> ref_adapter.ReferenceBank:
        """The writer pass (SPEC.md §4): once per video; the bank serves every frame and step."""
        return ref_adapter.write_bank(self.unet, self.reference_state, ref_latent, id_embeds)

    @torch.no_grad()
    def frame_references(self, actor: Actor, crops: np.ndarray, *, seed: int | None = None,
                         ref_latent: str = "sample") -> Actor:
        """A copy of `actor` whose reference is per frame: crops (B, S, S, 3) uint8 FFHQ-aligned frames of an
        actor video. The VAE encodes them in one batch; with "sample", every row draws the same noise
        (a fresh generator seeded with `seed`, as prepare_actor draws it), so equal crops give the latent of the
        photo path. The writer then runs once for the batch: bank rows are frames, read by the matching rows
        of `__call__` (which then needs B expressions). The bank lives as long as the returned Actor."""
        import dataclasses

        import cv2

        if ref_latent not in REF_LATENT_MODES:
            raise RetargetError(f"ref_latent must be one of {REF_LATENT_MODES}, got {ref_latent!r}")
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[3] != 3 or crops.dtype != np.uint8:
            raise RetargetError(f"reference frames must be (B, S, S, 3) uint8 RGB, got {crops.shape} {crops.dtype}")
        size = self.image_size
        if crops.shape[1:3] != (size, size):
            interp = cv2.INTER_AREA if crops.shape[1] > size else cv2.INTER_CUBIC
            crops = np.stack([cv2.resize(c, (size, size), interpolation=interp) for c in crops])
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).to(self.device, self.vae.dtype) / 127.5 - 1.0
        dist = self.vae.encode(x).latent_dist
        if ref_latent == "sample":
            g = _generator(None, seed)
            eps = randn_tensor((1,) + tuple(dist.mean.shape[1:]), generator=g, device=dist.parameters.device,
                               dtype=dist.parameters.dtype)
            z = dist.mean + dist.std * eps
        else:
            z = dist.mode()
        z = z * self.vae.config.scaling_factor
        bank = self.write_bank(z, actor.id_embeds.expand(z.shape[0], -1, -1))
        return dataclasses.replace(actor, ref_latent=z, bank=bank, crop=None, M=None)

    # ------------------------------------------------------------------ frames
    def _initial_noise(self, b: int, generator, seed: int | None, per_frame: bool, frame_indices):
        """(B, 4, h, w) initial latents and the generator(s) for schedulers that inject noise per step."""
        shape = (1, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        dtype = self.unet.dtype
        if per_frame and generator is None:
            # Frame i's noise depends on (seed, i) only: any batching or a resumed run draws the same.
            idx = range(b) if frame_indices is None else [int(i) for i in frame_indices]
            if len(idx) != b:
                raise RetargetError(f"got {len(idx)} frame indices for {b} frames")
            base = 0 if seed is None else int(seed)
            generator = [torch.Generator("cpu").manual_seed((base * 1_000_003 + i) % 2**63) for i in idx]
        if isinstance(generator, list):
            if len(generator) != b:
                raise RetargetError(f"got {len(generator)} generators for {b} frames")
            return randn_tensor((b,) + shape[1:], generator=generator, device=self.device, dtype=dtype), generator
        generator = _generator(generator, seed)
        if per_frame:
            return randn_tensor((b,) + shape[1:], generator=generator, device=self.device, dtype=dtype), generator
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype).expand(b, -1, -1, -1)
        # Schedulers that inject noise per step (LCM) draw one row per generator: identical copies keep
        # every frame's noise identical, and frame i of a batch equal to a single-frame call.
        return latents.contiguous(), [_clone_generator(generator) for _ in range(b)]

    @torch.no_grad()
    def __call__(self, actor: Actor, expressions, *, generator: torch.Generator | list | None = None,
                 seed: int | None = None, steps: int | None = None, guidance: float | None = None,
                 exp_scale: float = 1.0, ref_strength: float = 0.8, scheduler: str = "dpm++",
                 per_frame_noise: bool = False, frame_indices=None, output_type: str = "uint8",
                 decode_batch: int = DECODE_BATCH, uncond_expressions: torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
        """Render B frames of `actor` with the expressions of `expressions`.

        expressions: (B, 55) FLAME expression ++ eyelids ++ jaw. generator (or seed, default 0) draws the
        initial noise: by default one draw shared by all frames (temporal consistency). per_frame_noise:
        each frame its own noise; with a seed, frame i's noise depends only on (seed, frame_indices[i])
        (default indices 0..B-1), so batching never changes a frame; a list of B generators also gives
        each frame its own. steps / guidance: default 25 / 3.0
        for "dpm++", 4 / 1.0 for "lcm" (guidance <= 1 disables CFG). exp_scale: Expression Adapter scale.
        ref_strength: reference LoRA scale; 0 turns the Reference Adapter off (no LoRA, no bank reads).
        output_type: "uint8" -> (B, H, W, 3) uint8 RGB; "float" -> float32 in [0, 1]; "latent" -> torch
        (B, 4, h, w). uncond_expressions: (B, 55) for the unconditional half instead of zeros (tests).
        """
        if scheduler not in DEFAULTS:
            raise RetargetError(f"scheduler must be one of {', '.join(DEFAULTS)}, got {scheduler!r}")
        if output_type not in ("uint8", "float", "latent"):
            raise RetargetError(f"output_type must be 'uint8', 'float' or 'latent', got {output_type!r}")
        steps = DEFAULTS[scheduler]["steps"] if steps is None else int(steps)
        guidance = DEFAULTS[scheduler]["guidance"] if guidance is None else float(guidance)
        for name, value in (("exp_scale", exp_scale), ("ref_strength", ref_strength), ("guidance", guidance)):
            if not np.isfinite(value) or value < 0:
                raise RetargetError(f"{name} must be a finite number >= 0, got {value}")
        if steps < 1:
            raise RetargetError(f"steps must be >= 1, got {steps}")
        expr = exp_adapter.check_expressions(expressions)
        b = expr.shape[0]
        use_ref = ref_strength > 0
        if use_ref and actor.bank is None:
            raise RetargetError("ref_strength > 0 needs an actor prepared with its reference image "
                                "(prepare_actor(..., reference=True)); or pass ref_strength=0")
        if use_ref:
            rows = next(iter(actor.bank.states.values())).shape[0]
            if rows not in (1, b):
                raise RetargetError(f"the actor's reference bank holds {rows} frames, the call renders {b}: "
                                    "per-frame references need one expression per frame")
        cfg = guidance > 1.0
        device, dtype = self.device, self.unet.dtype

        loras = {REF_ADAPTER: float(ref_strength) if use_ref else 0.0}
        if scheduler == "lcm":
            self.load_lcm_lora()
            loras[LCM_ADAPTER] = 1.0
        self._use_loras(loras)
        self.set_ip_adapter_scale(float(exp_scale))

        cond = actor.id_embeds.to(device, dtype).expand(b, -1, -1)
        prompt = torch.cat([actor.uncond_embeds.to(device, dtype).expand(b, -1, -1), cond]) if cfg else cond
        if uncond_expressions is not None:
            uncond_expressions = exp_adapter.check_expressions(uncond_expressions)
        image_embeds = exp_adapter.expression_embeds(expr, cfg=cfg, device=device, dtype=dtype,
                                                     uncond=uncond_expressions)
        added = {"image_embeds": image_embeds}

        sched = components.make_scheduler(self.scheduler.config, scheduler)
        sched.set_timesteps(steps, device=device)
        latents, step_generator = self._initial_noise(b, generator, seed, per_frame_noise, frame_indices)
        latents = latents * sched.init_noise_sigma

        bank = actor.bank.to(device, dtype) if use_ref else None
        unet = self.unet if self._compiled_unet is None else self._compiled_unet
        with ref_adapter.reading(self.reference_state, bank, read_from=b if cfg else 0, unet=self.unet), \
                kernels.denoising(self, unet) as unet:
            for t in self.progress_bar(sched.timesteps):
                x = torch.cat([latents] * 2) if cfg else latents
                x = sched.scale_model_input(x, t)
                eps = unet(x, t, encoder_hidden_states=prompt, added_cond_kwargs=added, return_dict=False)[0]
                if cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                latents = sched.step(eps, t, latents, generator=step_generator, return_dict=False)[0]

        if output_type == "latent":
            return latents
        return self.decode(latents, batch=decode_batch, uint8=output_type == "uint8")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = DECODE_BATCH, *, uint8: bool = False) -> np.ndarray:
        """VAE-decode (B, 4, h, w) latents in chunks of `batch` frames -> (B, H, W, 3) float32 in [0, 1],
        or with `uint8` the (B, H, W, 3) uint8 images round(255 x) of those floats, computed where
        the latents are (a quarter of the bytes to copy back and no per-pixel work on the host;
        the same fp32 multiply and round-half-to-even as numpy, so the same bits). The chunks stay
        where they were decoded until one copy back at the end: a copy per chunk would make the GPU
        wait for the host between chunks."""
        out = []
        with kernels.decoding(self, batch) as (vae, batch):
            compiled = self._compiled_decode if vae is self.vae else None
            if compiled is not None:
                batch = self._compiled_decode_rows
            for i in range(0, latents.shape[0], batch):
                z = latents[i:i + batch].to(vae.dtype) / vae.config.scaling_factor
                rows = z.shape[0]
                if compiled is not None and rows < batch:  # the compiled shape: pad, then drop the copies
                    z = torch.cat([z, z[-1:].expand(batch - rows, *z.shape[1:])])
                img = (compiled or vae.decode)(z, return_dict=False)[0][:rows]
                img = (img / 2 + 0.5).clamp(0, 1).float()
                if uint8:
                    img = (img * 255).round().to(torch.uint8)
                out.append(img.permute(0, 2, 3, 1))
        return torch.cat(out).contiguous().cpu().numpy()


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere (SPEC.md §2: fp16 on GPU)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32

