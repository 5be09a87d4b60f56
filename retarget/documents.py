"""YAML/JSON documents the user writes (storyboard scripts, keyframe files): read and parsed in
one place, so that a missing file, an unreadable one and a syntax error read the same everywhere."""

from __future__ import annotations

import os
from pathlib import Path

from render.errors import RetargetError


def load_document(spec: str | os.PathLike, *, what: str, kind: str = "YAML", inline: str | None = None):
    """(data, text, path or None, name) of a YAML document (JSON is YAML too).

    spec: a file path, or, when `inline` names such texts in messages ("keyframes text"), the
    text itself if it starts with [ or {. what: how messages call the file ("storyboard script",
    "keyframe file"); kind: what a syntax error says it is not ("YAML", "JSON/YAML").
    RetargetError naming the file (and the line and column of a syntax error)."""
    import yaml

    if inline and isinstance(spec, str) and spec.lstrip()[:1] in ("[", "{"):
        path, name, text = None, inline, spec
    else:
        path = Path(spec)
        name = path.name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RetargetError(f"{what} {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RetargetError(f"{what} {path} is not readable ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RetargetError(f"{name}: not valid {kind}{at} ({problem})") from None
    return data, text, path, name
