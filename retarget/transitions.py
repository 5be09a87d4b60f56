"""Keyframe transitions authored with pictures: keyframe files whose keys take any expression
source, resolved to `tracking.keyframes.Keyframe`s, interpolated, and saved as a track file.

Keyframe file (JSON or YAML): a list of keys, or {"keyframes": [...]}. Each key:

    {"time": 1.5,                   # seconds, >= 0, increasing; required
     "source": "smile.jpg",         # any expression source (retarget.sources); default neutral
     "preset": "jaw_open",          # the older spelling of a preset source (not with "source")
     "hold": 0.5,                   # optional: seconds the expression stays still before moving on
     "expression": {"3": 1.5},      # optional overrides on top of the source, as in the
     "eyelids": 1, "jaw": 0.3}      #   keyframe format of tracking/keyframes.py

Paths are relative to the keyframe file. Errors name the file and the key ("keys.yaml:
keyframe 2: smile.jpg: no face found in the photo"), and every one of them comes before the
diffusion pipeline loads.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from retarget.sources import Source, parse_source

KEY_FIELDS = ("time", "source", "preset", "hold", "expression", "eyelids", "jaw")


@dataclass
class KeySpec:
    """One parsed key before its source is resolved. number: from 1."""

    number: int
    time_s: float
    hold_s: float
    source: Source
    overrides: dict
    where: str


@dataclass
class KeyFile:
    """A parsed keyframe file: name (for messages), keys in order, the text's SHA-256."""

    name: str
    keys: list[KeySpec]
    sha256: str
    path: Path | None = None


def _seconds(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RetargetError(f"{where} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def parse_keys(data, *, name: str = "keyframes", base: str | os.PathLike | None = None, sha256: str = "") -> KeyFile:
    """Keys from parsed JSON/YAML (a list, or {"keyframes": [...]}). Pure: no file is opened."""
    if isinstance(data, dict):
        if set(map(str, data)) != {"keyframes"}:
            raise RetargetError(f"{name}: expected a list of keyframes or {{\"keyframes\": [...]}}")
        data = data["keyframes"]
    if not isinstance(data, list) or not data:
        raise RetargetError(f"{name}: expected a non-empty list of keyframes")
    keys: list[KeySpec] = []
    for i, entry in enumerate(data):
        where = f"{name}: keyframe {i + 1}"
        if not isinstance(entry, dict):
            raise RetargetError(f"{where} must be a mapping like {{\"time\": 0.0, \"source\": \"smile.jpg\"}}")
        unknown = sorted(set(map(str, entry)) - set(KEY_FIELDS))
        if unknown:
            raise RetargetError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(KEY_FIELDS)}")
        if "time" not in entry:
            raise RetargetError(f"{where}: missing \"time\" (seconds)")
        if "source" in entry and "preset" in entry:
            raise RetargetError(f"{where}: give \"source\" or \"preset\", not both")
        time_s = _seconds(entry["time"], f"{where} time")
        hold_s = _seconds(entry.get("hold", 0.0), f"{where} hold")
        spec = entry.get("source", entry.get("preset", "neutral"))
        src = parse_source(spec, where=where, base=base)
        overrides = {k: entry[k] for k in ("expression", "eyelids", "jaw") if k in entry}
        if overrides:
            from tracking.keyframes import apply_numbers

            apply_numbers(np.zeros(55), overrides, where)  # malformed numbers fail here, before any I/O
        if keys and time_s <= keys[-1].time_s + keys[-1].hold_s:
            prev = keys[-1]
            after = f"{prev.time_s:g}s" + (f" + its hold {prev.hold_s:g}s" if prev.hold_s else "")
            raise RetargetError(f"{where}: time {time_s:g}s is not after keyframe {prev.number} ({after}); "
                                "times must increase")
        keys.append(KeySpec(i + 1, time_s, hold_s, src, overrides, where))
    return KeyFile(name, keys, sha256)


def load_keys(spec: str | os.PathLike) -> KeyFile:
    """Read a keyframe file (JSON or YAML; a string starting with [ or { is the text itself).
    RetargetError naming the file and line for unreadable files and syntax errors."""
    from retarget.documents import load_document

    data, text, path, name = load_document(spec, what="keyframe file", kind="JSON/YAML", inline="keyframes text")
    keys = parse_keys(data, name=name, base=path.parent if path else None,
                      sha256=hashlib.sha256(text.encode()).hexdigest())
    keys.path = path
    return keys


def resolve_keys(keyfile: KeyFile, *, layout=None, device: str = "cpu", log=None, presets=None) -> list:
    """The keys as tracking.keyframes.Keyframe (55 numbers each, holds kept): every source
    resolved (pictures tracked once, retarget.sources), then the key's overrides applied."""
    from retarget.sources import resolve_sources
    from tracking.keyframes import Keyframe, apply_numbers

    params = resolve_sources([k.source for k in keyfile.keys], layout=layout, device=device, log=log,
                             presets=presets)
    return [Keyframe(k.time_s, apply_numbers(p, k.overrides, k.where) if k.overrides else p, hold_s=k.hold_s)
            for k, p in zip(keyfile.keys, params)]


def transition_track_path(video: str | os.PathLike) -> Path:
    """Where the interpolated track goes: beside the video, `smile.mp4` -> `smile.track.npz`."""
    video = Path(video)
    return video.with_name(video.stem + ".track.npz")


def transition_track(times: np.ndarray, params: np.ndarray, fps: float, keyfile: KeyFile, easing: str):
    """The interpolated parameters as a track file (v1): every frame valid, raw = params, backend
    "keyframes", smoothing {"method": "none", "easing": ...}; `retarget run --track` renders it."""
    from tracking.track import Track

    p = np.asarray(params, np.float32)
    return Track(raw=p.copy(), params=p, valid=np.ones(len(p), bool), times=np.asarray(times, np.float64),
                 fps=float(fps), source=str(keyfile.path) if keyfile.path else keyfile.name,
                 source_sha256=keyfile.sha256, backend="keyframes", weights_id="",
                 smoothing={"method": "none", "easing": easing})


def describe_keys(keyfile: KeyFile) -> str:
    """'keys.yaml: 3 keyframes, 0-2.5 s (1 hold)' for logs."""
    last = keyfile.keys[-1]
    holds = sum(1 for k in keyfile.keys if k.hold_s > 0)
    return (f"{keyfile.name}: {len(keyfile.keys)} keyframes, {keyfile.keys[0].time_s:g}-"
            f"{last.time_s + last.hold_s:g} s" + (f" ({holds} with a hold)" if holds else ""))
