"""Side-by-side preview frames (driver | mesh | result ...) and the text drawing they share."""

from __future__ import annotations

import cv2
import numpy as np

from render.errors import RetargetError

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def as_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB from an (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 array."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise RetargetError(f"{name} must be a non-empty uint8 image, got shape {image.shape} dtype {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if image.shape[2] != 3:
        raise RetargetError(f"{name} must have 1, 3 or 4 channels, got {image.shape[2]}")
    return image


def resize_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize with area averaging when shrinking (no aliasing) and bilinear when enlarging."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    shrink = width < image.shape[1] or height < image.shape[0]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def draw_text(
    image: np.ndarray,
    text: str,
    box: tuple[int, int, int, int],
    *,
    color: tuple[int, int, int] = (255, 255, 255),
    align: str = "center",
) -> None:
    """Draw one line of text inside box = (x0, y0, x1, y1) of an RGB uint8 image, in place.

    The font scale is the largest that fits the box height and width (down to a legible
    minimum; longer text is cut with '..'). Hershey fonts are ASCII-only: other characters
    are drawn as '?'.
    """
    x0, y0, x1, y1 = box
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))
    if not text or x1 - x0 < 4 or y1 - y0 < 6:
        return
    box_w, box_h = x1 - x0, y1 - y0
    thickness = 1 if box_h < 40 else 2
    (_, base_h), _ = cv2.getTextSize("Hg", _FONT, 1.0, thickness)
    scale = max(0.7 * box_h / base_h, 0.3)
    (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    if tw > box_w - 4:
        shrink = max((box_w - 4) / tw, 0.0)
        scale = max(scale * shrink, 0.3)
        (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        while tw > box_w - 4 and len(text) > 1:
            text = text[:-3] + ".." if len(text) > 3 else text[:-1]
            (tw, th), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    x = x0 + (box_w - tw) // 2 if align == "center" else x0 + 2
    y = y0 + (box_h + th) // 2
    cv2.putText(image, text, (x, y), _FONT, scale, color, thickness, cv2.LINE_AA)


def side_by_side(
    panels: list[np.ndarray],
    height: int,
    labels: list[str] | None = None,
    *,
    gap: int = 8,
    background: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Join panels left to right at a common height, for preview videos.

    panels: uint8 images (grey, RGB or RGBA), any sizes; each is resized to `height` rows
    keeping its aspect ratio. height: output rows, must be even (H.264 with yuv420p).
    labels: optional text per panel, drawn on a dark strip across the panel's top.
    gap: background columns between panels. Returns (height, W, 3) uint8 RGB with W even
    (a background column is added on the right when needed).
    """
    if not panels:
        raise RetargetError("side_by_side needs at least one panel")
    if height < 2 or height % 2:
        raise RetargetError(f"preview height must be a positive even number (H.264), got {height}")
    if labels is not None and len(labels) != len(panels):
        raise RetargetError(f"{len(labels)} labels given for {len(panels)} panels")
    resized = []
    for i, panel in enumerate(panels):
        rgb = as_rgb(panel, f"preview panel {i}")
        width = max(1, int(round(rgb.shape[1] * height / rgb.shape[0])))
        resized.append(resize_to(rgb, width, height))
    total = sum(p.shape[1] for p in resized) + gap * (len(resized) - 1)
    total += total % 2
    out = np.empty((height, total, 3), np.uint8)
    out[:] = background
    x = 0
    strip = max(height // 14, 12)
    for i, panel in enumerate(resized):
        w = panel.shape[1]
        out[:, x:x + w] = panel
        if labels is not None and labels[i]:
            # Darken rather than cover the strip, so the panel stays visible behind the text.
            region = out[:strip, x:x + w]
            region[:] = (region.astype(np.uint16) * 2 // 5).astype(np.uint8)
            draw_text(out, labels[i], (x, 0, x + w, strip))
        x += w + gap
    return out
