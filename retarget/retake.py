"""An actor video as the target: `retarget run DRIVE ACTOR.mp4` re-performs a take, `retarget edit
ACTOR.mp4 --add SOURCE` changes the expressions of real footage. The orchestration only.

Output frame t takes its reference (appearance, pose, light, background) from actor frame t: the
pipeline's `frame_references` encodes a batch of aligned actor frames and runs the writer once for
the batch (never per denoising step), so each row of the batch reads its own bank, and the bank lives
for one batch. Identity is computed once (`--identity`, `--identity-frame`, or the mean ArcFace
embedding of a few sharp frontal actor frames). Expressions: relative by default (the actor's own
tracked expression at t plus the driver's change from its neutral), or the driver's (`--absolute`).

Three streaming passes over the actor video, none holding more than a batch of frames:
1. analysis (before any diffusion model loads): faces, the chosen subject, its 68 landmarks and
   SMIRK expression per frame, identity candidates; the landmarks are then smoothed over time so
   the aligned crop, and with it the pasted region, does not jitter;
2. render: the aligned crops of each missing batch -> per-frame references -> faces in the work
   folder (PNG, resumable as in `retarget.run`);
3. write: each face pasted back into its own actor frame; frames without the subject pass through.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from render.errors import RetargetError
from retarget.oom import split_on_oom
from retarget.run import (
    RunOptions, WorkFolder, _progress, check_output_name, check_writable, file_fingerprint,
    read_image, render_call, require_render_weights, resolve_device,
)

IDENTITY_FRAMES = 5  # sharp frontal frames averaged for the default identity
IDENTITY_FRAME_TOLERANCE_S = 0.5  # --identity-frame: the face must be seen this close to the time given
# Alignment smoothing: the expressions' zero-phase filter with a cutoff a little higher (the pasted face
# must follow the head); at 25 fps, 3 Hz halves a detector's frame-to-frame jitter (white noise, measured
# in tests/retarget/test_retake.py) and keeps steady motion exactly (local-linear: no lag).
ALIGN_CUTOFF_HZ = 3.0
FFHQ_SIZE = 512  # the aligned reference crop, as the photo path's prepare_actor
ANALYSIS = "actor.analysis.npz"


@dataclass
class RetakeOptions:
    """The options that only an actor video has (the CLI is generated from these fields)."""

    identity: str | None = field(default=None, metadata={"help": "actor video: take the identity from this photo", "metavar": "PHOTO"})
    identity_frame: float | None = field(default=None, metadata={"help": "actor video: take the identity from the actor frame at this second", "metavar": "SEC"})
    absolute: bool = field(default=False, metadata={"help": "actor video: render the driver's expressions as they are (default: relative, the take's own expression plus the driver's change from neutral)"})
    driver_end: Literal["hold", "loop", "stop"] = field(default="hold", metadata={"help": "actor video: when the driver is shorter, hold its last frame, loop it, or stop the output"})
    drive_face: str = field(default="largest", metadata={"help": "face to follow in the driving video: largest, N (N-th largest), or X,Y (nearest that pixel of the first frame)", "metavar": "WHICH"})
    actor_face: str = field(default="largest", metadata={"help": "actor video: face to re-render: largest, N, or X,Y; the other faces pass through", "metavar": "WHICH"})
    audio: Literal["actor", "drive", "none"] = field(default="actor", metadata={"help": "actor video: audio of the output"})


@dataclass
class EditOptions:
    """`retarget edit`: an expression source added to the take's own expressions over a time range."""

    add: str = field(default="neutral", metadata={"help": "expression source: a photo, CLIP@SEC, CLIP#FRAME, TRACK.npz#N, a preset, or numbers ({\"jaw\": 0.2})", "metavar": "SOURCE"})
    gain: str | None = field(default=None, metadata={"help": "gain on the source's offset from neutral: G, or per part (jaw=1.2,expression=0.5)", "metavar": "G"})
    start: float | None = field(default=None, metadata={"help": "first second of the edit (default: the clip's start)", "metavar": "SEC"})
    end: float | None = field(default=None, metadata={"help": "last second of the edit (default: the clip's end)", "metavar": "SEC"})
    ease: float = field(default=0.25, metadata={"help": "seconds to ease in before --start and out after --end", "metavar": "SEC"})


@dataclass
class RetakeSummary:
    """What a video-actor job produced (summary line, tests)."""

    frames: int
    rendered: int
    seconds: float
    fps: float
    no_face_frames: int
    driving_no_face: int | None
    identity: str
    output: Path
    preview: Path | None = None
    frames_dir: Path | None = None
    params: np.ndarray | None = None  # (frames, 55) expressions of the output frames
    rendered_frames: np.ndarray | None = None  # indices of the frames that were re-rendered
    face_report: str = ""

    def line(self) -> str:
        rate = self.rendered / self.seconds if self.seconds > 0 else 0.0
        drive = "" if self.driving_no_face is None else f", {self.driving_no_face} driving frames without a face"
        extra = f", preview {self.preview}" if self.preview else ""
        extra += f", frames in {self.frames_dir}" if self.frames_dir else ""
        return (f"done: {self.frames} frames at {self.fps:.2f} fps ({self.rendered} rendered now) in "
                f"{self.seconds:.1f}s ({rate:.2f} frames/s); identity: {self.identity}; "
                f"{self.no_face_frames} actor frames without the face passed through{drive}; wrote {self.output}{extra}")


# --------------------------------------------------------------------------- inputs

def is_video_actor(path: str | os.PathLike) -> bool:
    """True when `path` names a video (or a folder of frames) rather than a photo: anything that is
    not an image file by its extension. A missing .mp4 is a video actor (and fails as one)."""
    from render.video import IMAGE_EXTENSIONS

    p = Path(path)
    return p.is_dir() or p.suffix.lower() not in IMAGE_EXTENSIONS


def _open_actor(path: Path):
    from render.video import open_video

    if not path.exists():
        raise RetargetError(f"actor video {path} does not exist")
    reader = open_video(path)
    if reader.kind == "image":
        raise RetargetError(f"actor video {path} is one image; pass it as a photo")
    return reader


@dataclass
class ActorTake:
    """The actor video, analysed. times (T,) s; valid (T,) the subject was found; lmk (T, 68, 2) float32
    landmarks smoothed over time (filled where invalid); params (T, 55) its expressions, filled and
    smoothed; identity (512,) unit ArcFace vector and how it was chosen; fps; report (faces seen)."""

    times: np.ndarray
    valid: np.ndarray
    lmk: np.ndarray
    params: np.ndarray
    identity: np.ndarray
    identity_note: str
    fps: float
    report: str = ""


def embed_aligned(rgb: np.ndarray, face, arcface, backend) -> np.ndarray:
    """(512,) ArcFace vector of a face as the photo path computes it (pipeline.prepare_actor): the
    FFHQ script's alignment, then the face found again on it (tracking.align.reference_and_identity)."""
    from tracking.align import reference_and_identity

    return arcface(reference_and_identity(rgb, face, backend, size=FFHQ_SIZE)[2])[0]


def frontal_sharpness(rgb: np.ndarray, face) -> float:
    """Score of a frame for the identity: Laplacian variance of the 112 px ArcFace crop (sharpness),
    times the frontality of the 5 keypoints (1 when the nose is midway between the eyes and the eye
    line level, falling to 0 at a half-profile or a 45 degree roll)."""
    import cv2

    from tracking.align import arcface_crop

    crop, _ = arcface_crop(rgb, face.kps5)
    sharp = float(cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())
    k = np.asarray(face.kps5, np.float64)
    eyes = k[1] - k[0]
    dist = max(float(np.hypot(*eyes)), 1e-6)
    yaw = abs(float(np.dot(k[2] - (k[0] + k[1]) / 2, eyes / dist))) / (0.5 * dist)
    roll = abs(float(np.arctan2(eyes[1], eyes[0]))) / (np.pi / 4)
    return sharp * max(0.0, 1.0 - yaw) * max(0.0, 1.0 - roll)


def analyse_actor(path: Path, reader, choice, layout, device: str, opts: RunOptions, ro: RetakeOptions,
                  arcface, log) -> ActorTake:
    """Pass 1 over the actor video (streamed): the subject's landmarks, expressions and identity.

    Raises RetargetError when no frame shows the subject, or when --identity-frame has no face."""
    import torch

    from render.video import prefetch
    from tracking import smoothing as sm
    from tracking.choice import Subject
    from tracking.encode_thread import encode_batch
    from tracking.faces import make_face_backend
    from tracking.smirk import load_smirk_encoder
    from tracking.tracker import encoder_crop

    # The pipeline's backend (68 landmarks for the FFHQ alignment, as prepare_actor), on every frame:
    # the pasted region must sit on this frame's face.
    backend = make_face_backend("auto", antelopev2_dir=layout.optional("antelopev2"))
    encoder = load_smirk_encoder(layout.smirk_ckpt, device=device, dtype=torch.float32)
    subject = Subject(choice, "--actor-face")
    batch = 64 if device == "cuda" else 8
    times, lmks, raw, valid, crops, rows = [], [], [], [], [], []
    candidates: list = []  # heap of (score, index, rgb, face): the sharpest frontal frames
    at_frame = None  # (distance to --identity-frame, index, rgb, face)
    most = 0

    def flush():
        if crops:
            for r, vec in zip(rows, encode_batch(encoder, np.stack(crops), batch if device == "cuda" else 0)):
                raw[r] = vec
            crops.clear()
            rows.clear()

    bar = _progress(reader.frame_count or None, f"analysing {path.name}")
    for frame in prefetch(reader.frames(), 8):
        faces = backend.detect(frame.rgb)
        most = max(most, len(faces))
        face = subject(faces, frame.time_s)
        ok = face is not None and face.lmk68 is not None
        times.append(frame.time_s)
        valid.append(ok)
        lmks.append(face.lmk68 if ok else np.full((68, 2), np.nan, np.float32))
        raw.append(np.full(55, np.nan, np.float32))
        if ok:
            crops.append(encoder_crop(frame.rgb, face))
            rows.append(len(raw) - 1)
            if len(crops) >= batch:
                flush()
            if ro.identity_frame is not None:
                d = abs(frame.time_s - ro.identity_frame)
                if at_frame is None or d < at_frame[0]:
                    at_frame = (d, frame.index, frame.rgb, face)
            elif ro.identity is None:
                item = (frontal_sharpness(frame.rgb, face), frame.index, frame.rgb, face)
                if len(candidates) < IDENTITY_FRAMES:
                    heapq.heappush(candidates, item[:2] + (item[2].copy(), item[3]))
                elif item[0] > candidates[0][0]:
                    heapq.heapreplace(candidates, item[:2] + (item[2].copy(), item[3]))
        bar.update(1)
    flush()
    bar.close()
    n = len(times)
    valid_arr = np.array(valid, bool)
    if not valid_arr.any():
        raise RetargetError(f"no face found in any of the {n} frames of actor video {path} "
                            f"(face backend: {backend.name}; --actor-face {ro.actor_face})")
    times_arr = np.array(times, np.float64)
    lmk = smooth_alignment(np.stack(lmks), valid_arr, times_arr)
    params = sm.fill_invalid(np.stack(raw), valid_arr, times_arr)
    params = sm.smooth(params, times_arr, opts.smooth) if opts.smooth != "none" else params.astype(np.float32)

    if ro.identity is not None:
        identity, note = identity_from_photo(Path(ro.identity), backend, arcface)
    elif ro.identity_frame is not None:
        gap, i, rgb, face = at_frame
        if gap > IDENTITY_FRAME_TOLERANCE_S:
            raise RetargetError(f"--identity-frame {ro.identity_frame:g}: no frame with the face within "
                                f"{IDENTITY_FRAME_TOLERANCE_S:g}s (nearest: {times_arr[i]:.2f}s)")
        identity = embed_aligned(rgb, face, arcface, backend)
        note = f"actor frame {i} ({times_arr[i]:.2f}s, --identity-frame {ro.identity_frame:g})"
    else:
        picked = sorted(candidates, key=lambda c: c[1])
        vecs = np.stack([embed_aligned(rgb, face, arcface, backend) for _, _, rgb, face in picked])
        mean = vecs.mean(0)
        identity = mean / np.linalg.norm(mean)
        note = (f"mean ArcFace of {len(picked)} sharp frontal frames ("
                + ", ".join(f"{times_arr[c[1]]:.2f}s" for c in picked) + ")")
    report = f"{most} face{'s' if most != 1 else ''} seen at most in a frame; following the {choice}"
    log(f"{path.name}: {n} frames at {reader.fps:.2f} fps, the face in {int(valid_arr.sum())}/{n}; {report}")
    return ActorTake(times_arr, valid_arr, lmk.astype(np.float32), params.astype(np.float32),
                     np.asarray(identity, np.float32), note, reader.fps, report)


def smooth_alignment(lmk68: np.ndarray, valid: np.ndarray, times: np.ndarray) -> np.ndarray:
    """(T, 68, 2) landmarks (NaN where `valid` is False) -> (T, 68, 2) float32 smoothed over time:
    gaps filled from their neighbours, then the zero-phase filter at ALIGN_CUTOFF_HZ (no lag; steady
    motion kept exactly), so the aligned crop and the pasted region follow the head without the
    detector's frame-to-frame jitter."""
    from tracking import smoothing as sm

    n = len(times)
    flat = sm.fill_invalid(np.asarray(lmk68, np.float32).reshape(n, -1), np.asarray(valid, bool), times)
    return sm.smooth(flat, times, "zero_phase", cutoff_hz=ALIGN_CUTOFF_HZ).reshape(n, 68, 2).astype(np.float32)


def identity_from_photo(path: Path, backend, arcface) -> tuple[np.ndarray, str]:
    """--identity PHOTO: the largest face of the photo, embedded as the photo path does."""
    rgb = read_image(path, "--identity photo")
    faces = [f for f in backend.detect(rgb) if f.lmk68 is not None]
    if not faces:
        raise RetargetError(f"--identity {path}: no face found in the photo")
    face = max(faces, key=lambda f: f.area)
    return embed_aligned(rgb, face, arcface, backend), f"photo {path.name} (--identity)"


# --------------------------------------------------------------------------- the driver

def driver_schedule(times: np.ndarray, fps: float, *, n_out: int, out_fps: float, start: float | None,
                    end: float | None, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Driver times (seconds of the driving video) for the output frames, matched by time from
    `start`, and the selection (n,) of the driver's frames inside [start, end). Output frame k lies
    k / out_fps after the clip's start; past the driver's end it holds the last frame ("hold"),
    loops from `start` ("loop"), or the output stops ("stop": fewer than n_out times come back)."""
    t = np.asarray(times, np.float64)
    lo = t[0] if start is None else float(start)
    hi = t[-1] + 1.0 / fps if end is None else float(end)
    sel = (t >= lo - 1e-6) & (t < hi - 1e-6)
    if not sel.any():
        raise RetargetError(f"no driving frame between {lo:.3f}s and {hi:.3f}s")
    length = min(hi, t[-1] + 1.0 / fps) - lo
    u = np.arange(n_out) / out_fps
    if mode == "loop":
        u = np.mod(u, length)
    elif mode == "stop":
        u = u[u < length - 1e-6]
    elif mode != "hold":
        raise RetargetError(f"--driver-end {mode!r}: choose hold, loop or stop")
    return lo + u, sel


def _driver_track(drive: Path, choice, layout, opts: RunOptions, work: WorkFolder, device: str, log):
    """The driving performance: `retarget.run`'s track (largest face, --track, resume cache), or, for
    another --drive-face, the chosen face followed through the video."""
    from render.video import open_video
    from retarget.run import _driving_track

    if choice.kind == "largest":
        return _driving_track(drive, layout, opts, work, device, log, open_video(drive))[0]
    if opts.track:
        raise RetargetError("--drive-face picks a face to track; a --track file already holds one: drop one of them")
    import torch

    from render.video import open_video, prefetch
    from tracking import smoothing as sm
    from tracking.choice import Subject
    from tracking.faces import make_face_backend
    from tracking.smirk import load_smirk_encoder, weights_identity
    from tracking.track import Track
    from tracking.tracker import encoder_crop, source_sha256

    reader = open_video(drive)
    backend = make_face_backend("auto", landmarker_path=layout.optional("face_landmarker"))
    encoder = load_smirk_encoder(layout.smirk_ckpt, device=device, dtype=torch.float32)
    subject = Subject(choice, "--drive-face")
    times, raw, valid = [], [], []
    for frame in prefetch(reader.frames(), 8):
        face = subject(backend.detect(frame.rgb), frame.time_s)
        times.append(frame.time_s)
        valid.append(face is not None)
        raw.append(encoder.encode(encoder_crop(frame.rgb, face)[None])[0] if face is not None
                   else np.full(55, np.nan, np.float32))
    valid_arr, times_arr = np.array(valid, bool), np.array(times, np.float64)
    if not valid_arr.any():
        raise RetargetError(f"no face found in the driving video {drive} (--drive-face {choice})")
    raw_arr = np.stack(raw).astype(np.float32)
    params = sm.fill_invalid(raw_arr, valid_arr, times_arr)
    params = sm.smooth(params, times_arr, opts.smooth) if opts.smooth != "none" else params
    log(f"{drive.name}: following the {choice}, face in {int(valid_arr.sum())}/{len(valid)} frames")
    return Track(raw=raw_arr, params=params, valid=valid_arr, times=times_arr, fps=reader.fps, source=str(drive),
                 source_sha256=source_sha256(drive), backend=backend.name,
                 weights_id=weights_identity(layout.smirk_ckpt), smoothing={"method": opts.smooth})


# --------------------------------------------------------------------------- jobs

def _check_common(actor_path: Path, out: Path, opts: RunOptions, ro: RetakeOptions, layout, inputs=()):
    """Options, inputs and outputs checked before any work: nothing this job writes (-o, its preview,
    --frames-dir, the work folder) may be one of its inputs (the take, `inputs`, --identity, --track)."""
    from retarget.cliargs import check_options
    from retarget.run import check_outputs
    from tracking.choice import parse_face_choice

    check_options(opts)
    check_output_name(out)
    work = WorkFolder(Path(opts.work) if opts.work else out.parent / f".{out.name}.work")
    check_outputs(out, opts, work, (actor_path, *inputs, ro.identity, opts.track))
    reader = _open_actor(actor_path)
    if opts.fps is not None:
        raise RetargetError("--fps: with an actor video the output takes the actor clip's frame rate")
    if ro.identity is not None and ro.identity_frame is not None:
        raise RetargetError("--identity and --identity-frame both name the identity: keep one")
    if ro.identity is not None:
        read_image(ro.identity, "--identity photo")
    choice = parse_face_choice(ro.actor_face, "--actor-face")
    check_writable(out.parent, "output folder")
    require_render_weights(layout, opts, tracker=True)
    device, _ = resolve_device(opts.device, opts.dtype)
    return reader, choice, device, work


def _layout(weights):
    from retarget.weights import WeightsLayout

    return weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)


def _arcface(layout, device: str):
    from retarget.identity import ArcFaceEmbedder

    return ArcFaceEmbedder(layout.require("arcface_onnx"), providers=None if device == "cuda" else ["CPUExecutionProvider"])


def retake(drive: str | os.PathLike, actor_path: str | os.PathLike, out: str | os.PathLike,
           options: RunOptions | None = None, retake_options: RetakeOptions | None = None, *,
           weights=None, log=print) -> RetakeSummary:
    """Render `out`: the take `actor_path` (a video or folder of frames) re-performed with the face of
    `drive`. The output has the actor clip's frames and frame rate (fewer with --driver-end stop).
    Raises RetargetError on bad input, before any diffusion model loads where the input is at fault."""
    from render.video import open_video
    from retarget.motion import parse_gain
    from tracking.choice import parse_face_choice

    opts, ro = options or RunOptions(), retake_options or RetakeOptions()
    t0 = time.perf_counter()
    drive, actor_path, out = Path(drive), Path(actor_path), Path(out)
    layout = _layout(weights)
    if not drive.exists():
        raise RetargetError(f"driving video {drive} does not exist")
    dreader = open_video(drive)
    reader, choice, device, work = _check_common(actor_path, out, opts, ro, layout, inputs=(drive,))
    drive_choice = parse_face_choice(ro.drive_face, "--drive-face")
    gain = parse_gain(opts.gain)
    if opts.relative and ro.absolute:
        raise RetargetError("--relative and --absolute contradict each other (relative is the default for an actor video)")

    take = analyse_actor(actor_path, reader, choice, layout, device, opts, ro, _arcface(layout, device), log)
    track = _driver_track(drive, drive_choice, layout, opts, work, device, log)
    params, at, sel = retake_params(take.params, take.fps, track, opts, ro, gain, log)
    n = len(at)
    if n < len(take.times):
        log(f"--driver-end stop: the driver ends after {n} of the take's {len(take.times)} frames")
    audio = None
    if ro.audio == "actor" and reader.has_audio:
        audio = (actor_path, float(take.times[0]), float(take.times[n - 1] + 1.0 / take.fps))
    elif ro.audio == "drive" and dreader.has_audio:
        audio = (drive, float(at[0]), float(at[0] + n / take.fps))
    source = {"drive": file_fingerprint(drive) if drive.is_file() else str(drive.resolve()),
              "drive_face": ro.drive_face, "driver_end": ro.driver_end}
    driving = (dreader, _nearest(track.times, at)) if opts.preview != "none" else None
    return _render_take(actor_path, reader, take, params, out, opts, layout, device, work, source, audio,
                        driving, t0, log, driving_no_face=int((~track.valid[sel]).sum()))


def retake_params(take_params: np.ndarray, take_fps: float, track, opts: RunOptions, ro: RetakeOptions,
                  gain: dict[str, float], log=print) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The expressions of the output frames: (n, 55) float32, n = the take's frames (fewer with
    --driver-end stop), the driver times they were sampled at (n,), and the selection of the driver's
    frames in --start/--end. Relative (default): the take's own expression at t plus gain x the
    driver's change from its neutral frame; --absolute: gain x the driver's. Clamped to SMIRK's ranges."""
    from retarget.motion import apply_gain, pick_neutral_frame, retarget_params, sample_params

    at, sel = driver_schedule(track.times, track.fps, n_out=len(take_params), out_fps=take_fps, start=opts.start,
                              end=opts.end, mode=ro.driver_end)
    driver = sample_params(track.times[sel], track.params[sel], at)
    n = len(at)
    if ro.absolute:
        return retarget_params(driver, gain), at, sel
    if opts.neutral_frame is not None:
        k = opts.neutral_frame
        if not 0 <= k < len(track.params):
            raise RetargetError(f"--neutral-frame {k} is outside the driving video's {len(track.params)} frames")
    else:
        k = int(np.flatnonzero(sel)[pick_neutral_frame(track.params[sel], track.valid[sel])])
    log(f"relative mode: driver neutral = frame {k} ({track.times[k]:.2f}s) onto the take's own expressions")
    # As retarget_params' relative mode, with the take's expression at t as the actor's own.
    return _clamp(take_params[:n] + apply_gain(driver - track.params[k][None], gain)), at, sel


def edit(actor_path: str | os.PathLike, out: str | os.PathLike, edit_options: EditOptions,
         options: RunOptions | None = None, retake_options: RetakeOptions | None = None, *,
         weights=None, log=print) -> RetakeSummary:
    """Render `out`: the take `actor_path` with its own expressions plus gain x the offset of the
    expression source `edit_options.add` from neutral, over [start, end] eased in and out over `ease`
    seconds (frames outside [start - ease, end + ease] get the take's own expressions)."""
    from retarget.motion import apply_gain

    eo, opts, ro = edit_options, options or RunOptions(), retake_options or RetakeOptions()
    t0 = time.perf_counter()
    actor_path, out = Path(actor_path), Path(out)
    layout = _layout(weights)
    from retarget.sources import input_paths, parse_source

    added = input_paths([parse_source(eo.add, where="--add")])
    reader, choice, device, work = _check_common(actor_path, out, opts, ro, layout, inputs=added)
    gain = parse_edit_gain(eo.gain)
    if ro.audio == "drive":
        raise RetargetError("--audio drive: edit has no driving video; use actor or none")
    if not np.isfinite(eo.ease) or eo.ease < 0:
        raise RetargetError(f"--ease must be >= 0 seconds, got {eo.ease}")
    offset, what = expression_source(eo.add, layout, device, log)

    take = analyse_actor(actor_path, reader, choice, layout, device, opts, ro, _arcface(layout, device), log)
    u = take.times - take.times[0]
    weight = edit_weight(u, start=eo.start, end=eo.end, ease=eo.ease, length=u[-1] + 1.0 / take.fps)
    params = _clamp(take.params + weight[:, None] * apply_gain(offset[None], gain))
    log(f"edit: + {what}, {int((weight > 0).sum())} of {len(u)} frames touched")
    n = len(u)
    audio = (actor_path, float(take.times[0]), float(take.times[-1] + 1.0 / take.fps)) \
        if ro.audio != "none" and reader.has_audio else None
    source = {"edit": eo.add, "edit_gain": eo.gain, "edit_range": [eo.start, eo.end, eo.ease]}
    return _render_take(actor_path, reader, take, params[:n], out, opts, layout, device, work, source, audio,
                        None, t0, log, driving_no_face=None)


def parse_edit_gain(spec: str | None) -> dict[str, float]:
    """`--gain` of edit: one number for every part, or per part as in run ('jaw=1.2,expression=0.5')."""
    from retarget.motion import PARTS, parse_gain

    if spec is not None:
        try:
            g = float(spec)
        except ValueError:
            return parse_gain(spec)
        if not np.isfinite(g):
            raise RetargetError(f"--gain {spec!r} is not finite")
        return {k: g for k in PARTS}
    return parse_gain(None)


def edit_weight(u: np.ndarray, *, start: float | None, end: float | None, ease: float, length: float) -> np.ndarray:
    """(T,) weight in [0, 1] of the edit at clip times u (s from the clip's start): 1 on [start, end],
    a smoothstep from 0 over the `ease` seconds before start and after end, 0 elsewhere."""
    lo = 0.0 if start is None else float(start)
    hi = length if end is None else float(end)
    if hi < lo:
        raise RetargetError(f"--start {lo:g}s is after --end {hi:g}s")
    u = np.asarray(u, np.float64)
    if ease > 0:
        x = np.clip(np.minimum((u - (lo - ease)) / ease, ((hi + ease) - u) / ease), 0.0, 1.0)
    else:
        x = ((u >= lo - 1e-9) & (u <= hi + 1e-9)).astype(np.float64)
    return (x * x * (3.0 - 2.0 * x)).astype(np.float32)


def expression_source(spec: str, layout, device: str, log=print) -> tuple[np.ndarray, str]:
    """`--add SOURCE` -> ((55,) float32 offset from neutral, the source as written). SOURCE is an
    expression source as everywhere else (retarget.sources: a photo, CLIP@SEC or CLIP#N, a track row,
    a preset, or JSON numbers); neutral is the zero vector (the preset "neutral"), so the offset is the
    source's vector. Pictures are tracked here, before any diffusion model loads."""
    from retarget.sources import parse_source, resolve_sources

    src = parse_source(spec, where="--add")
    return resolve_sources([src], layout=layout, device=device, log=log)[0].astype(np.float32), src.text


def _clamp(params: np.ndarray) -> np.ndarray:
    from retarget.motion import clamp_to_valid_range

    return clamp_to_valid_range(params)


def _nearest(times: np.ndarray, at: np.ndarray) -> np.ndarray:
    from retarget.motion import nearest_frames

    return nearest_frames(times, at) if len(times) > 1 else np.zeros(len(at), int)


# --------------------------------------------------------------------------- render and write

def _render_take(actor_path: Path, reader, take: ActorTake, params: np.ndarray, out: Path, opts: RunOptions, layout,
                 device: str, work: WorkFolder, source: dict, audio, driving, t0: float, log, *,
                 driving_no_face: int | None) -> RetakeSummary:
    """Passes 2 and 3: load the models, render the frames with the subject (batches of per-frame
    references), paste each back into its own frame, write `out` (+ preview, frames folder)."""
    import torch

    from retarget.pipeline import RetargetPipeline

    n = len(params)
    todo_idx = np.flatnonzero(take.valid[:n])
    device, dtype = resolve_device(opts.device, opts.dtype)
    log(f"loading models on {device} ({str(dtype).replace('torch.', '')})")
    pipe = RetargetPipeline.from_weights(layout, device=device, dtype=dtype, lcm=opts.fast)
    actor = pipe.make_actor(take.identity, None)
    call = render_call(opts)
    from retarget.run import auto_batch

    batch = opts.batch or auto_batch(device, pipe.image_size)
    digest = hashlib.sha256()
    for a in (params, take.lmk[:n], take.identity, todo_idx):
        digest.update(np.ascontiguousarray(a).tobytes())
    manifest = {**source, "actor": file_fingerprint(actor_path) if actor_path.is_file() else str(actor_path.resolve()),
                "weights": str(layout.root.resolve()), "inputs": digest.hexdigest()[:16], "batch": batch,
                "device": device, "dtype": str(dtype), "ref_latent": opts.ref_latent, "reference": "per-frame", **call}
    work.start(manifest, opts.resume)
    with torch.no_grad():
        rendered = _render_frames(pipe, actor, reader, take, params, todo_idx, work, batch, call, opts, log)
    del pipe
    preview = out.with_name(out.stem + ".preview" + out.suffix) if opts.preview != "none" else None
    _write(reader, take, params, work, out, opts, audio, preview, driving)
    if not opts.keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    return RetakeSummary(frames=n, rendered=rendered, seconds=time.perf_counter() - t0, fps=take.fps,
                         no_face_frames=int(n - len(todo_idx)), driving_no_face=driving_no_face,
                         identity=take.identity_note, output=out, preview=preview,
                         frames_dir=Path(opts.frames_dir) if opts.frames_dir else None, params=params,
                         rendered_frames=todo_idx, face_report=take.report)


def _render_frames(pipe, actor, reader, take: ActorTake, params: np.ndarray, idx: np.ndarray, work: WorkFolder,
                   batch: int, call: dict, opts: RunOptions, log) -> int:
    """Render the frames `idx` missing from `work`, in batches aligned to positions in `idx` (a resumed
    run renders the same batches as an uninterrupted one), streaming the actor video once."""
    from tracking.align import ffhq_crop

    batches = [idx[s:s + batch].tolist() for s in range(0, len(idx), batch)]
    todo = [b for b in batches if not all(work.has(i) for i in b)]
    done = len(idx) - sum(len(b) for b in todo)
    if done:
        log(f"resuming: {done} of {len(idx)} frames already rendered")
    wanted = {i: k for k, b in enumerate(todo) for i in b}
    bar = _progress(len(idx), "rendering", initial=done)
    pending: dict[int, np.ndarray] = {}
    rendered = 0
    if todo:
        for frame in reader.frames(max_frames=len(params)):
            k = wanted.get(frame.index)
            if k is None:
                continue
            pending[frame.index] = ffhq_crop(frame.rgb, take.lmk[frame.index], size=FFHQ_SIZE)[0]
            b = todo[k]
            if frame.index != b[-1]:
                continue
            images = _render_batch(pipe, actor, np.stack([pending.pop(i) for i in b]), params[b], b, call, opts)
            for i, img in zip(b, images):
                work.save(i, img)
            rendered += len(b)
            bar.update(len(b))
    bar.close()
    return rendered


def _render_batch(pipe, actor, crops: np.ndarray, params: np.ndarray, idx: list[int], call: dict,
                  opts: RunOptions) -> list[np.ndarray]:
    """One batch: its per-frame references (writer once, batched), then the denoising loop; halves on
    out-of-memory as `retarget.run` does. crops, params: one row per frame of `idx`, in that order."""
    row = {f: k for k, f in enumerate(idx)}

    def render(sub: list[int]):
        rows = [row[f] for f in sub]
        framed = pipe.frame_references(actor, crops[rows], seed=opts.seed, ref_latent=opts.ref_latent) \
            if call["ref_strength"] > 0 else actor
        return pipe(framed, params[rows], frame_indices=sub, **call)

    return split_on_oom(render, idx)


def _driving_frames(reader, wanted: np.ndarray):
    """Yield the driving frame (RGB) of each wanted index, decoding again when the indices go back (loop)."""
    frames, current, pos = None, None, -1
    for w in wanted:
        if frames is None or w < pos:
            frames, pos = iter(reader), -1
        while pos < w:
            try:
                current = next(frames).rgb
            except StopIteration:
                break
            pos += 1
        yield current


def _write(reader, take: ActorTake, params: np.ndarray, work: WorkFolder, out: Path, opts: RunOptions,
           audio, preview: Path | None, driving) -> None:
    """Pass 3: every output frame: the rendered face pasted into its own actor frame, or the actor frame
    unchanged where the subject was not found. Outputs appear only when complete."""
    from contextlib import ExitStack

    from render.paste import paste_back
    from render.preview import side_by_side
    from render.storyboard import save_image
    from render.video import VideoWriter
    from tracking.align import ffhq_crop

    n = len(params)
    frames_dir = Path(opts.frames_dir) if opts.frames_dir else None
    if frames_dir:
        check_writable(frames_dir, "--frames-dir")
    dframes = _driving_frames(*driving) if driving else None
    with ExitStack() as stack:
        writer = stack.enter_context(VideoWriter(
            out, take.fps, audio_from=audio[0] if audio else None,
            audio_start=audio[1] if audio else 0.0, audio_end=audio[2] if audio else None))
        pwriter = stack.enter_context(VideoWriter(preview, take.fps)) if preview else None
        bar = _progress(n, "writing")
        for frame in reader.frames(max_frames=n):
            i = frame.index
            if take.valid[i]:
                face = work.load(i)
                crop, M = ffhq_crop(frame.rgb, take.lmk[i], size=FFHQ_SIZE)
                result = paste_back(frame.rgb, face, M, crop_size=FFHQ_SIZE) if opts.paste_back else face
            elif opts.paste_back:
                result = frame.rgb
            else:  # --crop-only: the aligned actor frame, at the generated size
                import cv2

                size = work.load(int(np.flatnonzero(take.valid)[0])).shape[0]
                crop = ffhq_crop(frame.rgb, take.lmk[i], size=FFHQ_SIZE)[0]
                result = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
            writer.write(result)
            if frames_dir:
                save_image(frames_dir / f"{i:06d}.png", result)
            if pwriter:
                panels, labels = [frame.rgb], ["actor"]
                if dframes is not None:
                    panels.append(next(dframes))
                    labels.append("driver")
                panels.append(result)
                labels.append("output")
                pwriter.write(side_by_side(panels, height=min(512, frame.rgb.shape[0]) // 2 * 2, labels=labels))
            bar.update(1)
        bar.close()
        if writer.frames_written != n:
            raise RetargetError(f"actor video {reader.path} gave {writer.frames_written} frames on a second "
                                f"read, {n} on the first: is it being written to?")
