"""Expression sources: the one place where "an expression" is parsed and turned into 55 numbers.

A source is what a user writes wherever an expression is wanted (storyboard panels, keyframes,
`retarget preset add`, the app):

| written as | kind | gives |
| --- | --- | --- |
| `smile.jpg` (any image extension) | photo | the tracked expression of its largest face |
| `clip.mp4@1.25` (seconds, `s` optional) | clip | the frame nearest that time, tracked |
| `clip.mp4#40` | clip | frame 40 (counting from 0), tracked |
| `drive.track.npz#40`, `drive.track.npz@1.25` | track | that row of the track's `params` (nearest time) |
| `jaw_open` (letters, digits, `_`, `-`) | preset | a built-in or user preset (retarget.presets) |
| `{"jaw": 0.2, "expression": {"3": 1.5}}` | numbers | neutral with those values (keyframe-file format), or `{"params": [55 numbers]}` |
| `{"preset": "smirk", "eyelids": 1}` | preset | a preset with those values written over it |

Three steps, so that every mistake is reported before any model loads:

- `parse_source(spec, where=..., base=...)`: pure parsing, no I/O.
- `check_sources(sources, presets=...)`: cheap checks (files exist and open, times within the
  clip, frames in range, presets exist, track files readable); no model is loaded.
- `resolve_sources(sources, layout=..., ...) -> (N, 55) float32`: loads the SMIRK encoder and
  the face backend once for all picture sources and tracks each picture through the same path
  as `retarget track` (detection, largest face, SMIRK crop, encoder; unsmoothed: one picture is
  one frame).

Every error is a RetargetError that starts with `where` (e.g. "panel 3", "keyframe 2") and the
source as written. Vector layout: FLAME expression 50 ++ eyelids 2 ++ jaw 3 (SPEC.md §3, §5).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from render.errors import RetargetError

N_PARAMS = 55
PHOTO, CLIP, TRACK, PRESET, NUMBERS = "photo", "clip", "track", "preset", "numbers"
KINDS = (PHOTO, CLIP, TRACK, PRESET, NUMBERS)
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
TRACK_EXTENSION = ".npz"
NUMBER_KEYS = ("preset", "params", "expression", "eyelids", "jaw")
HELP = ("a photo (smile.jpg), a clip moment (clip.mp4@1.25 seconds or clip.mp4#40 frame), a track file row "
        "(drive.track.npz#40 or @1.25), a preset name, or numbers ({\"jaw\": 0.2, \"expression\": {\"3\": 1.5}})")


def _image_extensions() -> set[str]:
    from render.video import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


@dataclass(frozen=True, eq=False)
class Source:
    """One parsed expression source.

    kind: one of KINDS. text: the source as written (numbers as compact JSON). where: the
    context for messages ("panel 3"). path: the file (photo, clip, track), already joined with
    the `base` folder. time_s / frame: the moment of a clip or track (one of them). name: the
    preset name. params: (55,) float32 for numbers. overrides: number fields written over a
    preset's values ({"preset": ..., "eyelids": 1}). spec: what was parsed (str or dict), to
    write back into scripts.
    """

    kind: str
    text: str
    where: str
    path: Path | None = None
    time_s: float | None = None
    frame: int | None = None
    name: str | None = None
    params: np.ndarray | None = None
    spec: object = field(default=None, repr=False)
    overrides: dict | None = None

    @property
    def label(self) -> str:
        """'panel 3: smile.jpg': how messages name this source."""
        return f"{self.where}: {self.text}" if self.where else self.text

    @property
    def needs_tracker(self) -> bool:
        """True for photos and clip moments (they load the SMIRK encoder and a face backend)."""
        return self.kind in (PHOTO, CLIP)

    @property
    def moment(self) -> str:
        return f"frame {self.frame}" if self.frame is not None else f"{self.time_s:g} s"

    def error(self, message: str) -> RetargetError:
        return RetargetError(f"{self.label}: {message}")


def input_paths(sources: Sequence[Source]) -> list[Path]:
    """The files the sources read (photos, clips, track files): for "never write over an input" checks."""
    return [s.path for s in sources if s.path is not None]


# --------------------------------------------------------------------------- parsing (pure)

def _moment(suffix: str, sep: str) -> float | int | None:
    """'1.25' / '1.25s' after '@' -> seconds; '40' after '#' -> frame; None when not a moment."""
    s = suffix.strip()
    if sep == "#":
        return int(s) if s.isdigit() else None
    if s.endswith("s"):
        s = s[:-1]
    try:
        t = float(s)
    except ValueError:
        return None
    return t if math.isfinite(t) else None


def _numbers(spec: dict, where: str, text: str) -> np.ndarray:
    from tracking.keyframes import apply_numbers

    label = f"{where}: {text}" if where else text
    unknown = sorted(set(map(str, spec)) - set(NUMBER_KEYS))
    if unknown:
        raise RetargetError(f"{label}: unknown field(s) {', '.join(unknown)} in numbers; allowed: "
                            f"{', '.join(NUMBER_KEYS)}")
    base = np.zeros(N_PARAMS, np.float64)
    if "params" in spec:
        p = spec["params"]
        if (not isinstance(p, (list, tuple)) or len(p) != N_PARAMS or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)):
            raise RetargetError(f"{label}: \"params\" must be a list of {N_PARAMS} finite numbers")
        base = np.asarray(p, np.float64)
    return apply_numbers(base, spec, label).astype(np.float32)


def _from_dict(spec: dict, where: str, text: str | None = None) -> Source:
    """Numbers, or a preset with number fields over it ({"preset": "smirk", "eyelids": 1})."""
    from retarget.presets import NAME_RE

    text = text or json.dumps(spec, separators=(", ", ": "))
    label = f"{where}: {text}" if where else text
    name = spec.get("preset")
    if name is not None and (not isinstance(name, str) or not NAME_RE.fullmatch(name)):
        raise RetargetError(f"{label}: \"preset\" must be a preset name, got {name!r}")
    if name is not None and "params" in spec:
        raise RetargetError(f"{label}: give \"preset\" or \"params\", not both")
    params = _numbers(spec, where, text)  # checks every field, also those over a preset
    if name is None:
        return Source(NUMBERS, text, where, params=params, spec=spec)
    overrides = {k: v for k, v in spec.items() if k != "preset"}
    return Source(PRESET, text, where, name=name, spec=spec, overrides=overrides or None)


def parse_source(spec: str | dict | os.PathLike, *, where: str = "", base: str | os.PathLike | None = None) -> Source:
    """Parse one source (see the module docstring for the forms). No file is touched.

    spec: the text (or a numbers dict, or a path). where: context for error messages, e.g.
    "panel 3". base: folder that relative paths are relative to (a script's folder; None:
    the current folder). Raises RetargetError naming `where` and the source for malformed specs.
    """
    if isinstance(spec, dict):
        return _from_dict(spec, where)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise RetargetError(f"{where or 'source'}: expected {HELP}; got {spec!r}")
    text = spec.strip()
    label = f"{where}: {text!r}" if where else repr(text)
    if not text:
        raise RetargetError(f"{where or 'source'}: empty source; expected {HELP}")
    if text[:1] == "{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RetargetError(f"{label}: not valid JSON numbers ({e.msg} at column {e.colno})") from None
        if not isinstance(data, dict):
            raise RetargetError(f"{label}: numbers must be a JSON object")
        return _from_dict(data, where, text)

    def joined(p: str) -> Path:
        path = Path(p).expanduser()
        return path if base is None or path.is_absolute() else Path(base) / path

    images = _image_extensions()
    cut = max(text.rfind("@"), text.rfind("#"))
    if cut > 0:
        head, sep, tail = text[:cut], text[cut], text[cut + 1:]
        value = _moment(tail, sep)
        ext = Path(head).suffix.lower()
        if value is not None and (ext in VIDEO_EXTENSIONS or ext == TRACK_EXTENSION):
            if sep == "@" and value < 0:
                raise RetargetError(f"{label}: time must be >= 0 seconds")
            kind = TRACK if ext == TRACK_EXTENSION else CLIP
            return Source(kind, text, where, path=joined(head), spec=text,
                          time_s=float(value) if sep == "@" else None, frame=int(value) if sep == "#" else None)
        if value is not None and ext in images:
            raise RetargetError(f"{label}: a photo has no time or frame; write just the file name")
        if value is None and (ext in VIDEO_EXTENSIONS or ext == TRACK_EXTENSION):
            want = "a frame number" if sep == "#" else "seconds"
            raise RetargetError(f"{label}: expected {want} after {sep!r}, e.g. {head}@1.25 or {head}#40")
    ext = Path(text).suffix.lower()
    if ext in images:
        return Source(PHOTO, text, where, path=joined(text), spec=text)
    if ext in VIDEO_EXTENSIONS:
        raise RetargetError(f"{label}: say which moment of the clip: {text}@SECONDS or {text}#FRAME")
    if ext == TRACK_EXTENSION:
        raise RetargetError(f"{label}: say which row of the track: {text}@SECONDS or {text}#FRAME")
    from retarget.presets import NAME_RE

    if NAME_RE.fullmatch(text):
        return Source(PRESET, text, where, name=text, spec=text)
    raise RetargetError(f"{label}: not an expression source; expected {HELP}")


# --------------------------------------------------------------------------- checks (cheap I/O)

class _Opened:
    """Clips and tracks opened once while checking and resolving several sources."""

    def __init__(self):
        self.readers: dict[Path, object] = {}
        self.tracks: dict[Path, object] = {}

    def reader(self, src: Source):
        from render.video import open_video

        if src.path not in self.readers:
            if not src.path.is_file():
                raise src.error(f"clip {src.path} does not exist")
            try:
                self.readers[src.path] = open_video(src.path)
            except RetargetError as e:
                raise src.error(str(e)) from None
        return self.readers[src.path]

    def track(self, src: Source):
        from tracking.track import Track

        if src.path not in self.tracks:
            if not src.path.is_file():
                raise src.error(f"track file {src.path} does not exist")
            try:
                self.tracks[src.path] = Track.load(src.path)
            except RetargetError as e:
                raise src.error(str(e)) from None
        return self.tracks[src.path]


def _check_photo(src: Source) -> None:
    from PIL import Image, UnidentifiedImageError

    if not src.path.is_file():
        raise src.error(f"photo {src.path} does not exist")
    try:
        with Image.open(src.path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise src.error(f"photo {src.path} is not a readable image ({type(e).__name__})") from None


def _track_row(src: Source, track) -> int:
    n = len(track.times)
    if src.frame is not None:
        if not 0 <= src.frame < n:
            raise src.error(f"frame {src.frame} is out of range: the track has {n} frames (0-{n - 1})")
        return src.frame
    last = float(track.times[-1]) + 1.0 / max(track.fps, 1e-6)
    if src.time_s > last + 1e-6:
        raise src.error(f"time {src.time_s:g} s is beyond the track's end ({last:.2f} s)")
    return int(np.argmin(np.abs(track.times - src.time_s)))


def _check_clip(src: Source, reader) -> None:
    if src.frame is not None:
        if reader.frame_count > 0 and src.frame >= reader.frame_count:
            raise src.error(f"frame {src.frame} is out of range: the clip has {reader.frame_count} frames "
                            f"(0-{reader.frame_count - 1})")
    elif reader.duration_s > 0 and src.time_s > reader.duration_s + 1e-6:
        raise src.error(f"time {src.time_s:g} s is beyond the clip's end ({reader.duration_s:.2f} s)")


def check_sources(sources: Sequence[Source], *, presets=None, _opened: _Opened | None = None) -> None:
    """Cheap validation of parsed sources, before any model loads: photos exist and are images,
    clips open and the time/frame lies within them, track files load and the row exists, presets
    exist in `presets` (a retarget.presets.PresetLibrary; default: the user's library).
    Raises RetargetError naming the first bad source's `where`."""
    from retarget.presets import PresetLibrary

    opened = _opened or _Opened()
    library = None
    for src in sources:
        if src.kind == PHOTO:
            _check_photo(src)
        elif src.kind == CLIP:
            _check_clip(src, opened.reader(src))
        elif src.kind == TRACK:
            _track_row(src, opened.track(src))
        elif src.kind == PRESET:
            library = library or presets or PresetLibrary()
            if src.name not in library:
                raise src.error(f"unknown preset; known: {', '.join(library.names())} (user presets in "
                                f"{library.folder})")


# --------------------------------------------------------------------------- resolving

def clip_frame(path: Path, reader, *, time_s: float | None = None, frame: int | None = None):
    """The decoded frame (render.video.VideoFrame) of a clip at `time_s` (the frame nearest in
    time) or index `frame` (counting from 0), or None when the clip has no such frame.

    The one place a clip moment is decoded, so that a faster seek can replace it."""
    if frame is not None:
        for f in reader.frames(max_frames=frame + 1):
            if f.index == frame:
                return f
        return None
    # Frames at or after t - half a frame: the first is the nearest one (the one before is
    # compared too, for variable frame rates).
    start = max(0.0, time_s - 1.0 / max(reader.fps, 1e-6))
    best = None
    try:
        for f in reader.frames(start_s=start, max_frames=3):
            if best is None or abs(f.time_s - time_s) < abs(best.time_s - time_s):
                best = f
    except RetargetError:
        return None
    return best


def _face_report(faces: list, face, backend: str) -> str:
    box = ", ".join(f"{v:.0f}" for v in face.bbox)
    if len(faces) == 1:
        return f"1 face found (bbox {box}, {backend})"
    return f"{len(faces)} faces found; using the largest (bbox {box}, {backend})"


def resolve_sources(sources: Sequence[Source], *, layout=None, device: str = "cpu", progress: bool = False,
                    presets=None, log: Callable[[str], object] | None = None, backend=None,
                    encoder=None) -> np.ndarray:
    """The 55 numbers of every source: (N, 55) float32, in the order given.

    layout: a retarget.weights.WeightsLayout (needed only when a photo or clip is among the
    sources: its SMIRK checkpoint and, when present, MediaPipe's landmarker). device: where the
    encoder runs ("cpu", "cuda", "auto"). presets: a PresetLibrary (default: the user's).
    log: receives one line per picture, naming the source and the faces found (the largest is
    used, as `retarget track` does). backend / encoder: an already built face backend and
    SMIRK encoder to reuse (the app keeps them loaded). progress: a bar over the pictures.
    Runs `check_sources` first. Pictures are tracked as `retarget track` tracks one image
    (no smoothing: one picture is one frame); crops are encoded in batches of 8 (64 on GPU),
    so values equal the tracker's within float rounding of batch shape (~2e-5).
    Raises RetargetError naming the source (e.g. "panel 3: smile.jpg: no face found ...").
    """
    from retarget.presets import PresetLibrary

    opened = _Opened()
    library = presets or (PresetLibrary() if any(s.kind == PRESET for s in sources) else None)
    check_sources(sources, presets=library, _opened=opened)
    out = np.zeros((len(sources), N_PARAMS), np.float32)
    pictures: list[int] = []
    for i, src in enumerate(sources):
        if src.kind == NUMBERS:
            out[i] = src.params
        elif src.kind == PRESET:
            from tracking.keyframes import apply_numbers

            base = library.get(src.name).params
            out[i] = apply_numbers(base, src.overrides, src.label) if src.overrides else base
        elif src.kind == TRACK:
            track = opened.track(src)
            out[i] = track.params[_track_row(src, track)]
        else:
            pictures.append(i)
    if not pictures:
        return out

    import torch

    from render.video import open_video
    from tracking.encode_thread import encode_batch
    from tracking.faces import follow_subject
    from tracking.smirk import load_smirk_encoder
    from tracking.tracker import default_backend_factory, encoder_crop, resolve_device

    dev = resolve_device(device)
    if encoder is None:
        if layout is None:
            raise RetargetError(f"{sources[pictures[0]].label}: tracking a picture needs the weights folder")
        encoder = load_smirk_encoder(layout.require("smirk_ckpt"), device=dev, dtype=torch.float32)
    if backend is None:
        backend = default_backend_factory(layout.optional("face_landmarker") if layout is not None else None)()
    crops: list[np.ndarray] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pictures), desc="tracking pictures", unit="picture", disable=not progress)
    for i in pictures:
        src = sources[i]
        if src.kind == PHOTO:
            try:
                frame = next(iter(open_video(src.path)))
            except RetargetError as e:
                raise src.error(str(e)) from None
            what = "the photo"
        else:
            frame = clip_frame(src.path, opened.reader(src), time_s=src.time_s, frame=src.frame)
            if frame is None:
                raise src.error(f"the clip has no {src.moment}")
            what = f"the frame at {frame.time_s:.2f} s" if src.frame is None else f"frame {src.frame}"
        # IMAGE mode for MediaPipe: each picture stands alone (no timestamps across pictures).
        faces = backend.detect(frame.rgb)
        face = follow_subject(faces, None)
        if face is None:
            raise src.error(f"no face found in {what} (face backend: {backend.name}); use a picture with one "
                            "clearly visible face")
        if log is not None:
            log(f"{src.label}: {_face_report(faces, face, backend.name)}")
        crops.append(encoder_crop(frame.rgb, face))
        bar.update(1)
    bar.close()
    batch = 64 if dev == "cuda" else 8
    for s in range(0, len(crops), batch):
        vecs = encode_batch(encoder, np.stack(crops[s:s + batch]), batch if dev == "cuda" else 0)
        for j, vec in zip(pictures[s:s + batch], vecs):
            out[j] = vec
    return out


def resolve_specs(specs: Sequence, *, where: str | Sequence[str] = "source", base=None, **kwargs) -> np.ndarray:
    """parse_source on each spec (where: one prefix numbered from 1, or one string per spec),
    then resolve_sources(**kwargs): the shortest way from texts to (N, 55) numbers."""
    wheres = [f"{where} {i + 1}" for i in range(len(specs))] if isinstance(where, str) else list(where)
    return resolve_sources([parse_source(s, where=w, base=base) for s, w in zip(specs, wheres)], **kwargs)
