"""The release weight layout (SPEC.md §1): one place that knows every file, where it comes
from, its licence, what needs it, and how to tell a good copy from a broken one.

Everything else asks this module for paths (`WeightsLayout.require`) and gets one clear
`WeightsError` naming the file, its source and licence when it is missing or broken.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from render.errors import RetargetError

ENV_VAR = "RETARGET_WEIGHTS"
DEFAULT_DIR = Path("~/.cache/retarget/weights")

ARC2FACE_REPO = "FoivosPar/Arc2Face"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LCM_REPO = "latent-consistency/lcm-lora-sdv1-5"

LICENCE_ARC2FACE = "MIT (Arc2Face)"
LICENCE_SD15 = "CreativeML OpenRAIL-M"
LICENCE_INSIGHTFACE = "non-commercial research only (insightface model zoo)"
LICENCE_SMIRK = "MIT (SMIRK); built on FLAME, non-commercial research"
LICENCE_MEDIAPIPE = "Apache-2.0 (MediaPipe)"
LICENCE_FLAME = "FLAME licence: non-commercial research, registration required"

# What a file is needed for. `retarget weights check` exits 0 only when every RUN file is good.
RUN = "run"
FAST = "--fast"
OPTIONAL_FACES = "better faces"
PREVIEW = "mesh preview"


class WeightsError(RetargetError):
    """A weight file is missing, truncated or of the wrong shape; the message says which and where to get it."""


@dataclass(frozen=True)
class WeightFile:
    """One entry of the release layout.

    name: attribute name on `WeightsLayout`; path: relative to the weights root; files: for a
    folder, the files that must be inside (alternatives separated by "|", first is preferred);
    needed_for: RUN, FAST, OPTIONAL_FACES or PREVIEW; hf: (repo, path in repo) when the file is
    downloadable from Hugging Face, None when gated (then `how` says how to get it).
    """

    name: str
    path: str
    what: str
    source: str
    licence: str
    needed_for: str
    files: tuple[str, ...] = ()
    hf: tuple[str, str] | None = None
    how: str = ""

    @property
    def is_dir(self) -> bool:
        return bool(self.files)


RELEASE: tuple[WeightFile, ...] = (
    WeightFile("arc2face_unet", "arc2face", "Arc2Face UNet (SD 1.5 architecture)", ARC2FACE_REPO,
               LICENCE_ARC2FACE, RUN,
               files=("config.json", "diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin"),
               hf=(ARC2FACE_REPO, "arc2face")),
    WeightFile("encoder", "encoder", "fine-tuned CLIP ViT-L/14 text encoder", ARC2FACE_REPO,
               LICENCE_ARC2FACE, RUN, files=("config.json", "pytorch_model.bin|model.safetensors"),
               hf=(ARC2FACE_REPO, "encoder")),
    WeightFile("arcface_onnx", "arcface.onnx", "ArcFace recognition network (512-d)", ARC2FACE_REPO,
               LICENCE_ARC2FACE, RUN, hf=(ARC2FACE_REPO, "arcface.onnx")),
    WeightFile("exp_adapter", "exp_adapter/exp_adapter.bin", "Expression Adapter (IP-Adapter format)",
               ARC2FACE_REPO, LICENCE_ARC2FACE, RUN, hf=(ARC2FACE_REPO, "exp_adapter/exp_adapter.bin")),
    WeightFile("ref_adapter_lora", "ref_adapter/pytorch_lora_weights.safetensors",
               "Reference Adapter LoRA (diffusers format)", ARC2FACE_REPO, LICENCE_ARC2FACE, RUN,
               hf=(ARC2FACE_REPO, "ref_adapter/pytorch_lora_weights.safetensors")),
    WeightFile("vae", "vae", "SD 1.5 VAE", SD15_REPO, LICENCE_SD15, RUN,
               files=("config.json", "diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin"),
               hf=(SD15_REPO, "vae")),
    WeightFile("scheduler", "scheduler", "SD 1.5 scheduler config", SD15_REPO, LICENCE_SD15, RUN,
               files=("scheduler_config.json",), hf=(SD15_REPO, "scheduler")),
    WeightFile("tokenizer", "tokenizer", "CLIP tokenizer", SD15_REPO, LICENCE_SD15, RUN,
               files=("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"),
               hf=(SD15_REPO, "tokenizer")),
    WeightFile("smirk_ckpt", "smirk/SMIRK_em1.pt", "SMIRK checkpoint (expression encoder)",
               "SMIRK authors (github.com/georgeretsi/smirk)", LICENCE_SMIRK, RUN,
               how="download SMIRK_em1.pt as the SMIRK README says (Google Drive link) and put it at smirk/SMIRK_em1.pt"),
    WeightFile("lcm_lora", "lcm_lora/pytorch_lora_weights.safetensors", "LCM-LoRA for SD 1.5 (fast mode)",
               LCM_REPO, "OpenRAIL++", FAST, hf=(LCM_REPO, "pytorch_lora_weights.safetensors")),
    WeightFile("antelopev2", "antelopev2", "insightface antelopev2 detector + landmarks",
               "insightface model zoo", LICENCE_INSIGHTFACE, OPTIONAL_FACES,
               files=("scrfd_10g_bnkps.onnx", "1k3d68.onnx"),
               how="download antelopev2.zip from the insightface model zoo (github.com/deepinsight/insightface, "
                   "python-package README) and unzip it to antelopev2/; without it the offline dlib detector is used"),
    WeightFile("face_landmarker", "smirk/face_landmarker.task", "MediaPipe Face Landmarker (478 points)",
               "MediaPipe model storage", LICENCE_MEDIAPIPE, OPTIONAL_FACES,
               how="download face_landmarker.task (float16) from the MediaPipe Face Landmarker guide "
                   "(ai.google.dev/edge/mediapipe/solutions/vision/face_landmarker) to smirk/; "
                   "without it the offline dlib landmarks crop faces for SMIRK"),
    WeightFile("flame_model", "flame/generic_model.pkl", "FLAME 2020 model (mesh previews only)",
               "flame.is.tue.mpg.de", LICENCE_FLAME, PREVIEW,
               how="register at flame.is.tue.mpg.de, download FLAME 2020 and copy generic_model.pkl to flame/"),
)

BY_NAME: dict[str, WeightFile] = {w.name: w for w in RELEASE}


def resolve_weights_dir(arg: str | os.PathLike | None = None) -> Path:
    """The weights folder: `arg` (from --weights), else $RETARGET_WEIGHTS, else ~/.cache/retarget/weights."""
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DIR.expanduser()


def _where(entry: WeightFile) -> str:
    if entry.hf:
        return f"`retarget weights download` (Hugging Face {entry.hf[0]})"
    return entry.how or entry.source


SD15_ENV_VAR = "RETARGET_SD15"
# Hugging Face cache folders that hold SD 1.5 (the release's code loads it by repo id, so users of
# the release have it there); the second is the repo's former name.
HF_CACHE_REPOS = ("models--stable-diffusion-v1-5--stable-diffusion-v1-5", "models--runwayml--stable-diffusion-v1-5")
SD15_PARTS = ("vae", "scheduler", "tokenizer")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def hf_sd15_snapshots() -> list[Path]:
    """Snapshot folders of SD 1.5 in the local Hugging Face cache, the one refs/main names first."""
    found = []
    for repo in HF_CACHE_REPOS:
        base = hf_hub_cache() / repo
        snaps = base / "snapshots"
        if not snaps.is_dir():
            continue
        main = base / "refs" / "main"
        head = main.read_text().strip() if main.is_file() else ""
        others = sorted((p for p in snaps.iterdir() if p.is_dir() and p.name != head),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        found += ([snaps / head] if head and (snaps / head).is_dir() else []) + others
    return found


class WeightsLayout:
    """Paths of the release files: under one root folder, or where the release itself keeps them.

    Attribute access (`layout.exp_adapter`) gives the path where the file was found, or its
    place in the layout when it is nowhere; `require(name)` also checks that it is there and
    raises `WeightsError` otherwise; `origin(name)` says where it was found. Besides
    `root/<release path>`: `arcface.onnx` may sit in `root/antelopev2/` (as the release's
    README puts it); the SD 1.5 parts (vae/, scheduler/, tokenizer/) may come from `sd15`
    (`--sd15 DIR`, else $RETARGET_SD15: a diffusers SD 1.5 folder) or from the local Hugging
    Face cache. A root holding a `models/` folder (the release repository) uses that folder.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, sd15: str | os.PathLike | None = None):
        root = resolve_weights_dir(root)
        if not (root / "arc2face").exists() and (root / "models" / "arc2face").is_dir():
            root = root / "models"
        self.root = root
        sd15 = sd15 or os.environ.get(SD15_ENV_VAR)
        self.sd15 = Path(sd15).expanduser() if sd15 else None

    def candidates(self, name: str) -> list[tuple[Path, str]]:
        """(path, where) in the order they are tried for entry `name`."""
        entry = BY_NAME[name]
        out = [(self.root / entry.path, "weights folder")]
        if name == "arcface_onnx":
            out.append((self.root / "antelopev2" / "arcface.onnx", "weights folder, antelopev2/"))
        if name in SD15_PARTS:
            if self.sd15 is not None:
                out.append((self.sd15 / entry.path, "--sd15"))
            out += [(snap / entry.path, "Hugging Face cache") for snap in hf_sd15_snapshots()]
        return out

    def _complete(self, name: str, path: Path) -> bool:
        entry = BY_NAME[name]
        if not entry.is_dir:
            return path.is_file()
        return all(any((path / opt).is_file() for opt in m.split("|")) for m in entry.files)

    def locate(self, name: str) -> tuple[Path, str | None]:
        """(path, where it was found) for entry `name`; (its place under root, None) when absent."""
        cands = self.candidates(name)
        for path, where in cands:
            if self._complete(name, path):
                return path, where
        return cands[0][0], None

    def origin(self, name: str) -> str | None:
        """Where entry `name` was found ("weights folder", "--sd15", "Hugging Face cache", ...), or None."""
        return self.locate(name)[1]

    def __getattr__(self, name: str) -> Path:
        if name not in BY_NAME:
            raise AttributeError(name)
        return self.locate(name)[0]

    def file(self, name: str, member: str) -> Path:
        """Path of `member` inside folder entry `name`, picking the first alternative that exists."""
        base = self.locate(name)[0]
        options = member.split("|")
        for opt in options:
            p = base / opt
            if p.exists():
                return p
        return base / options[0]

    def exists(self, name: str) -> bool:
        return self.locate(name)[1] is not None

    def require(self, name: str) -> Path:
        """The path of entry `name`; `WeightsError` naming file, source and licence when absent."""
        entry = BY_NAME[name]
        path, where = self.locate(name)
        if where is not None:
            return path
        missing = path
        if entry.is_dir:
            missing = next((self.file(name, m) for m in entry.files if not self.file(name, m).is_file()), path)
        raise missing_error(entry, missing, self.looked_in(name))

    def looked_in(self, name: str) -> list[str]:
        """The other places tried for entry `name`, for messages about a missing file."""
        looked = [str(p) for p, _ in self.candidates(name)[1:]]
        if name in SD15_PARTS and not self.sd15 and not hf_sd15_snapshots():
            looked.append(f"no --sd15 DIR given and no SD 1.5 in the Hugging Face cache {hf_hub_cache()}")
        return looked

    def optional(self, name: str) -> Path | None:
        """The path of entry `name` if present, else None (for backends with an offline fallback)."""
        return self.require(name) if self.exists(name) else None


def layout_from_args(args) -> WeightsLayout:
    """The layout a parsed command line names (`--weights DIR`, `--sd15 DIR`)."""
    return WeightsLayout(getattr(args, "weights", None), sd15=getattr(args, "sd15", None))


def missing_error(entry: WeightFile, path: Path, looked: list[str] = ()) -> WeightsError:
    also = f" (also looked in: {'; '.join(looked)})" if looked else ""
    return WeightsError(
        f"missing {path} ({entry.what}){also}; to get it: {_where(entry)}; licence: {entry.licence}"
    )


def broken_error(path: Path, why: str, entry: WeightFile | None = None) -> WeightsError:
    extra = f"; to get a good copy: {_where(entry)}" if entry else ""
    return WeightsError(f"{path} is not usable: {why}{extra}")


# --------------------------------------------------------------------------- validation
# Cheap structural checks: they read headers and shapes, never build a model, so that
# `weights check` on the full 5 GB release takes seconds and names the broken file.

def _check_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise broken_error(path, f"not valid JSON ({e.__class__.__name__})") from None


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a .safetensors header; raises WeightsError if the file is truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise broken_error(path, f"not a safetensors file ({e})") from None
    end = 0
    shapes = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shapes[key] = tuple(info["shape"])
        end = max(end, info["data_offsets"][1])
    if 8 + n + end != size:
        raise broken_error(path, f"truncated or padded: header promises {8 + n + end} bytes, file has {size}")
    return shapes


def torch_state_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a torch.save() state dict (.bin/.pt), nested dicts flattened with '.'.

    Checks the zip container first so that a truncated file is named rather than crashing torch.
    """
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            raise ValueError(f"corrupt member {bad}")
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        raise broken_error(path, f"not a complete torch checkpoint ({e})") from None
    import torch

    try:
        obj = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise broken_error(path, f"torch.load failed ({e.__class__.__name__}: {str(e)[:120]})") from None
    out: dict[str, tuple[int, ...]] = {}

    def walk(prefix: str, d):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif hasattr(v, "shape"):
                out[key] = tuple(v.shape)

    if not isinstance(obj, dict):
        raise broken_error(path, f"expected a state dict, found {type(obj).__name__}")
    walk("", obj)
    return out


def _state_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return safetensors_shapes(path) if path.suffix == ".safetensors" else torch_state_shapes(path)


def _check_unet(layout: WeightsLayout) -> str:
    cfg = _check_json(layout.file("arc2face_unet", "config.json"))
    shapes = _state_shapes(layout.file("arc2face_unet", "diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin"))
    key = "conv_in.weight"
    if key not in shapes or shapes[key][1] != cfg.get("in_channels", 4):
        raise broken_error(layout.arc2face_unet, "weights do not match config.json (conv_in)")
    return f"cross-attention {cfg.get('cross_attention_dim')}, {sum(_numel(s) for s in shapes.values()) / 1e6:.1f} M params"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_encoder(layout: WeightsLayout) -> str:
    cfg = _check_json(layout.file("encoder", "config.json"))
    shapes = _state_shapes(layout.file("encoder", "pytorch_model.bin|model.safetensors"))
    emb = [s for k, s in shapes.items() if k.endswith("token_embedding.weight")]
    hidden = cfg.get("hidden_size")
    if not emb or emb[0][1] != hidden:
        raise broken_error(layout.encoder, "token embedding missing or not of config.json's hidden_size")
    if hidden is None or hidden < 512:
        raise broken_error(layout.encoder, f"hidden size {hidden} < 512: the ArcFace vector does not fit one token")
    return f"hidden {hidden}, vocab {emb[0][0]}"


def _check_vae(layout: WeightsLayout) -> str:
    cfg = _check_json(layout.file("vae", "config.json"))
    _state_shapes(layout.file("vae", "diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin"))
    return f"latent channels {cfg.get('latent_channels')}, scale {cfg.get('scaling_factor', 0.18215)}"


def _check_scheduler(layout: WeightsLayout) -> str:
    cfg = _check_json(layout.scheduler / "scheduler_config.json")
    if "num_train_timesteps" not in cfg:
        raise broken_error(layout.scheduler / "scheduler_config.json", "no num_train_timesteps")
    return cfg.get("_class_name", "?")


def _check_tokenizer(layout: WeightsLayout) -> str:
    vocab = _check_json(layout.tokenizer / "vocab.json")
    _check_json(layout.tokenizer / "tokenizer_config.json")
    for word in ("id</w>", "<|startoftext|>", "<|endoftext|>"):
        if word not in vocab:
            raise broken_error(layout.tokenizer / "vocab.json", f"token {word!r} missing")
    return f"vocab {len(vocab)}"


def _check_onnx(layout: WeightsLayout) -> str:
    import onnx

    path = layout.arcface_onnx
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise broken_error(path, f"not an ONNX model ({e.__class__.__name__})", BY_NAME["arcface_onnx"]) from None
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    out = [d.dim_value or d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim]
    if list(dims[1:]) != [3, 112, 112] or out[-1] != 512:
        raise broken_error(path, f"expected input Nx3x112x112 and a 512-d output, found {dims} -> {out}")
    return "input 3x112x112 -> 512"


def _check_exp_adapter(layout: WeightsLayout) -> str:
    path = layout.exp_adapter
    shapes = torch_state_shapes(path)
    proj = {k[len("image_proj."):]: s for k, s in shapes.items() if k.startswith("image_proj.")}
    ip = [k for k in shapes if k.startswith("ip_adapter.")]
    if not proj or not ip:
        raise broken_error(path, "expected top-level keys 'image_proj' and 'ip_adapter' (diffusers IP-Adapter format)")
    first = next((proj[k] for k in ("proj.weight", "proj.0.weight") if k in proj), None)
    if first is not None and first[-1] != 55:
        raise broken_error(path, f"the projection takes {first[-1]}-d inputs, the Expression Adapter takes 55")
    return f"{len(ip) // 2} cross-attention layers"


def _check_lora(path: Path, prefix_hint: str) -> str:
    shapes = safetensors_shapes(path)
    if not any("lora" in k for k in shapes):
        raise broken_error(path, "no LoRA tensors (keys containing 'lora')")
    return f"{len(shapes)} tensors"


def _check_smirk(layout: WeightsLayout) -> str:
    path = layout.smirk_ckpt
    shapes = _state_shapes(path)
    prefix = "smirk_encoder.expression_encoder."
    mine = {k: s for k, s in shapes.items() if k.startswith(prefix)}
    if not mine:
        raise broken_error(path, f"no keys start with {prefix!r}", BY_NAME["smirk_ckpt"])
    head = mine.get(prefix + "expression_layers.0.weight")
    if head is None or head[0] != 55:
        raise broken_error(path, f"expression head has shape {head}, expected (55, 960)")
    return f"{len(mine)} expression-encoder tensors"


def _check_antelope(layout: WeightsLayout) -> str:
    import onnx

    for m in BY_NAME["antelopev2"].files:
        p = layout.antelopev2 / m
        try:
            onnx.load(str(p), load_external_data=False)
        except Exception as e:
            raise broken_error(p, f"not an ONNX model ({e.__class__.__name__})") from None
    return "scrfd + 68 landmarks"


def _check_nonempty(layout: WeightsLayout, name: str) -> str:
    p = getattr(layout, name)
    if p.stat().st_size < 1024:
        raise broken_error(p, "file is too small to be a model")
    return ""


CHECKS: dict[str, Callable[[WeightsLayout], str]] = {
    "arc2face_unet": _check_unet,
    "encoder": _check_encoder,
    "arcface_onnx": _check_onnx,
    "exp_adapter": _check_exp_adapter,
    "ref_adapter_lora": lambda L: _check_lora(L.ref_adapter_lora, "unet"),
    "vae": _check_vae,
    "scheduler": _check_scheduler,
    "tokenizer": _check_tokenizer,
    "smirk_ckpt": _check_smirk,
    "lcm_lora": lambda L: _check_lora(L.lcm_lora, "lora_unet"),
    "antelopev2": _check_antelope,
    "face_landmarker": lambda L: _check_nonempty(L, "face_landmarker"),
    "flame_model": lambda L: _check_nonempty(L, "flame_model"),
}


@dataclass
class CheckRow:
    """One line of `retarget weights check`: status is "ok", "missing" or "bad"."""

    entry: WeightFile
    path: Path
    status: str
    size: int
    detail: str
    origin: str | None = None  # where it was found: "weights folder", "--sd15", "Hugging Face cache", ...


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def check_weights(layout: WeightsLayout) -> list[CheckRow]:
    """Check every release file under `layout.root`: presence, then a structural check."""
    rows = []
    for entry in RELEASE:
        path, origin = layout.locate(entry.name)
        if origin is None:
            missing = [m for m in entry.files if not layout.file(entry.name, m).is_file()]
            detail = "missing " + ", ".join(missing) if entry.is_dir and path.is_dir() else ""
            looked = layout.looked_in(entry.name)
            if looked:
                detail += ("; " if detail else "") + "also looked in: " + "; ".join(looked)
            rows.append(CheckRow(entry, path, "missing", _size(path), detail))
            continue
        try:
            detail = CHECKS[entry.name](layout)
            rows.append(CheckRow(entry, path, "ok", _size(path), detail, origin))
        except WeightsError as e:
            rows.append(CheckRow(entry, path, "bad", _size(path), str(e), origin))
    return rows


def ready_for_run(rows: list[CheckRow]) -> bool:
    """True when every file that `retarget run` needs is present and passes its check."""
    return all(r.status == "ok" for r in rows if r.entry.needed_for == RUN)


def format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_check_table(rows: list[CheckRow], root: Path) -> str:
    """The `weights check` table as text: one line per file, then what is missing and how to get it."""
    head = ("status", "file", "size", "needed for", "licence", "found in")

    def found(r: CheckRow) -> str:
        if r.origin is None:
            return "-"
        return r.origin if r.path == root / r.entry.path else f"{r.origin}: {r.path}"

    body = [(r.status, r.entry.path + ("/" if r.entry.is_dir else ""), format_size(r.size) if r.size else "-",
             r.entry.needed_for, r.entry.licence, found(r)) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [f"weights folder: {root}", "  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    notes = [r for r in rows if r.status != "ok"]
    if notes:
        lines.append("")
    for r in notes:
        if r.status == "bad":
            lines.append(f"BAD   {r.detail}")
        else:
            extra = f" ({r.detail})" if r.detail else ""
            lines.append(f"{'MISSING' if r.entry.needed_for == RUN else 'absent '} {r.entry.path}{extra}: "
                         f"{r.entry.what}; to get it: {_where(r.entry)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- download

def download_weights(layout: WeightsLayout, *, include_fast: bool = True, progress=print) -> list[str]:
    """Fetch the Hugging Face-hosted files into `layout.root`; return instructions for the gated ones.

    Needs network access to huggingface.co (and accepted licences where the hub asks for it).
    """
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover - a dependency
        raise WeightsError("huggingface_hub is not installed: pip install huggingface_hub") from None
    layout.root.mkdir(parents=True, exist_ok=True)
    for entry in RELEASE:
        if entry.hf is None or (entry.needed_for == FAST and not include_fast) or layout.exists(entry.name):
            continue
        repo, member = entry.hf
        progress(f"downloading {entry.path} from {repo}")
        try:
            if entry.is_dir:
                snapshot_download(repo, allow_patterns=[f"{member}/{m.split('|')[0]}" for m in entry.files],
                                  local_dir=layout.root)
            elif member == entry.path:
                hf_hub_download(repo, member, local_dir=layout.root)
            else:  # the LCM-LoRA sits at the top of its repo but in lcm_lora/ here
                got = hf_hub_download(repo, member, local_dir=layout.root / Path(entry.path).parent)
                Path(got).replace(layout.root / entry.path)
        except Exception as e:
            raise WeightsError(f"could not download {entry.path} from {repo}: {e.__class__.__name__}: {str(e)[:200]}") from None
    return [f"{e.path}: {e.how} (licence: {e.licence})" for e in RELEASE if e.hf is None and not layout.exists(e.name)]
