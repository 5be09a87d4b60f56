"""Expression sources as the app receives them: text typed in a table or a box, and pictures
uploaded beside it. The client can never name a server-side path: a text that names a file
must name one of this request's uploads (by its file name), and is then given to
`retarget.sources.parse_source` with the upload's own path. Presets and numbers pass as typed.
"""

from __future__ import annotations

import os
from pathlib import Path

from render.errors import RetargetError


def uploads_by_name(files) -> dict[str, Path]:
    """{file name: server path} of the uploaded files (gradio gives paths or objects with .name)."""
    out: dict[str, Path] = {}
    for f in files or []:
        p = Path(getattr(f, "name", f))
        out[p.name] = p
    return out


def app_spec(text: str, uploads: dict[str, Path], *, where: str) -> str:
    """The source text to hand to `retarget.sources` for `text` typed in the page: a preset name
    or numbers as typed; NAME / NAME@SEC / NAME#FRAME, where NAME is an uploaded file's name,
    with the upload's server path in place of NAME. RetargetError naming `where` for a path, an
    unknown file name or a malformed source (parsed here, before anything runs)."""
    from retarget.sources import parse_source

    text = str(text or "").strip()
    if not text:
        raise RetargetError(f"{where}: empty source")
    if text.startswith("{"):
        parse_source(text, where=where)
        return text
    name, sep, moment = text, "", ""
    cut = max(text.rfind("@"), text.rfind("#"))
    if cut > 0:
        name, sep, moment = text[:cut], text[cut], text[cut + 1:]
    if "/" in name or "\\" in name or name.startswith("~") or os.sep in name:
        raise RetargetError(f"{where}: {text!r}: name an uploaded file, not a path")
    if name in uploads:
        spec = f"{uploads[name]}{sep}{moment}"
    elif Path(name).suffix:
        known = ", ".join(sorted(uploads)) or "none"
        raise RetargetError(f"{where}: {text!r}: no uploaded file is called {name!r} (uploaded: {known})")
    else:
        spec = text
    parse_source(spec, where=where)
    return spec
