"""Checks on every uploaded file, before any model runs: type, size, duration, readability.

The messages are the CLI's own where the CLI has one (the same `read_image` / `open_video`
errors), so a bad upload reads the same in the page as on the terminal.
"""

from __future__ import annotations

import os
from pathlib import Path

from render.errors import RetargetError
from retarget.app.config import PHOTO_TYPES, VIDEO_TYPES, AppOptions


def _common(path: str | os.PathLike | None, what: str, types: tuple[str, ...], cfg: AppOptions) -> Path:
    if not path:
        raise RetargetError(f"{what}: nothing uploaded")
    p = Path(path)
    if not p.is_file():
        raise RetargetError(f"{what} {p.name}: the upload is missing (upload it again)")
    if p.suffix.lower() not in types:
        raise RetargetError(f"{what} {p.name}: {p.suffix or 'no extension'} is not accepted; "
                            f"use {', '.join(types)}")
    size_mb = p.stat().st_size / 1e6
    if size_mb > cfg.max_upload_mb:
        raise RetargetError(f"{what} {p.name}: {size_mb:.0f} MB is over the {cfg.max_upload_mb:g} MB limit")
    return p


def check_photo(path, cfg: AppOptions, what: str = "actor photo") -> Path:
    """The uploaded photo's path once it is an accepted type, size and readable image."""
    from retarget.run import read_image

    p = _common(path, what, PHOTO_TYPES, cfg)
    rgb = read_image(p, what)
    if max(rgb.shape[:2]) > cfg.max_photo_px:
        raise RetargetError(f"{what} {p.name}: {rgb.shape[1]}x{rgb.shape[0]} is over the "
                            f"{cfg.max_photo_px} px limit")
    return p


def check_video(path, cfg: AppOptions, what: str = "driving video") -> Path:
    """The uploaded clip's path once it is an accepted type, size, duration and decodable video."""
    from render.video import open_video

    p = _common(path, what, VIDEO_TYPES, cfg)
    reader = open_video(p)
    if reader.kind != "video":
        raise RetargetError(f"{what} {p.name}: not a video")
    duration = reader.duration_s or (reader.frame_count / reader.fps if reader.fps else 0.0)
    if duration > cfg.max_video_s:
        raise RetargetError(f"{what} {p.name}: {duration:.0f} s is over the {cfg.max_video_s:g} s limit")
    return p
