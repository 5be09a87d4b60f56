"""Atomic file writes: a temporary name beside the destination, renamed onto it when complete.

Every output of the toolkit goes through here (or, for videos, through the same naming), so an
interrupted or failed write never leaves a half-written file under the name the user asked for.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from render.errors import RetargetError


def partial_name(path: Path) -> Path:
    """The temporary name used while `path` is being written: hidden, same folder and suffix."""
    return path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs):
    """Open a temporary file beside `path` for writing; rename it onto `path` when the block
    succeeds, delete it when the block raises. RetargetError if the folder does not exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise RetargetError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = partial_name(path)
    try:
        # "x": a fresh file with the usual umask permissions (mkstemp would make it owner-only).
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
