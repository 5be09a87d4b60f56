"""Geometric face alignment: ArcFace, FFHQ and SMIRK crops, and 2x3 affine helpers.

Every crop function returns ``(crop, M)``: the crop and the 2x3 float64 matrix that maps
input-image pixel coordinates to crop pixel coordinates (pixel centres at integers, as in
``cv2.warpAffine(image, M, (size, size))``). ``invert_affine(M)`` maps crop pixels back,
which is what paste-back needs.

Two FFHQ alignments: :func:`ffhq_align_exact` is the dataset script's procedure step for step
(PIL resampling, a 4096 px canvas; ~0.3 s of CPU, ~1 s with a large padding), for the
once-per-video reference image the Reference Adapter and the identity were trained on;
:func:`ffhq_crop` is one supersampled affine warp (2-9 ms without padding, mean 0.5-1 level
from the exact one), for work done on every frame.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from tracking.faces import to_rgb_uint8

__all__ = [
    "ARCFACE_TEMPLATE",
    "similarity_transform",
    "invert_affine",
    "apply_affine",
    "arcface_crop",
    "aligned_identity_crop",
    "ffhq_quad",
    "ffhq_crop",
    "ffhq_align_exact",
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


def aligned_identity_crop(backend, aligned: np.ndarray, carried_kps5: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The identity crop of an FFHQ-aligned reference, as the Arc2Face release takes it.

    The release aligns the actor photo, then runs face detection again on the aligned 512
    image and embeds the largest face found there (``app.get`` on ``image_align``'s output).
    backend: a FaceBackend (``detect``); aligned: (S, S, 3) uint8 RGB; carried_kps5: (5, 2)
    the photo's keypoints mapped through M, used only when no face is found again.
    Returns (112x112x3 uint8 ArcFace crop, (5, 2) float32 keypoints used, found_again).

    Why not the carried keypoints: on 14 photos (the astronaut, 5 copies, 8 of the release's
    examples; bench/ffhq_align.py) they sit 0.6-2.3 px (mean) from the keypoints found again,
    0.2-0.7 px of the 112 crop, and the crops differ by 1-6.5 levels on average (99th
    percentile up to 47): about as far from the release's crop as a crop of the unaligned photo.
    """
    faces = backend.detect(aligned)
    if faces:
        area = [float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])) for f in faces]
        kps = np.asarray(faces[int(np.argmax(area))].kps5, dtype=np.float32)
        return arcface_crop(aligned, kps)[0], kps, True
    kps = np.asarray(carried_kps5, dtype=np.float32)
    return arcface_crop(aligned, kps)[0], kps, False


def reference_and_identity(image: np.ndarray, face, backend, size: int = 512):
    """The once-per-video crops of an actor's face, as the release makes them: the FFHQ script's
    alignment (`ffhq_align_exact`) and the ArcFace crop of the face found again on it
    (`aligned_identity_crop`). Every place that embeds an actor's identity (the pipeline's
    `prepare_actor`, an actor video's identity frames, the training set, the evaluation's
    conditioning-model judge) goes through here, so they all embed the same crop.

    image: (H, W, 3) uint8 RGB; face: a `tracking.faces.Face` with `lmk68`; backend: the face
    backend used to detect again. Returns (aligned (size, size, 3) uint8, M (2, 3), 112x112x3
    uint8 identity crop, found_again).
    """
    crop, M = ffhq_align_exact(image, face.lmk68, size=size)
    crop112, _, found = aligned_identity_crop(backend, crop, apply_affine(M, face.kps5))
    return crop, M, crop112, found


# ---------------------------------------------------------------------------------------
# FFHQ


def ffhq_quad(lmk68: np.ndarray) -> np.ndarray:
    """The FFHQ oriented square from 68 landmarks: (4, 2) float64 corners in pixels.

    Order: upper-left, lower-left, lower-right, upper-right (as in FFHQ's
    ``recreate_aligned_images``): a square around the eyes and mouth, tilted with the face.
    """
    return _ffhq_quad_and_size(lmk68)[0]


def _ffhq_quad_and_size(lmk68: np.ndarray) -> tuple[np.ndarray, float]:
    """(quad, qsize): the corners and the side length, as ``recreate_aligned_images`` computes them."""
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
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y]), float(np.hypot(*x) * 2)


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _gaussian_filter(img: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(img, [sigma, sigma, 0])`` for an (H, W, C) float32 image.

    The same kernel (radius int(4 sigma + 0.5), normalised exp(-x^2 / 2 sigma^2)) and the same
    'reflect' border (OpenCV's BORDER_REFLECT), computed by OpenCV in float32 with its threads:
    measured at sigma ~20 on 1770x1580x3, 0.48 s of one core instead of SciPy's 0.65 (0.30 s
    instead of 0.68 wall on two), within 2e-4 levels of it.
    """
    import cv2

    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / (sigma * sigma) * x**2)
    kernel = np.float32(kernel / kernel.sum())
    if radius >= min(img.shape[:2]):  # reflection beyond one image length: only SciPy does it
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(img, [sigma, sigma, 0])
    out = cv2.sepFilter2D(img, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT)
    return out.reshape(img.shape)


def _pad_and_soften(work: np.ndarray, pad: np.ndarray, qsize: float, threads: int = 1) -> np.ndarray:
    """FFHQ's padding: reflect, then blur and fade toward the median where pixels were invented.

    The script's arithmetic, element for element, on the rectangles where the fades are not
    zero (adding a zero-weighted difference leaves a pixel as it is), in bands of rows on
    ``threads`` threads: the same values as over the whole image in one go.
    """
    img = np.pad(np.float32(work), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
    h, w, _ = img.shape
    y, x, _ = np.ogrid[:h, :w, :1]
    # mask grows from 0 at the original edge to 1 at the padded edge (negative inside).
    col = 1.0 - np.minimum(np.float32(x) / pad[0], np.float32(w - 1 - x) / pad[2])
    row = 1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3])
    mask = np.maximum(col, row)
    blurred = _gaussian_filter(img, qsize * 0.02)
    fade = np.clip(mask * 3.0 + 1.0, 0.0, 1.0)

    def blend(r0: int, r1: int, c0: int, c1: int) -> None:
        img[r0:r1, c0:c1] += (blurred[r0:r1, c0:c1] - img[r0:r1, c0:c1]) * fade[r0:r1, c0:c1]

    _map_threads(blend, _nonzero_bands(row * 3.0 + 1.0 > 0, col * 3.0 + 1.0 > 0, threads), threads)
    median = np.median(img, axis=(0, 1))
    fade = np.clip(mask, 0.0, 1.0)

    def to_median(r0: int, r1: int, c0: int, c1: int) -> None:
        img[r0:r1, c0:c1] += (median - img[r0:r1, c0:c1]) * fade[r0:r1, c0:c1]

    _map_threads(to_median, _nonzero_bands(row > 0, col > 0, threads), threads)
    return np.uint8(np.clip(np.rint(img), 0, 255))


def _nonzero_bands(rows: np.ndarray, cols: np.ndarray, threads: int) -> list[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) rectangles covering every pixel whose row or column flag is set (the
    flags are set toward the edges only), split in bands of rows for ``threads`` threads."""
    rows, cols = np.asarray(rows).reshape(-1), np.asarray(cols).reshape(-1)
    h, w = rows.size, cols.size
    inner_r, inner_c = np.flatnonzero(~rows), np.flatnonzero(~cols)
    if inner_r.size and inner_c.size:
        ya, yb, xa, xb = inner_r[0], inner_r[-1] + 1, inner_c[0], inner_c[-1] + 1
        rects = [(0, ya, 0, w), (yb, h, 0, w), (ya, yb, 0, xa), (ya, yb, xb, w)]
    else:
        rects = [(0, h, 0, w)]
    out = []
    for r0, r1, c0, c1 in rects:
        if r1 > r0 and c1 > c0:
            out += [(r0 + a, r0 + b, c0, c1) for a, b in _bands(r1 - r0, threads)]
    return out


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


def ffhq_align_exact(
    image: np.ndarray, lmk68: np.ndarray, size: int = 512, *, transform_size: int = 4096, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FFHQ alignment exactly as the dataset script does it: the once-per-video reference.

    image: HxWx3 uint8 RGB. lmk68: (68, 2) iBUG landmarks in pixels (pixel centres at
    integers). size: output side (512 in the release). Returns (size x size x 3 uint8 aligned
    image, 2x3 float64 M from input pixels to aligned pixels).

    NVlabs ffhq-dataset ``download_ffhq.py``, ``recreate_aligned_images(output_size=size,
    transform_size=4096, enable_padding=True)``, the function the Arc2Face release calls
    (``image_align``) on the actor photo before the Reference Adapter and the identity
    embedding: the oriented quad; when the quad is over four times the output, a PIL LANCZOS
    shrink by the integer factor; a crop to the quad plus a 10 % border; reflect padding
    blurred and faded to the median where the quad leaves the photo; PIL's QUAD transform
    (bilinear) to a 4096 px canvas; PIL LANCZOS down to ``size``. The result equals the
    script's within one level (tests/tracking/test_align_exact.py, against a plain transcription;
    measured: one level on ~1e-5 of the pixels): the savings below change only float rounding.
      - the shrink computes only the crop's part of the shrunk photo (PIL's ``box``: the same
        filter taps, so the same pixels);
      - the padding blur runs in OpenCV float32 with SciPy's kernel and border (within 2e-4
        levels before rounding, so the padded image is the script's except for a level on
        ~1e-5 of its pixels);
      - the canvas is OpenCV's float32 warp of the same bilinear map, floored as PIL
        truncates (equal on all but ~1e-5 of its pixels), where OpenCV samples at exact
        coordinates, else PIL's own in bands on threads (see :func:`_quad_transform`);
      - the final resize runs in bands of rows on ``threads`` threads (PIL releases the GIL;
        each band has the same filter taps, bit for bit).
    Unlike :func:`ffhq_crop` (one supersampled affine warp, for per-frame work) this costs
    a 4096 x 4096 canvas: ~0.3 s of CPU, ~1 s when the padding is large (bench/ffhq_align.py).

    M: the QUAD transform of an FFHQ quad (a square) is affine. PIL samples canvas pixel u at
    quad[0] + (quad[3] - quad[0]) (u + 0.5) / 4096 + ... in pixel-centre coordinates (the
    script passes ``quad + 0.5`` to PIL, whose pixel centres are at +0.5), so the quad's
    corners land on the outer pixel edges, -0.5 and size - 0.5, of canvas and output alike
    (LANCZOS maps edges to edges). Crop and pad are integer shifts. The shrink resizes the
    photo by rsize / (W, H) edge to edge, (x + 0.5) s - 0.5, while the script divides the
    quad by the integer factor: M follows the pixels (where the photo's content lands), so
    with a shrink the quad's corners land a quarter of a shrunk pixel (~0.1-0.2 px of the
    output) from the output's edges.
    """
    from PIL import Image

    from render.errors import RetargetError

    img = to_rgb_uint8(image)
    threads = max(1, min(8, os.cpu_count() or 1)) if threads is None else max(1, int(threads))
    quad, qsize = _ffhq_quad_and_size(lmk68)
    h, w = img.shape[:2]
    T = np.eye(3)  # input pixel coordinates -> coordinates in the working image

    # Shrink (only decided here; the pixels are computed once the crop is known).
    shrink = int(np.floor(qsize / size * 0.5))
    work_w, work_h = w, h
    if shrink > 1:
        work_w, work_h = int(np.rint(float(w) / shrink)), int(np.rint(float(h) / shrink))
        quad = quad / shrink
        qsize /= shrink
        sx, sy = work_w / w, work_h / h
        T = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])

    # Crop.
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (
        int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))),
    )
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0), min(crop[2] + border, work_w), min(crop[3] + border, work_h))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise RetargetError("ffhq_align_exact: the face landmarks lie outside the image")
    if not (crop[2] - crop[0] < work_w or crop[3] - crop[1] < work_h):
        crop = (0, 0, work_w, work_h)  # the script keeps the whole image
    if shrink > 1:
        # PIL places output pixel i of the shrunk image at input (i + 0.5) * w / work_w; a box
        # starting at crop[0] * w / work_w gives the same centres, so the same taps.
        scale_x, scale_y = w / work_w, h / work_h
        box = (crop[0] * scale_x, crop[1] * scale_y, min(crop[2] * scale_x, w), min(crop[3] * scale_y, h))
        work = np.asarray(
            Image.fromarray(img).resize((crop[2] - crop[0], crop[3] - crop[1]), Image.Resampling.LANCZOS, box=box)
        )
    else:
        work = img[crop[1]:crop[3], crop[0]:crop[2]]
    quad = quad - crop[0:2]
    T = _translate(-crop[0], -crop[1]) @ T

    # Pad.
    wh, ww = work.shape[:2]
    pad = (
        int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))),
    )
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0), max(pad[2] - ww + border, 0), max(pad[3] - wh + border, 0))
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        work = _pad_and_soften(work, pad, qsize, threads)
        quad = quad + pad[:2]
        T = _translate(pad[0], pad[1]) @ T

    # Transform, then down to the output size.
    canvas = _quad_transform(work, quad, transform_size, threads)
    out = canvas if size >= transform_size else _resize_lanczos(canvas, size, threads)

    # M: the quad's corners to the output's outer pixel edges (see the docstring).
    dst = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, -0.5]])
    A = _solve_affine(quad[[0, 1, 3]], dst)
    M = (_as3x3(A) @ T)[:2]
    return np.ascontiguousarray(np.asarray(out)), M


def _bands(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, max(1, min(parts, n)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _map_threads(fn, items, threads: int) -> list:
    if threads <= 1 or len(items) <= 1:
        return [fn(*item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda item: fn(*item), items))


def _quad_transform(work: np.ndarray, quad: np.ndarray, size: int, threads: int):
    """``Image.fromarray(work).transform((size, size), QUAD, (quad + 0.5).flatten(), BILINEAR)``.

    PIL's bilinear filter computes in float64 and truncates to 8 bits. When OpenCV's warp
    samples at exact coordinates (OpenCV 5; :func:`_opencv_warps_exactly`), the canvas is
    OpenCV's float32 affine warp of the same map, floored: measured equal to PIL's on all but
    ~1e-5 of the canvas pixels (float32 weights, each such pixel one level), at a third of
    the CPU. Otherwise (OpenCV 4 rounds sample positions to 1/32 px, which moves the output
    by up to 2 levels) PIL itself, rows [v0, v1) in bands on ``threads`` threads, each band a
    QUAD transform of its own with the corners moved along the left and right edges: the
    same bilinear map up to 1e-13 px and the same filter, so the same pixels. Either way the
    quad lies inside ``work`` (the script crops with a border or pads), where PIL's edge rule
    (neighbours clamped) is OpenCV's BORDER_REPLICATE.
    """
    from PIL import Image

    if _opencv_warps_exactly():
        import cv2

        a = (quad[3] - quad[0]) / size  # source step per canvas column
        b = (quad[1] - quad[0]) / size  # and per canvas row
        src = np.float32(work)
        out = np.empty((size, size, 3), np.uint8)
        for v0, v1 in _bands(size, max(1, size // 256)):
            # Canvas pixel (u, v) samples quad[0] + a (u + 0.5) + b (v + 0.5), pixel centres at integers.
            c = quad[0] + 0.5 * a + (v0 + 0.5) * b
            inv = np.array([[a[0], b[0], c[0]], [a[1], b[1], c[1]]])
            band = cv2.warpAffine(src, inv, (size, v1 - v0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE)
            out[v0:v1] = np.floor(band, out=band)
        return Image.fromarray(out)

    img = Image.fromarray(np.ascontiguousarray(work))
    data = quad + 0.5
    if threads <= 1:
        return img.transform((size, size), Image.Transform.QUAD, data.flatten(), Image.Resampling.BILINEAR)
    nw, sw, se, ne = data

    def band(v0: int, v1: int):
        t0, t1 = v0 / size, v1 / size
        corners = np.stack([nw + (sw - nw) * t0, nw + (sw - nw) * t1, ne + (se - ne) * t1, ne + (se - ne) * t0])
        part = img.transform((size, v1 - v0), Image.Transform.QUAD, corners.flatten(), Image.Resampling.BILINEAR)
        return np.asarray(part)

    rows = _map_threads(band, _bands(size, 4 * threads), threads)
    return Image.fromarray(np.concatenate(rows, axis=0))


@functools.lru_cache(maxsize=1)
def _opencv_warps_exactly() -> bool:
    """Whether cv2.warpAffine (bilinear, float32) samples at the exact coordinate (OpenCV 5)
    rather than at the nearest 1/32 px (OpenCV 4): a probe at 1/64 and 0.3 px."""
    import cv2

    src = np.array([[0.0, 255.0], [0.0, 255.0]], np.float32)
    for dx in (1.0 / 64.0, 0.3):
        inv = np.array([[1.0, 0.0, dx], [0.0, 1.0, 0.0]])
        got = cv2.warpAffine(src, inv, (1, 1), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REPLICATE)
        if abs(float(got[0, 0]) - 255.0 * dx) > 1e-3:
            return False
    return True


def _resize_lanczos(img, size: int, threads: int) -> np.ndarray:
    """``img.resize((size, size), LANCZOS)`` as an array; with threads, output rows in bands
    (PIL's ``box`` with integer row edges: the same taps, bit for bit)."""
    from PIL import Image

    if threads <= 1:
        return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))
    sy = img.height / size

    def band(r0: int, r1: int):
        box = (0, r0 * sy, img.width, min(r1 * sy, img.height))
        return np.asarray(img.resize((size, r1 - r0), Image.Resampling.LANCZOS, box=box))

    return np.concatenate(_map_threads(band, _bands(size, threads), threads), axis=0)


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
