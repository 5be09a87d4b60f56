"""`retarget run`: driving video + actor photo -> finished video. The orchestration only:
read, track, retarget the parameters, render in resumable batches, paste back, write.

Model calls live in `retarget.pipeline`; tracking in `tracking`; video, paste-back and
previews in `render`. Rendered frames are kept as PNG files in a work folder beside the
output, so `--resume` after an interruption renders only what is missing and produces the
same video as an uninterrupted run with the same settings and seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np

from render.errors import RetargetError
from retarget.ahead import RenderAhead
from retarget.diskspace import check_free_space, estimate_run_bytes
from retarget.oom import FitSize, split_on_oom
from retarget.overlap import Background

MANIFEST = "manifest.json"
TRACK_CACHE = "drive.track.npz"  # the driving track, kept for --resume (it records the range it covers)
AHEAD = "ahead"  # frames rendered while tracking, until checked against the final params (retarget.ahead)
_FRAME_NAME = re.compile(r"\d{6}\.png")  # WorkFolder.frame_path's and RenderAhead's names
RENDER_AHEAD = True  # render the batches whose params are final while the clip is tracked (tests switch it)
# Write the frames rendered ahead into the video while the clip is tracked (retarget.overlap.EarlyWriter):
# a fast job's writer otherwise had every frame still to write when tracking ended (tests switch it).
EARLY_WRITE = True
# Paste back and encode in a process of the writer's own (retarget.sink_process): in this one, their
# GIL time slowed a compiled renderer's calls (tests and bench/run.py --writer switch it).
WRITER_PROCESS = True


@dataclass
class RunOptions:
    """Everything a user can set for `retarget run` (the CLI is generated from these fields)."""

    steps: int = field(default=25, metadata={"help": "denoising steps (LCM --fast: 4)", "min": 1})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance scale (LCM --fast: 1.0)", "min": 0})
    exp_scale: float = field(default=1.0, metadata={"help": "Expression Adapter scale: how strongly the expression is followed", "min": 0})
    ref_strength: float = field(default=0.8, metadata={"help": "Reference Adapter strength: 0 off, higher copies the photo more", "min": 0})
    seed: int = field(default=0, metadata={"help": "random seed; the same seed gives the same video", "min": 0, "max": 2**63 - 1})
    fast: bool = field(default=False, metadata={"help": "LCM-LoRA fast mode: 4 steps, guidance 1.0 (needs lcm_lora/)"})
    per_frame_noise: bool = field(default=False, metadata={"help": "draw new noise for every frame (default: one noise for all frames, steadier video)"})
    ref_latent: Literal["sample", "mode"] = field(default="sample", metadata={"help": "reference latent: a seeded sample (as the release) or the distribution's mode"})
    track: str | None = field(default=None, metadata={"help": "use this track file instead of tracking the driving video", "metavar": "NPZ"})
    smooth: Literal["zero_phase", "one_euro", "none"] = field(default="zero_phase", metadata={"help": "temporal smoothing of the tracked expressions"})
    start: float | None = field(default=None, metadata={"help": "first second of the driving video to use", "metavar": "SEC"})
    end: float | None = field(default=None, metadata={"help": "last second (exclusive) of the driving video to use", "metavar": "SEC"})
    fps: float | None = field(default=None, metadata={"help": "output frame rate (default: the driving video's)", "above": 0})
    relative: bool = field(default=False, metadata={"help": "transfer the driver's change from neutral onto the actor's own expression"})
    neutral_frame: int | None = field(default=None, metadata={"help": "driver frame index used as neutral with --relative (default: the least expressive of the range)", "metavar": "N", "min": 0})
    gain: str | None = field(default=None, metadata={"help": "per-part gains, e.g. jaw=1.2,eyelids=0.8,expression=1.0", "metavar": "SPEC"})
    paste_back: bool = field(default=True, metadata={"help": "paste the face back into the full actor photo", "negative": "--crop-only", "negative_help": "write the aligned 512x512 face crops instead"})
    preview: Literal["none", "side-by-side"] = field(default="none", metadata={"help": "also write OUT.preview.mp4: driving | output (| FLAME mesh)"})
    frames_dir: str | None = field(default=None, metadata={"help": "also keep every output frame as PNG in this folder", "metavar": "DIR"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its work folder"})
    work: str | None = field(default=None, metadata={"help": "work folder for frames (default: .OUT.work beside the output)", "metavar": "DIR"})
    batch: int = field(default=0, metadata={"help": "frames per batch (0: automatic from free GPU memory; halves on out-of-memory)", "min": 0})
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata={"help": "where to run the models"})
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = field(default="auto", metadata={"help": "model precision (auto: fp16 on GPU, fp32 on CPU)"})
    keep_work: bool = field(default=False, metadata={"help": "keep the work folder after a successful run"})
    compile: Literal["auto", "on", "off"] = field(default="auto", metadata={"help": "torch.compile the UNet and the VAE decoder (GPU; one compiled shape per job, the last batch padded): auto compiles each where the job's estimated saving exceeds its compile cost (retarget/compiling.py); an actor video renders eagerly"})

    def validate(self) -> None:
        """Rules across fields (per-field ones are in the metadata; `retarget.cliargs.check_options`)."""
        from retarget.motion import parse_gain

        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise RetargetError(f"--{name}: must be a finite number of seconds >= 0, got {value}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise RetargetError(f"--end {self.end:g} must be after --start {self.start:g}")
        parse_gain(self.gain)
        if self.device == "cpu" and self.dtype == "fp16":
            raise RetargetError("--dtype fp16 needs a GPU; use fp32 or bf16 on the CPU")
        if self.device == "cpu" and self.compile == "on":
            raise RetargetError("--compile on needs a GPU (on the CPU a compile costs more than it saves); "
                                "use --compile auto or off")


@dataclass
class RunSummary:
    """What a run produced, for the final summary line and for tests."""

    frames: int
    rendered: int
    seconds: float
    invalid_frames: int
    output: Path
    preview: Path | None = None
    frames_dir: Path | None = None
    face_report: str = ""
    params: np.ndarray | None = None  # (frames, 55) vectors that were rendered
    tracked: int | None = None  # driving frames tracked now (0: a track file or the cached track); None: no driving video
    replaced: bool = False  # `output` existed before (it was not an input: that is refused)
    compile: str = ""  # the --compile decision, one clause (retarget.compiling); "" on the CPU
    # Wall-clock seconds of each stage (they overlap): "open", "track", "load" (the pipeline, in a
    # thread during tracking; 0 with a prepare= hook), "prepare" (the actor; with a hook: all of it),
    # "render" (first batch asked to last frame rendered), "write_tail" (last frame rendered to the
    # output renamed), "total", and "gpu_busy" (seconds inside the render calls).
    stages: dict[str, float] = field(default_factory=dict)
    frames_per_s_render: float = 0.0  # frames rendered now / the render span

    def line(self) -> str:
        fps = self.rendered / self.seconds if self.seconds > 0 else 0.0
        compiled = f", {self.compile}" if self.compile else ""
        extra = " (replaced the existing file)" if self.replaced else ""
        extra += f", preview {self.preview}" if self.preview else ""
        extra += f", frames in {self.frames_dir}" if self.frames_dir else ""
        tracked = "" if self.tracked is None else f", {self.tracked} driving frames tracked"
        return (f"done: {self.frames} frames ({self.rendered} rendered now{tracked}) in {self.seconds:.1f}s "
                f"({fps:.2f} frames/s){compiled}, {self.invalid_frames} driving frames without a face; "
                f"wrote {self.output}{extra}")


# --------------------------------------------------------------------------- inputs

def read_image(path: str | os.PathLike, what: str = "image") -> np.ndarray:
    """An image file as HxWx3 uint8 RGB; RetargetError naming the file when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise RetargetError(f"{what} {p} does not exist")
    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            return np.asarray(im).copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise RetargetError(f"{what} {p} is not a readable image ({type(e).__name__})") from None


def check_writable(folder: Path, what: str) -> None:
    """RetargetError unless a file can be created in `folder` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:6]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RetargetError(f"{what} {folder} is not writable ({e.strerror or type(e).__name__})") from None


def file_fingerprint(path: Path) -> str:
    """A cheap content fingerprint: size plus SHA-256 of the first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- work folder

class WorkFolder:
    """Rendered frames `frames/000000.png` plus a manifest of the settings that made them.

    A resumed run must have the same manifest: otherwise frames from different settings would
    be mixed into one video.
    """

    def __init__(self, root: Path):
        self.root = root
        self.frames = root / "frames"

    OWN = (MANIFEST, "frames", TRACK_CACHE, AHEAD)  # what this class writes into its root

    def check_replaceable(self) -> None:
        """RetargetError when the root exists and holds anything this class did not write:
        starting over deletes the root, and `--work` may name a folder of the user's."""
        if self.root.is_file():
            raise RetargetError(f"--work {self.root} is a file, not a folder")
        if not self.root.is_dir():
            return
        foreign = sorted(p.name for p in self.root.iterdir()
                         if (p.name not in self.OWN or not self._own_entry(p)) and ".partial-" not in p.name)
        if foreign:
            raise RetargetError(f"--work {self.root} holds files that are not a retarget work folder's "
                                f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); starting over "
                                "would delete them: choose a new or empty folder")

    @staticmethod
    def _own_entry(p: Path) -> bool:
        """An entry with one of OWN's names is this class's only in the form it writes: a file for
        the manifest and the track, a folder of frame PNGs (000000.png, or their temporary names)
        for frames/ and ahead/, so that a user's own `frames` or `ahead` folder is never emptied."""
        if p.name in (MANIFEST, TRACK_CACHE):
            return p.is_file()
        if not p.is_dir() or p.is_symlink():
            return False
        return all(q.is_file() and (_FRAME_NAME.fullmatch(q.name) or ".partial-" in q.name) for q in p.iterdir())

    def start(self, manifest: dict, resume: bool) -> None:
        path = self.root / MANIFEST
        if resume and path.is_file():
            old = json.loads(path.read_text())
            if old != manifest:
                changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
                raise RetargetError(f"--resume: the work folder {self.root} was made with other settings "
                                    f"({', '.join(changed)}); run without --resume to start over")
        elif self.root.exists():
            # Start over, but keep the driving track (this run's, or one --resume checks before use)
            # and the frames rendered while tracking (retarget.ahead moves the good ones in next).
            for p in self.root.iterdir():
                if p.name in (TRACK_CACHE, AHEAD):
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        self.frames.mkdir(parents=True, exist_ok=True)
        from render.files import atomic_open

        with atomic_open(path, "w") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True))

    def frame_path(self, i: int) -> Path:
        return self.frames / f"{i:06d}.png"

    def has(self, i: int) -> bool:
        return self.frame_path(i).is_file()

    def save(self, i: int, rgb: np.ndarray) -> None:
        from render.storyboard import save_image

        save_image(self.frame_path(i), rgb)

    def save_frame(self, i: int, rgb: np.ndarray) -> None:
        """Frame i written atomically: a full disk leaves the frames before it intact."""
        from render.errors import DiskFullError

        try:
            self.save(i, rgb)
        except DiskFullError as e:
            raise DiskFullError(f"{e}; the frames rendered so far are kept in {self.root}: "
                                "run again with --resume to render only the missing ones") from None

    def load(self, i: int) -> np.ndarray:
        return read_image(self.frame_path(i), "rendered frame")


# --------------------------------------------------------------------------- helpers

def resolve_device(device: str, dtype: str):
    """('cuda'|'cpu', torch dtype) from the user's choices; fp16 on GPU and fp32 on CPU by default."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RetargetError("--device cuda: no CUDA GPU is visible to PyTorch")
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype == "auto":
        return device, (torch.float16 if device == "cuda" else torch.float32)
    if device == "cpu" and dtype == "fp16":
        raise RetargetError("--dtype fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return device, table[dtype]


def auto_batch(device: str, image_size: int) -> int:
    """Frames per batch from the GPU memory this process may still use (`gpu_memory_left`); 2 on the CPU.

    bench/pipeline.py (H100, fp16, SD 1.5 size, CFG + reference bank) peaked at 6.2 GB for 32
    frames at 512x512 including the models, and throughput stops growing past 16-32 frames; we
    budget 0.25 GB a frame above 4 GB for the models, capped at 32.
    """
    if device != "cuda":
        return 2
    per_frame = 0.25e9 * (image_size / 512) ** 2
    return int(max(1, min(32, (gpu_memory_left() - 4e9) // per_frame)))


def gpu_memory_left() -> int:
    """Bytes this process may still allocate on the current GPU: the card's free memory, or less
    under a per-process cap (`torch.cuda.set_per_process_memory_fraction`, which mem_get_info
    does not see): the cap minus the memory of the tensors allocated now (the allocator frees its
    cached blocks before it refuses)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # PyTorch >= 2.5
    fraction = get_fraction() if get_fraction is not None else 1.0
    if fraction < 1.0:
        free = min(free, int(fraction * total) - torch.cuda.memory_allocated())
    return int(max(0, free))


def _progress(total: int, desc: str, unit: str = "frame", initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, leave=True)


# --------------------------------------------------------------------------- the run

RENDER_WEIGHTS = ("arc2face_unet", "encoder", "arcface_onnx", "exp_adapter", "ref_adapter_lora",
                  "vae", "scheduler", "tokenizer")


# Loaded pipelines kept between jobs, by (weights folder, device, dtype); None: load per job.
_kept_pipelines: dict | None = None


def keep_models_loaded(enabled: bool = True) -> None:
    """For processes that render many jobs (the app): keep the last loaded pipeline and reuse
    it for the next job with the same weights, device and precision, instead of loading again.
    The LCM-LoRA loads on first use of fast mode, so one pipeline serves both modes."""
    global _kept_pipelines
    _kept_pipelines = {} if enabled else None


@dataclass
class Rendering:
    """A loaded pipeline and a prepared actor: what every command that renders needs."""

    pipe: object
    actor: object
    actor_rgb: np.ndarray
    device: str
    dtype: object
    call: dict  # keyword arguments for pipe(actor, params, ...)
    # Where frames are rendered: None renders with `pipe` in this process; else a function
    # (batches: lists of frame indices, params (T, 55)) -> iterator of (indices, (B, H, W, 3)
    # uint8 images), in any order, that renders elsewhere (retarget.scale: on Ray actors).
    render_batches: Callable[[list[list[int]], np.ndarray], Iterable[tuple[list[int], np.ndarray]]] | None = None
    batch_size: int = 0  # frames per batch the renderer chose for --batch 0 (0: auto_batch here)
    compiled: object = None  # retarget.compiling.CompiledBatches when the UNet (padded batches) and/or the decoder run compiled
    compile_note: str = ""  # the --compile decision for the summary line
    fit: FitSize = field(default_factory=FitSize)  # frames per call that fit after an out-of-memory

    def render(self, batches: list[list[int]], params: np.ndarray) -> Iterator[tuple[list[int], np.ndarray]]:
        """(indices, images) for each batch of frame indices of `params` (T, 55), as they are rendered."""
        if self.render_batches is not None:
            yield from self.render_batches(batches, params)
            return
        for idx in batches:
            images = _render_with_backoff(self.pipe, self.actor, params, idx, self.call, self.compiled, self.fit)
            if len(images) != len(idx):  # never label a frame with another's index
                raise RetargetError(f"internal: {len(images)} frames rendered for a batch of {len(idx)}")
            yield idx, np.stack(images)


def require_render_weights(layout, opts: RunOptions, *, tracker: bool = False) -> None:
    """RetargetError naming the file (where it comes from, its licence) unless `layout` holds what
    rendering with `opts` needs: RENDER_WEIGHTS, the LCM-LoRA for --fast, and with `tracker` the
    SMIRK checkpoint (a video or photo to track)."""
    for name in RENDER_WEIGHTS + (("smirk_ckpt",) if tracker else ()) + (("lcm_lora",) if opts.fast else ()):
        layout.require(name)


def load_pipeline(layout, opts: RunOptions, log=print, when: str = "", *, dry: bool = False):
    """The RetargetPipeline for these weights, device and precision: the kept one
    (`keep_models_loaded`) or loaded now (logged, with `when` added to the line). dry: only
    log whether it would load (None)."""
    from retarget.pipeline import RetargetPipeline

    require_render_weights(layout, opts)
    device, dtype = resolve_device(opts.device, opts.dtype)
    key = (str(layout.root.resolve()), device, str(dtype))
    pipe = _kept_pipelines.get(key) if _kept_pipelines is not None else None
    if pipe is None:
        log(f"loading models on {device} ({str(dtype).replace('torch.', '')}){when}")
        if dry:
            return None
        pipe = RetargetPipeline.from_weights(layout, device=device, dtype=dtype, lcm=opts.fast)
        if _kept_pipelines is not None:
            _kept_pipelines.clear()  # one set of models at a time: GPU memory is the limit
            _kept_pipelines[key] = pipe
    return pipe


def prepare_rendering(layout, actor_path: Path, opts: RunOptions, log, actor_rgb: np.ndarray | None = None,
                      pipe=None) -> Rendering:
    """Load the pipeline (unless `pipe`, a loaded RetargetPipeline, is given) and compute the
    actor's identity, reference latent and bank (once)."""
    import torch

    actor_rgb = read_image(actor_path, "actor photo") if actor_rgb is None else actor_rgb
    require_render_weights(layout, opts)
    device, dtype = resolve_device(opts.device, opts.dtype)
    if pipe is None:
        pipe = load_pipeline(layout, opts, log)
    actor = pipe.prepare_actor(actor_rgb, generator=torch.Generator("cpu").manual_seed(opts.seed),
                               ref_latent=opts.ref_latent)
    if actor.face_report:
        log(actor.face_report)
    return Rendering(pipe, actor, actor_rgb, device, dtype, render_call(opts))


def render_call(opts: RunOptions) -> dict:
    """The keyword arguments of `pipe(actor, params, ...)` for these options."""
    steps, guidance = opts.steps, opts.guidance
    if opts.fast and (steps, guidance) == (25, 3.0):  # untouched defaults: LCM's own
        steps, guidance = 4, 1.0
    return dict(steps=steps, guidance=guidance, exp_scale=opts.exp_scale, ref_strength=opts.ref_strength,
                scheduler="lcm" if opts.fast else "dpm++", seed=opts.seed, per_frame_noise=opts.per_frame_noise)


def run(drive: str | os.PathLike, actor_path: str | os.PathLike, out: str | os.PathLike,
        options: RunOptions | None = None, *, weights=None, log=print, prepare=None) -> RunSummary:
    """Render `out` (.mp4/.mov/.mkv): the actor of `actor_path` performing the face of `drive`.

    drive: a video file, folder of frames or image; actor_path: a photo with one face (the
    largest is used when there are several, and this is reported); weights: a WeightsLayout or
    folder (default: resolved as in the CLI); prepare: replaces `prepare_rendering` (same
    arguments; retarget.scale passes one whose Rendering renders on Ray actors). Raises RetargetError on bad input; never leaves a
    broken `out` (it is written under a temporary name and renamed at the end).
    """
    from render.video import open_video
    from retarget.motion import nearest_frames, parse_gain, retarget_params
    from retarget.weights import WeightsLayout

    from retarget.retake import is_video_actor, retake

    if is_video_actor(actor_path):  # an actor video: per-frame references (retarget/retake.py)
        return retake(drive, actor_path, out, options, weights=weights, log=log)
    from retarget.cliargs import check_options

    opts = options or RunOptions()
    check_options(opts)
    t0 = time.perf_counter()
    drive, actor_path, out = Path(drive), Path(actor_path), Path(out)
    layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)

    # 1. inputs first: a bad path must fail before minutes of model loading.
    check_output_name(out)
    work = WorkFolder(Path(opts.work) if opts.work else out.parent / f".{out.name}.work")
    check_outputs(out, opts, work, (drive, actor_path, opts.track))
    replaced = out.exists()
    if not drive.exists():
        raise RetargetError(f"driving video {drive} does not exist")
    reader = open_video(drive)
    actor_rgb = read_image(actor_path, "actor photo")
    check_writable(out.parent, "output folder")
    gain = parse_gain(opts.gain)
    require_render_weights(layout, opts, tracker=not opts.track or opts.relative)
    device, _ = resolve_device(opts.device, opts.dtype)
    check_free_space(estimate_run_bytes(
        expected_frames(reader, opts), crop_size=512, out_size=output_size(actor_rgb, opts), work=work.root, out=out,
        preview=opts.preview != "none", frames_dir=Path(opts.frames_dir) if opts.frames_dir else None), str(out))

    stages = {"open": time.perf_counter() - t0}

    # 2. the driving performance (and, relative mode, the actor's own resting expression) is
    # tracked in a thread. Meanwhile this thread loads the pipeline (once the tracker has built its
    # models), prepares the actor and renders the batches whose params are already final
    # (retarget.ahead; kept only where they equal the final params).
    loading, pipe = None, None

    def start_loading(when: str = " while tracking") -> None:
        nonlocal loading
        if prepare is None and loading is None:
            # Logged here, not from the thread: a line printed from there would cut the tracking bar.
            load_pipeline(layout, opts, log, when, dry=True)
            loading = Background(lambda: load_pipeline(layout, opts, log=lambda *_: None), "retarget-load")

    built = threading.Event()  # the tracker's models exist (or it ended): loading others cannot race now
    tracks_now = threading.Event()

    def before_tracking() -> None:
        start_loading()
        tracks_now.set()
        built.set()

    # Relative mode's params need the whole track (its neutral frame): nothing renders ahead then,
    # but `ahead` still stops the tracking when the job fails.
    ahead = RenderAhead(work.root / AHEAD, _rows_to_params(opts, reader, gain), save=_save_png)
    # The video from its first frame, while tracking; the audio's range and the checks come after it
    # (render_to_work). Not with a preview: its frames need the driving frames of the final times.
    early_writer = None
    if EARLY_WRITE and RENDER_AHEAD and not (opts.relative or opts.track or opts.resume) and opts.preview == "none":
        from retarget.overlap import EarlyWriter

        early_writer = EarlyWriter(lambda: _video_sink(r, None, opts, out=out, fps=opts.fps or reader.fps,
                                                       audio=(drive, None, None) if reader.has_audio else None))

    def performance():
        try:
            track, tracked = _driving_track(drive, layout, opts, work, device, log, reader,
                                            before_tracking=before_tracking, observe=ahead.observe)
            at, driver = output_params(track.times, track.params, track.fps, opts)
            actor_neutral = driver_neutral = None
            if opts.relative:
                if loading is not None:  # tracking again builds models: not while the pipeline loads
                    loading.wait()
                actor_neutral = track_still(actor_path, layout, device)
                driver_neutral, n, t_n = _driver_neutral(drive, track, opts, layout, device, reader)
                log(f"relative mode: driver neutral = frame {n} ({t_n:.2f}s)")
            return track, tracked, at, retarget_params(driver, gain, relative=opts.relative,
                                                       driver_neutral=driver_neutral, actor_neutral=actor_neutral)
        finally:
            built.set()
            ahead.finish()

    tracking = Background(performance, "retarget-track")
    performed = None
    try:
        built.wait()
        if not tracks_now.is_set():  # it ended (a track file; or it failed: that error before any loading)
            performed = tracking.result()
        # 3. identity and reference once, then the frames and the video at once (retarget.overlap).
        start_loading("")
        if loading is not None:
            while loading.alive and not tracking.failed:  # a tracking error does not wait for the load
                loading.wait(0.05)
            if tracking.failed:
                tracking.result()
            pipe = loading.result()
        t = time.perf_counter()
        r = (prepare or prepare_rendering)(layout, actor_path, opts, log, actor_rgb=actor_rgb,
                                           **({"pipe": pipe} if pipe is not None else {}))
        stages["prepare"] = time.perf_counter() - t
        batch = job_batch(r, opts, work, expected_frames(reader, opts), log)
        ahead.render(r.render, batch, on_batch=early_writer.offer if early_writer is not None else None)
        track, tracked, at, params = performed or tracking.result()
    except BaseException:
        if early_writer is not None:
            early_writer.abort()  # its temporary video goes
        ahead.cancel()  # the tracker stops at its next batch
        if loading is not None:
            loading.cancel()  # not waited for: the error is the user's answer now
        tracking.cancel()
        tracking.wait(timeout=30.0)
        ahead.discard()
        raise
    stages["track"] = tracking.seconds
    stages["load"] = loading.seconds if loading is not None else 0.0
    out_fps = opts.fps or track.fps
    source = {"drive": file_fingerprint(drive) if drive.is_file() else str(drive.resolve())}
    preview = None
    if opts.preview != "none":
        preview = (preview_path(out),
                   _driving_frames(reader, nearest_frames(track.times, at), start_s=float(track.times[0])),
                   _load_flame(layout))
    stats: dict = {}
    try:
        rendered = render_to_work(r, params, work, opts, layout, actor_path, source, log, stats=stats, batch=batch,
                                  ahead=ahead, early_writer=early_writer, video=dict(
            out=out, fps=out_fps, preview=preview,
            audio=(drive, float(at[0]), float(at[-1] + 1.0 / out_fps)) if reader.has_audio else None))
    except BaseException:
        if early_writer is not None:
            early_writer.abort()  # its video, if not already closed or dropped, goes
        raise
    if not opts.keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    from retarget.compiling import summary_note

    seconds = time.perf_counter() - t0
    return RunSummary(frames=len(at), rendered=rendered, seconds=seconds,
                      invalid_frames=int((~track.valid).sum()), output=out,
                      preview=preview[0] if preview else None,
                      frames_dir=Path(opts.frames_dir) if opts.frames_dir else None,
                      face_report=r.actor.face_report, params=params, tracked=tracked, replaced=replaced,
                      compile=summary_note(r), **run_stages(stages, stats, rendered, seconds))


def run_stages(stages: dict, stats: dict, rendered: int, total: float) -> dict:
    """RunSummary's `stages` and `frames_per_s_render` from the stages timed so far, the stats
    of `retarget.overlap.render_and_write` and the job's `total` seconds."""
    render = stats.get("render_end", 0.0) - stats.get("render_start", 0.0)
    end = stats.get("written_end", stats.get("render_end", 0.0))
    stages = {"open": 0.0, "track": 0.0, "load": 0.0, "prepare": 0.0, **stages, "render": render,
              "write_tail": max(0.0, end - stats.get("render_end", end)), "total": total,
              "gpu_busy": stats.get("gpu_busy", 0.0)}
    return {"stages": stages, "frames_per_s_render": rendered / render if render > 0 else 0.0}


def check_output_name(out: Path) -> None:
    if out.suffix.lower() not in (".mp4", ".mov", ".mkv"):
        raise RetargetError(f"output {out}: use a .mp4, .mov or .mkv name")


def preview_path(out: Path) -> Path:
    return out.with_name(out.stem + ".preview" + out.suffix)


def check_outputs(out: Path, opts: RunOptions, work: "WorkFolder", inputs) -> None:
    """RetargetError, before anything is read or written, when any file or folder this job
    writes (-o, its preview, --frames-dir and the frames it would hold, the work folder) is
    one of `inputs` (render.files.check_not_input)."""
    from render.files import check_not_input

    check_not_input(out, inputs, option="-o")
    if opts.preview != "none":
        check_not_input(preview_path(out), inputs, option="--preview")
    if opts.frames_dir:
        frames_dir = Path(opts.frames_dir)
        check_not_input(frames_dir, inputs, option="--frames-dir")
        for p in frames_dir.glob("[0-9]*.png") if frames_dir.is_dir() else ():
            check_not_input(p, inputs, option="--frames-dir")
    check_not_input(work.root, inputs, option="--work")
    check_not_input(work.root / "drive.track.npz", inputs, option="--work")
    work.check_replaceable()


def expected_frames(reader, opts: RunOptions) -> int:
    """Output frames the job will write, from the container's header (before tracking)."""
    duration = reader.duration_s or reader.frame_count / max(reader.fps, 1e-6)
    start = opts.start or 0.0
    end = min(opts.end, duration) if opts.end is not None else duration
    fps = opts.fps or reader.fps
    return max(1, int(np.ceil(max(0.0, end - start) * fps)))


def output_size(actor_rgb: np.ndarray, opts: RunOptions) -> tuple[int, int]:
    """(w, h) of the written frames: the actor photo when pasting back, else the 512 px crop."""
    return (actor_rgb.shape[1], actor_rgb.shape[0]) if opts.paste_back else (512, 512)


def track_still(image_path: Path, layout, device: str) -> np.ndarray:
    """The 55-d expression of the face in one photo (unsmoothed), e.g. the actor's resting face."""
    from tracking.tracker import TrackOptions, track_video

    track = track_video(image_path, smirk_path=layout.smirk_ckpt, landmarker_path=layout.optional("face_landmarker"),
                        options=TrackOptions(smoothing="none", device=device), progress=False)
    return track.params[0]


def job_batch(r: Rendering, opts: RunOptions, work: WorkFolder, frames: int, log) -> int:
    """Frames per batch for this job (--batch, the renderer's choice, else from free memory), with
    the --compile decision for a job of `frames` frames set up on `r` (retarget.compiling)."""
    batch = opts.batch or r.batch_size or auto_batch(r.device, r.pipe.image_size)
    from retarget import compiling

    manifest = work.root / MANIFEST
    compiling.setup(r, opts.compile, frames=frames, batch=batch, log=log,
                    previous=compiling.previous_choice(manifest) if opts.resume else None,
                    previous_decoder=compiling.previous_choice(manifest, "decoder") if opts.resume else None)
    return batch


def render_to_work(r: Rendering, params: np.ndarray, work: WorkFolder, opts: RunOptions, layout, actor_path: Path,
                   source: dict, log, *, video: dict | None = None, stats: dict | None = None,
                   batch: int | None = None, ahead: RenderAhead | None = None, early_writer=None) -> int:
    """Render every frame of `params` (T, 55) into the work folder, resuming when asked.

    Batches are aligned to multiples of the batch size, so a resumed run renders the same
    batches (bit-identical frames) as an uninterrupted one. Returns frames rendered now.
    video: the keyword arguments of `write_video` (out, fps, audio, preview): the video is
    written while the frames render (retarget.overlap), as write_video would write it after.
    stats: filled as by `retarget.overlap.render_and_write` (the stages' times). batch: from
    `job_batch` when called already (default: called here); ahead: the frames rendered while
    tracking, moved in where their params are these (the others are rendered again);
    early_writer: a retarget.overlap.EarlyWriter that wrote the first of them into the video
    (`video`'s) while tracking: the video goes on from there if every frame it wrote was kept
    and its frame rate is `video`'s, else it is dropped and written from frame 0.
    """
    if batch is None:
        batch = job_batch(r, opts, work, len(params), log)
    manifest = {
        **source, "actor": file_fingerprint(actor_path), "weights": str(layout.root.resolve()),
        "params": hashlib.sha256(np.ascontiguousarray(params).tobytes()).hexdigest()[:16], "batch": batch,
        "device": r.device, "dtype": str(r.dtype), "ref_latent": opts.ref_latent,
        **{k: v for k, v in r.call.items()},
        # compiled frames differ by rounding: a resumed job follows these (compiling.previous_choice)
        **({"compiled": True} if r.compiled is not None and r.compiled.unet else {}),
        **({"decoder_compiled": True} if r.compiled is not None and r.compiled.decoder else {}),
    }
    work.start(manifest, opts.resume)
    early, written, sink = 0, 0, None
    if ahead is not None and ahead.rendered:  # the early writer has frames only from these
        early = ahead.adopt(params, work.frame_path)
        if early_writer is not None:
            written, sink = _continue_early_video(early_writer, ahead, video, log)
        log(f"rendered {ahead.rendered} frames while tracking ({ahead.seconds:.1f}s); kept {early}"
            + ("" if early == ahead.rendered else f", {ahead.rendered - early} to render again (their params changed)")
            + (f"; {written} written to the video" if written else ""))
    if sink is None and video:
        sink = _video_sink(r, params, opts, **video)
    stats = {} if stats is None else stats
    rendered = _render_all(r, params, work, batch, log, sink=sink, stats=stats, early=early, written=written)
    if written:
        early_writer.close()  # the sink entered while tracking ends here: the outputs are renamed into place
        stats["written_end"] = time.perf_counter()
    return early + rendered


def _continue_early_video(early_writer, ahead: RenderAhead, video: dict | None, log):
    """(frames written, the sink to go on with) after tracking: the early writer's video when every
    frame it wrote was rendered with the final params and its frame rate is `video`'s (its audio
    range is then set from `video`); else (0, None), its video dropped (written again from frame 0)."""
    written = early_writer.stop()
    if not written:
        early_writer.abort()
        return 0, None
    writer = early_writer.sink.video
    reasons = []
    if not all(i in ahead.kept for i in range(written)):
        reasons.append("some of its frames' params changed")
    if video is None or writer.fps != float(video["fps"]):
        reasons.append("its frame rate is not the track's")
    if reasons:
        early_writer.abort()
        log(f"the {written} frames written to the video while tracking are written again ({'; '.join(reasons)})")
        return 0, None
    if video.get("audio") is not None:
        writer.set_audio_range(video["audio"][1], video["audio"][2])
    return written, early_writer.continued()


def write_video(r: Rendering, params: np.ndarray, work: WorkFolder, out: Path, fps: float, opts: RunOptions, *,
                audio: tuple[Path, float, float] | None = None, preview=None) -> None:
    """Compose the rendered frames into `out` (pasted back unless --crop-only), with the audio
    range of `audio` = (file, start_s, end_s) and, if `preview` = (path, driving frames
    iterator, FLAME model or None), a side-by-side preview. Outputs appear only when complete."""
    from retarget.overlap import render_and_write

    n = len(params)
    render_and_write(None, n, save=work.save_frame, load=work.load, saved=range(n), progress=_bars,
                     sink=_video_sink(r, params, opts, out=out, fps=fps, audio=audio, preview=preview))


def _video_sink(r: Rendering, params: np.ndarray, opts: RunOptions, *, out: Path, fps: float,
                audio: tuple[Path, float, float] | None = None, preview=None):
    """The writer stage (arguments as `write_video`'s): a context manager whose value is
    write(i, face) for the aligned faces i = 0..T-1 in order; the outputs are renamed into
    place when it exits normally and deleted when it exits with an error. audio (file, None,
    None): its range is set later, through the context manager's `video` (set_audio_range).
    In a process of its own (retarget.sink_process) unless WRITER_PROCESS is off or a preview
    is written (its frames need the driving video, read in this process)."""
    from retarget.sink_process import SinkProcess
    from retarget.video_sink import VideoSink

    frames_dir = Path(opts.frames_dir) if opts.frames_dir else None
    if frames_dir:
        check_writable(frames_dir, "--frames-dir")
    spec = VideoSink(out, fps, audio=audio, frames_dir=frames_dir,
                     actor_rgb=r.actor_rgb if opts.paste_back else None,
                     M=np.asarray(r.actor.M) if opts.paste_back else None, crop_size=int(r.actor.crop.shape[0]))
    if WRITER_PROCESS and not preview and os.name == "posix":  # the child gets its socket by fd (pass_fds)
        spec.writer()  # its checks now, in this process: a bad output fails before any rendering
        return SinkProcess(spec)
    return spec.open(preview, params)


def _bars(total: int, desc: str, initial: int):
    return _progress(total, desc, initial=initial)


def _track_span(opts: RunOptions, reader) -> tuple[float | None, float | None]:
    """(start, end) seconds of the driving video to track for --start/--end (None: its start / end):
    one source frame more on each side, since --fps resamples between the frames around the ends."""
    fps = reader.fps
    lo = None if opts.start is None else max(0.0, opts.start - 1.0 / fps)
    hi = None if opts.end is None else opts.end + 1.0 / fps
    return lo, hi


def output_params(times: np.ndarray, params: np.ndarray, fps: float, opts: RunOptions) -> tuple[np.ndarray, np.ndarray]:
    """(at (N,) seconds, driver (N, 55)): the output frames' times for --start/--end/--fps and the
    track's params (times (T,), params (T, 55) at `fps`) sampled there."""
    from retarget.motion import output_times, sample_params

    at = output_times(times, start=opts.start, end=opts.end, fps=opts.fps, source_fps=fps)
    return at, sample_params(times, params, at)


def _rows_to_params(opts: RunOptions, reader, gain: dict):
    """RenderAhead's params_of for this job: from the rows tracked so far (span times (T,), rows
    (T, 55) or T arrays of (55,), NaN where invalid, valid (T,)), the job's params (M, 55) for the output frames
    `first` .. `first + count` (rows outside them are NaN), computed as `run` computes them from
    the whole track, and how many frames from 0 are final (at most first + count); None when
    none can be (relative mode's params need the whole track; no face yet).

    Only the rows around those frames are smoothed (a window with the smoothing's reach on each
    side, starting at a valid row so that gaps fill as in the whole clip): the whole clip's rows
    would cost seconds per batch on a long clip. One Euro is causal with a long memory: its
    window starts at the first row."""
    from retarget.ahead import EXTRA_ROWS, final_frames
    from retarget.motion import output_times, retarget_params, sample_params
    from tracking.smoothing import margin_frames
    from tracking.tracker import TrackOptions, rows_in_range, smooth_rows

    if opts.relative or not RENDER_AHEAD or opts.track:
        return lambda *_, **__: None
    lo, hi = _track_span(opts, reader)
    smoothing = TrackOptions(smoothing=opts.smooth).smoothing_params()
    reach = margin_frames(smoothing["method"], reader.fps, **{k: v for k, v in smoothing.items() if k != "method"})[1]
    pad = reach + EXTRA_ROWS + 1  # rows a frame's params reach on either side (and one spare)

    def params_of(times: np.ndarray, rows: np.ndarray, valid: np.ndarray, first: int = 0, count: int | None = None):
        keep = rows_in_range(times, lo or 0.0, hi)  # the rows track_video keeps
        if not len(keep) or not valid[keep].any():
            return None
        try:
            at = output_times(times[keep], start=opts.start, end=opts.end, fps=opts.fps, source_fps=reader.fps)
        except RetargetError:  # no output frame reached yet
            return None
        final = final_frames(at, times, valid, reach)
        last = len(at) if count is None else min(len(at), first + count)
        if first >= last:
            return None
        # The window of rows [a, b): from a valid row `pad` rows before the first frame's row (the
        # first row for one_euro) to `pad` rows after the last frame's.
        a = 0
        if smoothing["method"] != "one_euro":
            before = np.flatnonzero(valid[:max(0, int(np.searchsorted(times, at[first])) - pad) + 1])
            a = int(before[-1]) if len(before) else 0
        b = min(len(times), int(np.searchsorted(times, at[last - 1], side="right")) + pad)
        smoothed = smooth_rows(np.stack(rows[a:b]).astype(np.float32), valid[a:b], times[a:b], smoothing)
        inner = keep[(keep >= a) & (keep < b)]
        out = np.full((len(at), smoothed.shape[1]), np.nan, np.float32)
        out[first:last] = retarget_params(sample_params(times[inner], smoothed[inner - a], at[first:last]), gain)
        return out, min(final, last)

    return params_of


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from render.storyboard import save_image

    save_image(path, rgb)


def _driving_track(drive: Path, layout, opts: RunOptions, work: WorkFolder, device: str, log, reader,
                   before_tracking=None, observe=None):
    """(track, frames tracked now): the --track file, the work folder's cached track when
    --resume finds one covering the range with the same smoothing, else a track of
    --start/--end only (tracking.tracker.track_video seeks there and adds the smoothing's
    margin). A cached track that does not cover the range is replaced by one of the whole range.
    before_tracking: called once, when tracking the video has built its models (not with --track
    or a cached track): loading other models in another thread before then would race with them
    (accelerate's empty-weights loading patches torch.nn.Module for the whole process).
    observe: track_video's, when the video is tracked now."""
    from tracking.track import Track
    from tracking.tracker import TrackOptions, source_sha256, summarize, track_video

    if opts.track:
        track = Track.load(opts.track)
        log(f"using track {opts.track} ({len(track.times)} frames)")
        return track, 0
    if opts.start is not None and opts.end is not None and opts.end <= opts.start:
        raise RetargetError(f"--end {opts.end:g}s must be after --start {opts.start:g}s")
    if opts.start is not None and reader.duration_s > 0 and opts.start >= reader.first_time_s + reader.duration_s:
        raise RetargetError(f"--start {opts.start:g}s is at or after the end of {drive} ({reader.duration_s:.2f}s long)")
    lo, hi = _track_span(opts, reader)
    topts = TrackOptions(smoothing=opts.smooth, device=device, start=lo or 0.0, end=hi)
    cached = work.root / TRACK_CACHE
    if opts.resume and cached.is_file():
        track = Track.load(cached)
        if (track.smoothing == topts.smoothing_params() and track.covers(lo, hi)
                and track.source_sha256 == source_sha256(drive)):
            log(f"resuming with the track in {cached}")
            return track, 0
        log(f"the track in {cached} is of another video, range or smoothing: tracking the range again")
    from retarget.overlap import CallAfter
    from tracking.tracker import default_backend_factory

    factory = default_backend_factory(layout.optional("face_landmarker"))
    stats: dict = {}
    track = track_video(drive, smirk_path=layout.smirk_ckpt, options=topts, stats=stats, observe=observe,
                        backend_factory=CallAfter(factory, before_tracking) if before_tracking else factory)
    log(f"{summarize(track)}; tracked {stats['frames_tracked']} frames (with the smoothing's margin)")
    work.root.mkdir(parents=True, exist_ok=True)
    track.save(cached)
    return track, stats["frames_tracked"]


def _driver_neutral(drive: Path, track, opts: RunOptions, layout, device: str, reader):
    """(55-d driver neutral, frame index, time s) for --relative: --neutral-frame N, a frame of
    the driving video (of the --track file's frames with --track), taken from the track when
    the tracked range holds it and else tracked alone (its moment, smoothed as in the clip);
    by default the least expressive frame of the track."""
    from retarget.motion import pick_neutral_frame
    from tracking.tracker import TrackOptions, track_range

    offset = 0 if opts.track else int(round((track.times[0] - reader.first_time_s) * reader.fps))
    if opts.neutral_frame is None:
        k = pick_neutral_frame(track.params, track.valid)
        return track.params[k], k + offset, float(track.times[k])
    n = opts.neutral_frame
    if 0 <= n - offset < len(track):
        return track.params[n - offset], n, float(track.times[n - offset])
    total = len(track) if opts.track else reader.frame_count
    if opts.track or n < 0 or (total and n >= total):
        raise RetargetError(f"--neutral-frame {n} is outside the driving {'track' if opts.track else 'video'}'s "
                            f"{total} frames")
    t = reader.first_time_s + n / reader.fps
    try:
        one = track_range(drive, max(0.0, t - 0.5 / reader.fps), t + 0.5 / reader.fps, smirk_path=layout.smirk_ckpt,
                          landmarker_path=layout.optional("face_landmarker"),
                          options=TrackOptions(smoothing=opts.smooth, device=device))
    except RetargetError as e:
        raise RetargetError(f"--neutral-frame {n}: {e}") from None
    return one.params[0], n, float(one.times[0])


def _render_all(r: Rendering, params: np.ndarray, work: WorkFolder, batch: int, log, *, sink=None,
                stats: dict | None = None, early: int = 0, written: int = 0) -> int:
    """Render every frame missing from `work`, `batch` frames at a time (through `r.render`);
    halve the batch and retry on out-of-memory; with `sink` (`_video_sink`), write the video
    meanwhile (retarget.overlap), from frame `written` (those before it are in the sink already).
    Returns how many frames were rendered now."""
    from retarget.overlap import render_and_write

    n = len(params)
    batches = [list(range(s, min(n, s + batch))) for s in range(0, n, batch)]
    todo = [b for b in batches if not all(work.has(i) for i in b)]
    saved = set(range(n)).difference(*todo)
    if len(saved) > early:  # early: rendered by this job while tracking (not a resumed run's)
        log(f"resuming: {len(saved) - early} of {n} frames already rendered")
    return render_and_write(r.render(todo, params), n, save=work.save_frame, load=work.load, sink=sink,
                            saved=saved, batch=batch, progress=_bars, stats=stats, written=written)


def _render_with_backoff(pipe, actor, params: np.ndarray, idx: list[int], call: dict,
                         compiled=None, fit: FitSize | None = None) -> list[np.ndarray]:
    def render(sub):
        return pipe(actor, params[sub], frame_indices=sub, **call)

    if compiled is not None:  # padded to the compiled shape (retarget.compiling.CompiledBatches)
        return compiled.render(render, idx, fit)
    return split_on_oom(render, idx, fit)



def _driving_frames(reader, wanted: np.ndarray, start_s: float = 0.0):
    """Yield the driving frame (RGB) for each output frame, streaming through the video once
    from `start_s` (the track's first frame, whose index `wanted` counts from)."""
    frames = reader.frames(start_s=start_s)
    current = next(frames)
    pos = 0
    for w in wanted:
        while pos < w:
            try:
                current = next(frames)
            except StopIteration:
                break
            pos += 1
        yield current.rgb


def _load_flame(layout):
    path = layout.optional("flame_model")
    if path is None:
        return None
    from render.mesh import load_flame

    return load_flame(path)
