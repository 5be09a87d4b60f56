"""Geometric face alignment: ArcFace, FFHQ and SMIRK crops, and 2x3 affine helpers.

Every crop function returns ``(crop, M)``: the crop and the 2x3 float64 matrix that maps
input-image pixel coordinates to crop pixel coordinates (pixel centres at integers, as in
``cv2.warpAffine(image, M, (size, size))``). ``invert_affine(M)`` maps crop pixels back,
which is what paste-back needs.
"""

from __future__ import annotations

import math

import numpy as np

from tracking.faces import to_rgb_uint8

__all__ = [
    "ARCFACE_TEMPLATE",
    "similarity_transform",
    "invert_affine",
    "apply_affine",
    "arcface_crop",
    "ffhq_quad",
    "ffhq_crop",
    "smirk_matrix",
    "smirk_crop",
    "smirk_input",
]

# insightface.utils.face_align.arcface_dst: where the 5 keypoints (insightface order) land
# in the 112x112 ArcFace input.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def _as3x3(M: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    out[:2] = np.asarray(M, dtype=np.float64).reshape(2, 3)
    return out


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src to dst.

    src, dst: (N, 2) points, N >= 2. Returns the 2x3 float64 matrix. This is Umeyama's
    closed form (1991), the estimate skimage's ``SimilarityTransform`` computes (and thus
    insightface's ``norm_crop`` and SMIRK's ``estimate_transform('similarity', ...)``).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        raise ValueError("similarity_transform: degenerate points (all equal)")
    if rank == 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rot = u @ vt
        else:
            rot = u @ np.diag([1.0, -1.0]) @ vt
    else:
        rot = u @ np.diag(d) @ vt
    var = src_c.var(axis=0).sum()
    scale = (s @ d) / var
    M = np.zeros((2, 3))
    M[:, :2] = scale * rot
    M[:, 2] = dst_mean - scale * rot @ src_mean
    return M


def invert_affine(M: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix, as a 2x3 float64 matrix."""
    return np.linalg.inv(_as3x3(M))[:2]


def apply_affine(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map (N, 2) points with a 2x3 affine matrix; returns (N, 2) float64."""
    M = np.asarray(M, dtype=np.float64)
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return pts @ M[:, :2].T + M[:, 2]


# ---------------------------------------------------------------------------------------
# ArcFace


def arcface_crop(image: np.ndarray, kps5: np.ndarray, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """The ArcFace input: image aligned to insightface's 5-point template.

    image: HxWx3 uint8 RGB. kps5: (5, 2) keypoints in insightface order, pixels. size: a
    multiple of 112 (the template is scaled by size/112). Returns (size x size x 3 uint8
    crop, 2x3 float64 M); bilinear, black outside the image, as insightface's norm_crop.
    """
    import cv2

    if size % 112:
        raise ValueError(f"arcface_crop: size must be a multiple of 112, got {size}")
    img = to_rgb_uint8(image)
    M = similarity_transform(np.asarray(kps5, dtype=np.float64), ARCFACE_TEMPLATE * (size / 112.0))
    crop = cv2.warpAffine(img, M, (size, size), borderValue=0.0)
    return crop, M


# ---------------------------------------------------------------------------------------
# FFHQ


def ffhq_quad(lmk68: np.ndarray) -> np.ndarray:
    """The FFHQ oriented square from 68 landmarks: (4, 2) float64 corners in pixels.

    Order: upper-left, lower-left, lower-right, upper-right (as in FFHQ's
    ``recreate_aligned_images``): a square around the eyes and mouth, tilted with the face.
    """
    lm = np.asarray(lmk68, dtype=np.float64)
    eye_left = lm[36:42].mean(0)
    eye_right = lm[42:48].mean(0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _pad_and_soften(work: np.ndarray, pad: np.ndarray, qsize: float) -> np.ndarray:
    """FFHQ's padding: reflect, then blur and fade toward the median where pixels were invented."""
    from scipy.ndimage import gaussian_filter

    img = np.pad(np.float32(work), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
    h, w, _ = img.shape
    y, x, _ = np.ogrid[:h, :w, :1]
    # mask grows from 0 at the original edge to 1 at the padded edge (negative inside).
    mask = np.maximum(
        1.0 - np.minimum(np.float32(x) / pad[0], np.float32(w - 1 - x) / pad[2]),
        1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3]),
    )
    blur = qsize * 0.02
    img += (gaussian_filter(img, [blur, blur, 0]) - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    img += (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
    return np.uint8(np.clip(np.rint(img), 0, 255))


def ffhq_crop(image: np.ndarray, lmk68: np.ndarray, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """FFHQ alignment (the Reference Adapter's reference image, SPEC.md §4).

    image: HxWx3 uint8 RGB. lmk68: (68, 2) iBUG landmarks in pixels. Follows FFHQ's
    ``recreate_aligned_images``: integer pre-shrink when the face is more than twice the
    output, crop to the quad plus a border, reflect padding blurred and faded toward the
    median where the quad leaves the image, then a bilinear quad warp. FFHQ warps to 4096
    px and downsamples; here the warp is supersampled by ceil(quad size / size) and
    area-averaged, which is the same antialiasing at lower cost. Returns (size x size x 3
    uint8 crop, 2x3 float64 M from input pixels to crop pixels; quad corners land on the
    crop's outer pixel edges, -0.5 and size - 0.5).
    """
    import cv2

    img = to_rgb_uint8(image)
    quad = ffhq_quad(lmk68)
    qsize = float(np.hypot(*(quad[3] - quad[0])))
    work = img
    T = np.eye(3)  # input pixel coordinates -> coordinates in ``work``

    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        h, w = img.shape[:2]
        rsize = (int(np.rint(w / shrink)), int(np.rint(h / shrink)))
        work = cv2.resize(img, rsize, interpolation=cv2.INTER_AREA)
        quad = quad / shrink
        qsize /= shrink
        sx, sy = rsize[0] / w, rsize[1] / h
        # Resizing scales pixel edges: (x + 0.5) * s - 0.5 in pixel-centre coordinates.
        T = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]]) @ T

    border = max(int(np.rint(qsize * 0.1)), 3)
    h, w = work.shape[:2]
    crop = (
        int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
        int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())),
    )
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0), min(crop[2] + border, w), min(crop[3] + border, h))
    if crop[2] - crop[0] < w or crop[3] - crop[1] < h:
        if crop[2] <= crop[0] or crop[3] <= crop[1]:
            from render.errors import RetargetError

            raise RetargetError("ffhq_crop: the face landmarks lie outside the image")
        work = work[crop[1]:crop[3], crop[0]:crop[2]]
        quad = quad - crop[0:2]
        T = _translate(-crop[0], -crop[1]) @ T

    h, w = work.shape[:2]
    pad = (
        int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
        int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())),
    )
    pad = np.array(
        (max(-pad[0] + border, 0), max(-pad[1] + border, 0), max(pad[2] - w + border, 0), max(pad[3] - h + border, 0))
    )
    if pad.max() > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        work = _pad_and_soften(work, pad, qsize)
        quad = quad + pad[:2]
        T = _translate(pad[0], pad[1]) @ T

    # Supersample so that the warp itself never shrinks; area-average back to ``size``.
    k = max(1, math.ceil(qsize / size))
    big = size * k
    src = quad[[0, 1, 3]]
    dst = np.array([[-0.5, -0.5], [-0.5, big - 0.5], [big - 0.5, -0.5]])
    A = _solve_affine(src, dst)
    out = cv2.warpAffine(work, A, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if k > 1:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    # In crop pixel-centre coordinates: x_out = (x_big + 0.5) / k - 0.5.
    S = np.array([[1.0 / k, 0.0, 0.5 / k - 0.5], [0.0, 1.0 / k, 0.5 / k - 0.5], [0.0, 0.0, 1.0]])
    M = (S @ _as3x3(A) @ T)[:2]
    return np.ascontiguousarray(out), M


def _solve_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The exact 2x3 affine taking three src points to three dst points (float64)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T


# ---------------------------------------------------------------------------------------
# SMIRK


def smirk_matrix(landmarks: np.ndarray, size: int = 224, scale: float = 1.4) -> np.ndarray:
    """The SMIRK crop transform (SPEC.md §5) as a 2x3 float64 matrix.

    landmarks: (N, 2) pixels (MediaPipe's 478 in the release; any set works). Box =
    min/max of x and y; side = int(mean(width, height) * scale) (SMIRK truncates to an
    integer); centre = box centre; the square's corners (c - s/2, c - s/2), (c - s/2,
    c + s/2), (c + s/2, c - s/2) go to (0, 0), (0, size - 1), (size - 1, 0) by a
    similarity.
    """
    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    left, right = lm[:, 0].min(), lm[:, 0].max()
    top, bottom = lm[:, 1].min(), lm[:, 1].max()
    old_size = (right - left + bottom - top) / 2.0
    centre = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0])
    side = int(old_size * scale)
    if side <= 0:
        raise ValueError("smirk_matrix: landmarks span less than one pixel")
    src = np.array(
        [
            [centre[0] - side / 2, centre[1] - side / 2],
            [centre[0] - side / 2, centre[1] + side / 2],
            [centre[0] + side / 2, centre[1] - side / 2],
        ]
    )
    dst = np.array([[0.0, 0.0], [0.0, size - 1.0], [size - 1.0, 0.0]])
    return similarity_transform(src, dst)


def _smirk_roi(M: np.ndarray, size: int, shape: tuple) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the part of an image of `shape` that a size x size bilinear crop by
    `M` reads. Every sample lies within 1 px of the mapped square, so a 2 px margin keeps all
    of the pixels a full-image warp would read."""
    corners = apply_affine(invert_affine(M), [[0, 0], [0, size - 1], [size - 1, 0], [size - 1, size - 1]])
    h, w = shape[:2]
    x0 = int(np.clip(np.floor(corners[:, 0].min()) - 2, 0, w))
    y0 = int(np.clip(np.floor(corners[:, 1].min()) - 2, 0, h))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()) + 3, 0, w))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()) + 3, 0, h))
    return x0, y0, x1, y1


def smirk_crop(
    image: np.ndarray, landmarks: np.ndarray, size: int = 224, scale: float = 1.4
) -> tuple[np.ndarray, np.ndarray]:
    """SMIRK's input crop as the release makes it: (size x size x 3 uint8, 2x3 float64 M).

    image: HxWx3 uint8 RGB; landmarks: (N, 2) pixels. The release demos feed the encoder
    ``warp(image, tform.inverse, output_shape=(224, 224), preserve_range=True).astype(np.uint8)``
    divided by 255: a bilinear warp in floating point, zeros outside the image, then truncation.
    Here: ``cv2.warpAffine`` on the float32 pixels the square covers, then ``np.floor``. On the
    astronaut and on rotated and scaled views of it this equals the release's crop in >= 99.99% of
    the values, never differs by more than one level and has no mean bias (a rounded uint8 warp,
    as before 2026-12, differed in about half the pixels and was 0.48 levels brighter on average):
    tests/tracking/test_align.py. The Expression Adapter was trained on SMIRK outputs of that crop.
    """
    import cv2

    img = to_rgb_uint8(image)
    M = smirk_matrix(landmarks, size, scale)
    x0, y0, x1, y1 = _smirk_roi(M, size, img.shape)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((size, size, 3), np.uint8), M
    roi = img[y0:y1, x0:x1].astype(np.float32)
    m_roi = (_as3x3(M) @ _translate(x0, y0))[:2]
    out = cv2.warpAffine(roi, m_roi, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0.0)
    np.floor(out, out=out)
    return out.astype(np.uint8), M


def smirk_input(
    image: np.ndarray, landmarks: np.ndarray, size: int = 224, scale: float = 1.4
) -> tuple[np.ndarray, np.ndarray]:
    """SMIRK's network input: (size x size x 3 float32 RGB in [0, 1], 2x3 float64 M).

    The bilinear warp SMIRK's demo computes, ``skimage.transform.warp(image, tform.inverse,
    output_shape=(size, size))`` (floats in [0, 1], zeros outside), but only on the part of
    the image the square covers, which gives the same values without converting a whole
    video frame to float64. The release demos (demo.py, demo_video.py) then round to 8 bits
    before the network: ``warp(..., preserve_range=True).astype(np.uint8)`` truncates the
    0..255 values and the network gets that divided by 255, i.e.
    ``np.floor(smirk_input(...) * 255) / 255`` up to float rounding at exact integers, which is
    what :func:`smirk_crop` (the tracker's crop) computes. This function returns the values
    before that truncation (at most 1/255 above the release).
    """
    from skimage.transform import AffineTransform, warp

    img = to_rgb_uint8(image)
    M = smirk_matrix(landmarks, size, scale)
    inv = invert_affine(M)
    x0, y0, x1, y1 = _smirk_roi(M, size, img.shape)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((size, size, 3), np.float32), M
    roi = img[y0:y1, x0:x1].astype(np.float64) / 255.0
    inv_roi = _translate(-x0, -y0) @ _as3x3(inv)
    out = warp(roi, AffineTransform(matrix=inv_roi), output_shape=(size, size), order=1, mode="constant", cval=0.0)
    return out.astype(np.float32), M
