"""The preset library: named 55-d expressions, built in or saved by the user.

Built-in presets are `tracking.keyframes.PRESETS` (they cannot be removed or replaced). User
presets live in one folder, `$RETARGET_PRESETS`, else the platform's user config folder
(`platformdirs.user_config_dir("retarget")/presets`, e.g. ~/.config/retarget/presets on
Linux), one small JSON file per preset, `<name>.json`, format version 1:

    {"format": "retarget-preset", "version": 1,
     "name": "crooked_smile",             # [A-Za-z0-9][A-Za-z0-9_-]*, at most 64 characters
     "note": "left corner up",            # free text ("" when none)
     "source": "smile.jpg",               # where the numbers came from, as the user wrote it
     "created": "2026-12-03T11:50:00Z",   # UTC, ISO 8601
     "weights_id": "SMIRK_em1.pt:sha256:...",  # the tracker's weights for picture sources, else ""
     "params": [55 numbers]}              # FLAME expression 50 ++ eyelids 2 ++ jaw 3 (SPEC.md §3)

Writes are atomic (a temporary file renamed over the name), so a crash never leaves half a preset.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from render.errors import RetargetError

FORMAT = "retarget-preset"
VERSION = 1
N_PARAMS = 55
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def default_presets_dir() -> Path:
    """`$RETARGET_PRESETS`, else `<platform user config folder>/retarget/presets`."""
    env = os.environ.get("RETARGET_PRESETS")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("retarget", appauthor=False)) / "presets"


def check_name(name: str, what: str = "preset name") -> str:
    """`name` if it is a valid preset name, else RetargetError saying what a name may hold."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise RetargetError(f"{what} {name!r}: use letters, digits, '_' and '-' (at most 64, starting with a "
                            "letter or digit)")
    return name


@dataclass(frozen=True)
class Preset:
    """One named expression. params: (55,) float32. builtin: shipped with retarget (read-only).
    path: its JSON file (None for built-ins)."""

    name: str
    params: np.ndarray
    note: str = ""
    source: str = ""
    created: str = ""
    weights_id: str = ""
    builtin: bool = False
    path: Path | None = None

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "note": self.note, "source": self.source,
                "created": self.created, "weights_id": self.weights_id,
                "params": [float(v) for v in np.asarray(self.params, np.float32)]}

    def summary(self) -> str:
        """'jaw 0.25 open, eyelids 0.00/0.00, |expression| 1.23'."""
        p = np.asarray(self.params, np.float64)
        return (f"jaw {p[52]:.2f} ({p[53]:+.2f}, {p[54]:+.2f}), eyelids {p[50]:.2f}/{p[51]:.2f}, "
                f"|expression| {np.linalg.norm(p[:50]):.2f}")


def _builtins() -> dict[str, Preset]:
    from tracking.keyframes import PRESETS

    return {name: Preset(name, np.asarray(p, np.float32), note="built in", source="built in", builtin=True)
            for name, p in PRESETS.items()}


def read_preset_file(path: Path) -> Preset:
    """Load one preset JSON file; RetargetError naming the file when it is not a v1 preset."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RetargetError(f"preset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RetargetError(f"preset file {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RetargetError(f"preset file {path} is not a retarget preset (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise RetargetError(f"preset file {path} has version {data.get('version')!r}; this retarget reads "
                            f"version {VERSION}")
    params = data.get("params")
    if (not isinstance(params, list) or len(params) != N_PARAMS
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in params)):
        raise RetargetError(f"preset file {path}: \"params\" must be {N_PARAMS} finite numbers")
    name = str(data.get("name", Path(path).stem))
    return Preset(name, np.asarray(params, np.float32), note=str(data.get("note", "")),
                  source=str(data.get("source", "")), created=str(data.get("created", "")),
                  weights_id=str(data.get("weights_id", "")), builtin=False, path=Path(path))


class PresetLibrary:
    """Built-in presets plus the user's folder (`folder`, default `default_presets_dir()`).

    A user preset never shadows a built-in one: `add` refuses built-in names.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder).expanduser() if folder is not None else default_presets_dir()
        self.builtins = _builtins()

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def user_names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.json") if NAME_RE.fullmatch(p.stem))

    def names(self) -> list[str]:
        """Built-in names (in their order), then user presets (sorted)."""
        return list(self.builtins) + [n for n in self.user_names() if n not in self.builtins]

    def __contains__(self, name: str) -> bool:
        return name in self.builtins or (NAME_RE.fullmatch(str(name)) is not None and self._path(name).is_file())

    def get(self, name: str) -> Preset:
        """The preset called `name`; RetargetError listing the known names when there is none."""
        if name in self.builtins:
            return self.builtins[name]
        if NAME_RE.fullmatch(str(name)) and self._path(name).is_file():
            return read_preset_file(self._path(name))
        raise RetargetError(f"unknown preset {name!r}; known: {', '.join(self.names())} "
                            f"(user presets in {self.folder})")

    def all(self) -> list[Preset]:
        return [self.get(n) for n in self.names()]

    def add(self, name: str, params: np.ndarray, *, note: str = "", source: str = "",
            weights_id: str = "") -> tuple[Preset, bool]:
        """Save a user preset (atomic write). Returns (preset, replaced): replaced is True when a
        user preset of that name existed and was overwritten. Built-in names are refused."""
        check_name(name)
        if name in self.builtins:
            raise RetargetError(f"preset {name!r} is built in and cannot be replaced; choose another name")
        p = np.asarray(params, np.float32).reshape(-1)
        if p.shape != (N_PARAMS,) or not np.isfinite(p).all():
            raise RetargetError(f"preset {name!r}: expected {N_PARAMS} finite numbers, got shape {p.shape}")
        from render.files import atomic_open

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RetargetError(f"preset folder {self.folder} cannot be created ({e.strerror or e})") from None
        path = self._path(name)
        replaced = path.is_file()
        preset = Preset(name, p, note=note, source=source, weights_id=weights_id,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), path=path)
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(preset.to_json(), indent=1) + "\n")
        return preset, replaced

    def remove(self, name: str) -> Path:
        """Delete a user preset's file; RetargetError for built-ins and unknown names."""
        if name in self.builtins:
            raise RetargetError(f"preset {name!r} is built in and cannot be removed")
        path = self._path(check_name(name))
        if not path.is_file():
            raise RetargetError(f"no user preset {name!r} in {self.folder}")
        path.unlink()
        return path
