"""Atomic file writes: a temporary name beside the destination, renamed onto it when complete.

Every output of the toolkit goes through here (or, for videos, through the same naming), so an
interrupted or failed write never leaves a half-written file under the name the user asked for.
"""

from __future__ import annotations

import errno
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from render.errors import DiskFullError, RetargetError


def partial_name(path: Path) -> Path:
    """The temporary name used while `path` is being written: hidden, same folder and suffix."""
    return path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs):
    """Open a temporary file beside `path` for writing; rename it onto `path` when the block
    succeeds, delete it when the block raises. RetargetError if the folder does not exist;
    DiskFullError (a RetargetError) when the disk fills up on the way."""
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while writing {path}: free some space and run again") from None
        raise


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # st_dev and st_ino: symbolic and hard links alike
    except (OSError, ValueError):  # one of them does not exist (or cannot be): compare resolved paths
        try:
            return a.resolve() == b.resolve()
        except (OSError, ValueError, RuntimeError):
            return False


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):  # e.g. a name too long to be a path (JSON text given inline)
        return False


def check_not_input(output: str | os.PathLike, inputs, *, option: str = "-o") -> None:
    """Refuse to write `output` when it is one of `inputs`: before any work, nothing touched.

    output: a file or folder the command is about to write (it need not exist yet).
    inputs: paths the command reads (None entries are skipped). A folder input (a folder of
    frames) also counts each file directly inside it as an input.
    The same file is recognised through symbolic links (paths resolved) and hard links (same
    st_dev and st_ino, `os.path.samefile`). Raises RetargetError with a one-line message that
    names `option` (e.g. "-o", "--preview", "--frames-dir"), ready for `error: ...`.
    """
    out = Path(output).expanduser()
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp).expanduser()
        if _same_file(out, inp):
            how = ""
            if out.is_symlink():
                how = " (a symbolic link to it)"
            elif out.resolve() != inp.resolve():
                how = " (a hard link to it)"
            raise RetargetError(f"{option} {out} is the input {inp}{how}: writing it would destroy the input; "
                                "choose another output name")
        if _is_dir(inp) and out.exists() and _same_file(out.parent, inp):
            raise RetargetError(f"{option} {out} is a file of the input folder {inp}: writing it would destroy "
                                "an input frame; choose another output name")
