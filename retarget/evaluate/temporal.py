"""Temporal stability: how much the output's face changes from frame to frame (flicker), and how
much high-frequency motion its landmark and parameter signals carry (jitter), each against the
driving clip measured the same way."""

from __future__ import annotations

import numpy as np

from tracking.align import arcface_crop

FLICKER_SIZE = 56  # side of the grey aligned face patch compared between frames


def face_patch(rgb: np.ndarray, kps5: np.ndarray) -> np.ndarray:
    """The face aligned to the ArcFace 5-point template (so head motion is removed), grey, as
    (FLICKER_SIZE, FLICKER_SIZE) float32 in [0, 1]."""
    import cv2

    crop, _ = arcface_crop(rgb, kps5, size=112)
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, (FLICKER_SIZE, FLICKER_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def patch_change(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Mean absolute grey-level change between two face patches (0..1); NaN if either is missing."""
    if a is None or b is None:
        return float("nan")
    return float(np.abs(a - b).mean())
