"""Paste a generated, FFHQ-aligned face back into the full-resolution photo or frame.

The pipeline generates faces in the aligned crop space of `tracking.align.ffhq_align_exact`
(`ffhq_crop` keeps the same convention), whose matrix `M` maps photo pixels to crop pixels.
Pasting back is the inverse warp, blended through a feathered mask defined in crop space,
after matching the generated face's colour to the photo around the seam so that the border
does not show.
"""

from __future__ import annotations

import cv2
import numpy as np

from render.errors import RetargetError

# The face region of an FFHQ-aligned crop, as fractions of the crop size. The FFHQ quad puts
# the eyes just above the centre (about 0.48 of the height, 0.34 of the width apart), the
# mouth at about 0.69 and the chin at about 0.91 (measured on dlib landmarks of a real
# photo); this ellipse spans forehead to just below the chin and cheek to cheek.
_FACE_CENTER = (0.5, 0.55)
_FACE_AXES = (0.31, 0.39)


def _as_rgb_u8(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise RetargetError(
            f"{name} must be an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}"
        )
    return image


def _region(size: int, landmarks: np.ndarray | None) -> np.ndarray:
    """Binary (size, size) uint8 face region: landmark hull if given, else the FFHQ ellipse."""
    region = np.zeros((size, size), np.uint8)
    if landmarks is None:
        center = (_FACE_CENTER[0] * size - 0.5, _FACE_CENTER[1] * size - 0.5)
        axes = (_FACE_AXES[0] * size, _FACE_AXES[1] * size)
        # Sub-pixel precision via `shift`, so small (64 px) crops get a smooth ellipse too.
        shift = 4
        cv2.ellipse(
            region,
            (int(round(center[0] * 16)), int(round(center[1] * 16))),
            (int(round(axes[0] * 16)), int(round(axes[1] * 16))),
            0, 0, 360, 1, thickness=-1, lineType=cv2.LINE_8, shift=shift,
        )
        return region
    pts = np.asarray(landmarks, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
        raise RetargetError(f"mask landmarks must be (N>=3, 2) finite points, got {pts.shape}")
    hull = cv2.convexHull(np.round(pts * 16).astype(np.int32))
    cv2.fillConvexPoly(region, hull, 1, lineType=cv2.LINE_8, shift=4)
    return region


def _inside_distance(region: np.ndarray) -> np.ndarray:
    """Distance in pixels from each inside pixel to the nearest outside pixel (0 outside)."""
    # Pad so that the crop border counts as outside: a face touching the crop edge still fades.
    padded = np.pad(region, 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)
    return dist[1:-1, 1:-1]


def face_mask(size: int, landmarks: np.ndarray | None = None, *, feather: float = 0.08) -> np.ndarray:
    """Feathered face mask of an aligned crop.

    size: crop side in pixels. landmarks: optional (N, 2) crop-space pixel points whose convex
    hull is the face region; default is a forehead-to-chin ellipse of the FFHQ-aligned crop.
    feather: width of the fade, as a fraction of `size` (0 gives a hard edge).
    Returns float32 (size, size) in [0, 1]: 1 deep inside the region, falling smoothly to 0
    at the region border and exactly 0 outside it.
    """
    if size < 4:
        raise RetargetError(f"face mask size must be at least 4 pixels, got {size}")
    if not 0.0 <= feather < 0.5:
        raise RetargetError(f"feather must be in [0, 0.5), got {feather}")
    region = _region(int(size), landmarks)
    width = feather * size
    if width < 1.0:
        return region.astype(np.float32)
    ramp = np.clip(_inside_distance(region) / width, 0.0, 1.0)
    # Smoothstep: no visible kink where the fade meets the solid interior.
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)


def _crop_to_face(M: np.ndarray, crop_size: int, face_size: int) -> np.ndarray:
    """Rescale a target->crop matrix to target->generated-image pixels (pixel centres kept)."""
    s = face_size / crop_size
    # x_face = (x_crop + 0.5) * s - 0.5: the same point of the image, at another resolution.
    scale = np.array([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5], [0, 0, 1.0]])
    return (scale @ np.vstack([M, [0.0, 0.0, 1.0]]))[:2]


def _ring_stats(lab: np.ndarray, ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the LAB pixels under `ring` (bool (S, S))."""
    px = lab[ring]
    return px.mean(0), px.std(0)


def _match_color(face: np.ndarray, target_stats: tuple[np.ndarray, np.ndarray], ring: np.ndarray) -> np.ndarray:
    """Shift/scale the face's LAB channels so that its ring statistics equal the target's.

    face: float32 (S, S, 3) RGB in [0, 1]; target_stats: (mean, std) of the target's LAB under
    the ring (`_ring_stats`); ring: bool (S, S). Returns float32 RGB in [0, 1]. The std ratio
    is clamped to [0.5, 2]: a ring over a flat background would otherwise blow up the face's contrast.
    """
    face_lab = cv2.cvtColor(face, cv2.COLOR_RGB2LAB)
    f_mean, f_std = _ring_stats(face_lab, ring)
    t_mean, t_std = target_stats
    ratio = np.clip(t_std / np.maximum(f_std, 1e-3), 0.5, 2.0)
    matched = (face_lab - f_mean) * ratio + t_mean
    matched[..., 0] = np.clip(matched[..., 0], 0.0, 100.0)
    return np.clip(cv2.cvtColor(matched.astype(np.float32), cv2.COLOR_LAB2RGB), 0.0, 1.0)


def paste_back(
    target_rgb: np.ndarray,
    face_rgb: np.ndarray,
    M: np.ndarray,
    *,
    crop_size: int | None = None,
    feather: float = 0.08,
    color_match: bool = True,
    mask_landmarks: np.ndarray | None = None,
) -> np.ndarray:
    """Warp a generated aligned face back into the photo it was cropped from.

    target_rgb: (H, W, 3) uint8 RGB photo or video frame. face_rgb: (S, S, 3) uint8 RGB
    generated face, aligned like the crop. M: 2x3 matrix mapping target pixel coordinates to
    crop pixel coordinates for a crop of `crop_size` pixels (default S); when the generated
    image has another resolution than that crop (tiny weights: 64 px for a 512 px crop) the
    matrix is rescaled. feather: fade width as a fraction of the crop. color_match: match the
    face's per-channel LAB mean/std to the target in a ring just inside the mask border before
    blending. mask_landmarks: optional (N, 2) crop-space points (in `crop_size` pixels) whose
    hull is the pasted region instead of the default FFHQ face ellipse.
    Returns a new (H, W, 3) uint8 array; pixels outside the warped mask are the target's
    pixels, bit for bit. For many faces into one photo, `Paster` does the photo's share once.
    """
    target = _as_rgb_u8(target_rgb, "target image")
    face = _as_rgb_u8(face_rgb, "generated face")
    if face.shape[1] != face.shape[0]:
        raise RetargetError(f"generated face must be square, got {face.shape[1]}x{face.shape[0]}")
    return Paster(target, M, face.shape[0], crop_size=crop_size, feather=feather, color_match=color_match,
                  mask_landmarks=mask_landmarks).paste(face)


class Paster:
    """`paste_back` into one photo, many times: the mask, the region of interest, the warped
    mask and the photo's colour statistics are computed once here; `paste(face)` does only the
    face's share (colour match, warp into the region, blend). The same pixels as `paste_back`.

    target_rgb, M, crop_size, feather, color_match, mask_landmarks: as `paste_back`; size: the
    generated faces' side S in pixels.
    """

    def __init__(self, target_rgb: np.ndarray, M: np.ndarray, size: int, *, crop_size: int | None = None,
                 feather: float = 0.08, color_match: bool = True, mask_landmarks: np.ndarray | None = None):
        target = _as_rgb_u8(target_rgb, "target image")
        M = np.asarray(M, np.float64)
        if M.shape != (2, 3) or not np.isfinite(M).all():
            raise RetargetError(f"alignment matrix must be a finite 2x3 matrix, got shape {M.shape}")
        crop_size = size if crop_size is None else int(crop_size)
        if crop_size <= 0:
            raise RetargetError(f"crop_size must be positive, got {crop_size}")
        if abs(np.linalg.det(M[:, :2])) < 1e-12:
            raise RetargetError("alignment matrix is singular; the face crop cannot be inverted")
        self.target, self.size = target, int(size)
        self.box = None  # (x0, y0, x1, y1) of the region of interest; None: nothing to paste

        M_face = _crop_to_face(M, crop_size, size)
        landmarks = None
        if mask_landmarks is not None:
            pts = np.asarray(mask_landmarks, np.float64)
            s = size / crop_size
            landmarks = (pts + 0.5) * s - 0.5
        mask = face_mask(size, landmarks, feather=feather)

        # Work only inside the target-space bounding box of the mask's support: a 4K frame with a
        # small face costs as much as the face, and everything outside stays untouched.
        ys, xs = np.nonzero(mask > 0)
        if len(xs) == 0:
            return
        corners = np.array(
            [[xs.min() - 1, ys.min() - 1], [xs.max() + 1, ys.min() - 1],
             [xs.min() - 1, ys.max() + 1], [xs.max() + 1, ys.max() + 1]], np.float64,
        )
        inv = cv2.invertAffineTransform(M_face)
        back = corners @ inv[:, :2].T + inv[:, 2]
        height, width = target.shape[:2]
        x0 = max(int(np.floor(back[:, 0].min())) - 1, 0)
        y0 = max(int(np.floor(back[:, 1].min())) - 1, 0)
        x1 = min(int(np.ceil(back[:, 0].max())) + 2, width)
        y1 = min(int(np.ceil(back[:, 1].max())) + 2, height)
        if x1 <= x0 or y1 <= y0:
            return

        # ROI pixel (u, v) is target pixel (u + x0, v + y0): fold the offset into the matrix.
        M_roi = M_face.copy()
        M_roi[:, 2] += M_face[:, :2] @ np.array([x0, y0], np.float64)
        self.box, self.M_roi, self.roi_size = (x0, y0, x1, y1), M_roi, (x1 - x0, y1 - y0)
        self.flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP

        self.ring = self.target_stats = None
        if color_match:
            # The target as seen in the generated image's frame, and where that view is valid.
            target_in_face = cv2.warpAffine(
                target.astype(np.float32) / 255.0, M_face, (size, size),
                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
            )
            valid = cv2.warpAffine(
                np.ones(target.shape[:2], np.float32), M_face, (size, size),
                flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
            ) > 0.999
            region = mask > 0
            ring_width = max(2.0 * feather * size, 3.0)
            ring = region & (_inside_distance(region.astype(np.uint8)) <= ring_width) & valid
            if ring.sum() >= 16:
                self.ring = ring
                self.target_stats = _ring_stats(cv2.cvtColor(target_in_face, cv2.COLOR_RGB2LAB), ring)

        alpha = cv2.warpAffine(mask, M_roi, self.roi_size, flags=self.flags, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0)
        alpha = np.clip(alpha, 0.0, 1.0)
        self.touched = alpha > 0
        a = alpha[self.touched][:, None]
        self.alpha, self.keep = a, target[y0:y1, x0:x1][self.touched].astype(np.float32) * (1.0 - a)

    def paste(self, face_rgb: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 generated face -> a new (H, W, 3) uint8 photo with it pasted back."""
        face = _as_rgb_u8(face_rgb, "generated face")
        if face.shape[:2] != (self.size, self.size):
            raise RetargetError(f"generated face must be {self.size}x{self.size}, got {face.shape[1]}x{face.shape[0]}")
        out = self.target.copy()
        if self.box is None:
            return out
        face_f = face.astype(np.float32) / 255.0
        if self.ring is not None:
            face_f = _match_color(face_f, self.target_stats, self.ring)
        face_back = cv2.warpAffine(face_f, self.M_roi, self.roi_size, flags=self.flags,
                                   borderMode=cv2.BORDER_REPLICATE)
        x0, y0, x1, y1 = self.box
        roi = out[y0:y1, x0:x1]
        blended = self.keep + face_back[self.touched] * 255.0 * self.alpha
        roi[self.touched] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out
