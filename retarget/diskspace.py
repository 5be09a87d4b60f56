"""Free disk space against a job's estimated need, checked before any tracking or rendering.

The estimate is deliberately pessimistic (a full disk in the middle of a long render costs more
than a refused start): work-folder frames are counted as uncompressed RGB (PNG of a generated
face is 40-70 % of that), videos at 0.5 bytes per pixel per frame (H.264 at our CRF on faces
writes 0.02-0.2), kept PNG frames (--frames-dir) as uncompressed RGB. `bench/longclip.py`
prints the estimate beside what a run really used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from render.errors import RetargetError

VIDEO_BYTES_PER_PIXEL = 0.5
PNG_BYTES_PER_PIXEL = 3.0
MARGIN_BYTES = 64 << 20  # room for the track, manifest, partial files and the filesystem's own reserve


def estimate_run_bytes(n_frames: int, *, crop_size: int, out_size: tuple[int, int], work: Path, out: Path,
                       preview: bool = False, frames_dir: Path | None = None) -> dict[Path, int]:
    """Bytes a render of `n_frames` needs, per destination folder.

    crop_size: side of the generated face in pixels (the work folder's PNGs); out_size: (w, h)
    of the written video frames. All frames are in the work folder before the video is
    written, so the peak is work + video (+ preview, + frames_dir) even when the work folder
    is deleted at the end.
    Returns {folder: bytes}; folders on one filesystem are added up by `check_free_space`.
    """
    w, h = out_size
    needs: dict[Path, int] = {}

    def add(folder: Path, n: float) -> None:
        needs[folder] = needs.get(folder, 0) + int(n)

    add(work, n_frames * crop_size * crop_size * PNG_BYTES_PER_PIXEL + MARGIN_BYTES)
    add(out.parent, n_frames * w * h * VIDEO_BYTES_PER_PIXEL)
    if preview:
        add(out.parent, n_frames * (3 * w) * h * VIDEO_BYTES_PER_PIXEL)
    if frames_dir is not None:
        add(frames_dir, n_frames * w * h * PNG_BYTES_PER_PIXEL)
    return needs


def _existing(folder: Path) -> Path:
    folder = Path(folder).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_free_space(needs: dict[Path, int], what: str = "this job") -> None:
    """RetargetError when a filesystem has less free space than the folders on it need.

    needs: {folder (need not exist yet): bytes}. Folders on the same device are summed.
    """
    per_device: dict[int, list] = {}
    for folder, n in needs.items():
        base = _existing(folder)
        dev = os.stat(base).st_dev
        entry = per_device.setdefault(dev, [base, 0, []])
        entry[1] += n
        entry[2].append(str(folder))
    for base, n, folders in per_device.values():
        free = shutil.disk_usage(base).free
        if free < n:
            raise RetargetError(
                f"not enough free disk space for {what}: about {format_bytes(n)} needed in {', '.join(folders)}, "
                f"{format_bytes(free)} free there; free some space, or put the work folder on another disk "
                "(--work DIR), or render a shorter range (--start/--end)")
