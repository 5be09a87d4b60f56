"""Storyboard contact sheets (a grid of labelled frames) and atomic image files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from render.errors import RetargetError
from render.files import atomic_open
from render.preview import as_rgb, draw_text, resize_to


def cell_layout(cell: int) -> tuple[int, int, int]:
    """(gap, label_height, title_height) in pixels for a storyboard of `cell`-pixel cells."""
    return max(cell // 32, 2), max(cell // 8, 16), max(cell // 6, 24)


def storyboard(
    images: list[np.ndarray],
    labels: list[str],
    columns: int = 4,
    cell: int = 256,
    title: str | None = None,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    text_color: tuple[int, int, int] = (20, 20, 20),
) -> np.ndarray:
    """Lay images out in a grid, each with its label underneath, under an optional title bar.

    images: uint8 images (grey, RGB or RGBA), any sizes; each is fitted, aspect kept, into a
    `cell` x `cell` square and centred. labels: one string per image (may be empty).
    columns: cells per row (fewer if there are fewer images). Layout in pixels, with
    (gap, label_h, title_h) = `cell_layout(cell)`: a title bar of title_h rows when `title`
    is given, then rows of cells; cell (r, c) has its top-left corner at
    x = gap + c * (cell + gap), y = title_h + gap + r * (cell + label_h + gap), its label in
    the label_h rows below it. Returns (H, W, 3) uint8 RGB with H and W even.
    """
    if not images:
        raise RetargetError("storyboard needs at least one image")
    if len(labels) != len(images):
        raise RetargetError(f"{len(labels)} storyboard labels given for {len(images)} images")
    if columns < 1 or cell < 16:
        raise RetargetError(f"storyboard needs columns >= 1 and cell >= 16 px, got {columns} and {cell}")
    gap, label_h, title_h = cell_layout(cell)
    title_h = title_h if title else 0
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width = gap + columns * (cell + gap)
    height = title_h + gap + rows * (cell + label_h + gap)
    sheet = np.empty((height + height % 2, width + width % 2, 3), np.uint8)
    sheet[:] = background
    if title:
        sheet[:title_h] = (np.asarray(background, np.float64) * 0.85).astype(np.uint8)
        draw_text(sheet, title, (gap, 0, width - gap, title_h), color=text_color)
    for i, (image, label) in enumerate(zip(images, labels)):
        rgb = as_rgb(image, f"storyboard image {i}")
        r, c = divmod(i, columns)
        x = gap + c * (cell + gap)
        y = title_h + gap + r * (cell + label_h + gap)
        scale = cell / max(rgb.shape[:2])
        w = max(1, min(cell, int(round(rgb.shape[1] * scale))))
        h = max(1, min(cell, int(round(rgb.shape[0] * scale))))
        ox, oy = x + (cell - w) // 2, y + (cell - h) // 2
        sheet[oy:oy + h, ox:ox + w] = resize_to(rgb, w, h)
        draw_text(sheet, label, (x, y + cell, x + cell, y + cell + label_h), color=text_color)
    return sheet


def save_image(path: str | Path, rgb: np.ndarray, *, quality: int = 95) -> Path:
    """Write an RGB uint8 image as PNG or JPEG (chosen by the extension), atomically.

    path: .png, .jpg or .jpeg; its folder must exist. rgb: (H, W, 3) or (H, W) uint8.
    quality: JPEG quality 1-100. The bytes go to a temporary file in the same folder that is
    renamed over `path` only when complete, so a failure never leaves a partial file and
    never clobbers an existing one. Returns the path.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".png", ".jpg", ".jpeg"):
        raise RetargetError(f"{path}: image files must end in .png, .jpg or .jpeg")
    if not path.parent.is_dir():
        raise RetargetError(f"{path}: folder {path.parent} does not exist")
    image = np.asarray(rgb)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise RetargetError(f"{path}: expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    bgr = image if image.ndim == 2 else np.ascontiguousarray(image[:, :, ::-1])
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext != ".png" else []
    ok, encoded = cv2.imencode(ext, bgr, params)
    if not ok:
        raise RetargetError(f"{path}: could not encode the image as {ext}")
    try:
        with atomic_open(path, "wb") as fh:
            fh.write(encoded.tobytes())
    except OSError as exc:
        raise RetargetError(f"{path}: could not write the image ({exc.strerror or exc})") from None
    return path
