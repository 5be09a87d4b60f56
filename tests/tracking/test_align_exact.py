"""The exact FFHQ alignment (the once-per-video reference) against the published procedure.

``_published_ffhq`` below is a plain transcription of NVlabs ffhq-dataset ``download_ffhq.py``,
``recreate_aligned_images`` (rotate_level=True, random_shift=0, enable_padding=True), written
from the script's description with the same NumPy, SciPy and PIL calls, one image at a time
and nothing made faster. ``tracking.align.ffhq_align_exact`` must give its pixels within one
level; M must say where the photo's pixels went.
"""

from __future__ import annotations

import numpy as np
import pytest

from tracking.align import apply_affine, ffhq_align_exact, ffhq_crop, ffhq_quad, invert_affine


def _published_ffhq(image: np.ndarray, lm: np.ndarray, output_size: int, transform_size: int = 4096) -> np.ndarray:
    import PIL.Image
    import scipy.ndimage

    lm = np.asarray(lm, dtype=np.float64)
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = np.hypot(*x) * 2
    img = PIL.Image.fromarray(image)

    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink)))
        img = img.resize(rsize, PIL.Image.Resampling.LANCZOS)  # the script's ANTIALIAS
        quad /= shrink
        qsize /= shrink

    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0),
            min(crop[2] + border, img.size[0]), min(crop[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    pad = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
           int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0),
           max(pad[2] - img.size[0] + border, 0), max(pad[3] - img.size[1] + border, 0))
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        img = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = img.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
                          1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]))
        blur = qsize * 0.02
        img += (scipy.ndimage.gaussian_filter(img, [blur, blur, 0]) - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        img += (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
        img = PIL.Image.fromarray(np.uint8(np.clip(np.rint(img), 0, 255)), "RGB")
        quad += pad[:2]

    img = img.transform((transform_size, transform_size), PIL.Image.Transform.QUAD, (quad + 0.5).flatten(),
                        PIL.Image.Resampling.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), PIL.Image.Resampling.LANCZOS)
    return np.asarray(img)


def _cases(astronaut_rgb, astronaut_face):
    """name -> (photo, landmarks, output size): each takes another branch of the script."""
    import cv2

    big = cv2.resize(astronaut_rgb, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    S = np.array([[4.0, 0.0, 1.5], [0.0, 4.0, 1.5]])  # (x + 0.5) * 4 - 0.5
    cut = np.ascontiguousarray(astronaut_rgb[60:, 165:])  # the quad leaves the photo: padding
    return {
        "crop only": (astronaut_rgb, astronaut_face.lmk68, 512),
        "shrink by 2": (big, apply_affine(S, astronaut_face.lmk68), 128),
        "padding": (cut, astronaut_face.lmk68 - [165, 60], 512),
    }


@pytest.fixture(scope="module")
def exact_cases(astronaut_rgb, astronaut_face):
    """name -> (photo, landmarks, size, published pixels, our pixels, our M)."""
    out = {}
    for name, (img, lm, size) in _cases(astronaut_rgb, astronaut_face).items():
        crop, M = ffhq_align_exact(img, lm, size)
        out[name] = (img, lm, size, _published_ffhq(img, lm, size), crop, M)
    return out


@pytest.mark.parametrize("name", ["crop only", "shrink by 2", "padding"])
def test_exact_alignment_equals_the_published_procedure(exact_cases, name):
    _, _, size, ref, crop, _ = exact_cases[name]
    assert crop.shape == ref.shape == (size, size, 3) and crop.dtype == np.uint8
    diff = np.abs(crop.astype(np.int16) - ref.astype(np.int16))
    # Within one level: the padding blur's float rounding (OpenCV float32 instead of SciPy
    # float64, 2e-4 levels) and the float32 canvas (where OpenCV draws it) move a rounding on
    # ~1e-5 of the pixels.
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3


def test_exact_alignment_of_a_rotated_copy_equals_the_published_procedure(astronaut_view):
    face = astronaut_view.faces[0]
    crop, _ = ffhq_align_exact(astronaut_view.image, face.lmk68, 256)
    ref = _published_ffhq(astronaut_view.image, face.lmk68, 256)
    assert np.abs(crop.astype(np.int16) - ref.astype(np.int16)).max() <= 1


def test_threads_give_the_same_pixels(exact_cases):
    img, lm, size, _, crop, M = exact_cases["padding"]
    one, M1 = ffhq_align_exact(img, lm, size, threads=1)
    np.testing.assert_array_equal(one, crop)  # bands of the resize: bit for bit
    np.testing.assert_array_equal(M1, M)


@pytest.mark.parametrize("name", ["crop only", "padding"])
def test_pil_canvas_path_equals_the_published_procedure(exact_cases, name, monkeypatch):
    """Where OpenCV rounds sample positions (OpenCV 4), the canvas is PIL's own, in bands."""
    import tracking.align as align

    img, lm, size, ref, crop, M = exact_cases[name]
    monkeypatch.setattr(align, "_opencv_warps_exactly", lambda: False)
    banded, Mb = ffhq_align_exact(img, lm, size, threads=3)
    one, _ = ffhq_align_exact(img, lm, size, threads=1)
    np.testing.assert_array_equal(banded, one)  # bands of PIL's QUAD transform: bit for bit
    np.testing.assert_array_equal(Mb, M)
    diff = np.abs(banded.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4  # only the padding blur's rounding
    if name == "crop only":
        np.testing.assert_array_equal(banded, ref)  # no padding: PIL's pixels exactly
    # The OpenCV canvas (the default here) agrees with PIL's as closely.
    assert np.abs(crop.astype(np.int16) - banded.astype(np.int16)).max() <= 1


def test_M_round_trips_and_puts_the_quad_on_the_output_edges(exact_cases):
    for name, (img, lm, size, _, _, M) in exact_cases.items():
        assert M.shape == (2, 3) and M.dtype == np.float64
        np.testing.assert_allclose(apply_affine(invert_affine(M), apply_affine(M, lm)), lm, atol=1e-7)
        edges = [[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5], [size - 0.5, -0.5]]
        corners = apply_affine(M, ffhq_quad(lm))
        # Without a shrink the quad's corners are the output's edges; the script divides the
        # quad by the shrink factor where the pixels move to (x + 0.5) / 2 - 0.5: a quarter of
        # a shrunk pixel along each axis (0.1 px of the 128 output here).
        shrunk_side = np.hypot(*(ffhq_quad(lm)[3] - ffhq_quad(lm)[0])) / 2
        tol = 1e-6 if name != "shrink by 2" else 0.25 * np.sqrt(2) * size / shrunk_side
        np.testing.assert_allclose(corners, edges, atol=tol)
    _, _, _, _, _, M = exact_cases["shrink by 2"]
    _, _, _, _, _, M0 = exact_cases["crop only"]
    # The 2048 copy is the 512 photo scaled by 4 at 1/4 of the output: the same map, but for
    # that quarter pixel of the shrink (measured 0.096 and 0.086 px).
    S = np.array([[4.0, 0.0, 1.5], [0.0, 4.0, 1.5], [0.0, 0.0, 1.0]])
    D = np.array([[0.25, 0.0, -0.375], [0.0, 0.25, -0.375], [0.0, 0.0, 1.0]])  # 512 -> 128 output pixels
    gap = M @ S - (D @ np.vstack([M0, [0, 0, 1]]))[:2]
    assert np.abs(gap[:, :2]).max() < 1e-9 and 0.05 < np.abs(gap[:, 2]).max() < 0.11


def _shift(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The sub-pixel translation (dx, dy) that takes b onto a, least squares over ``where``
    (one Lucas-Kanade step on lightly blurred grey images: exact for small shifts)."""
    import cv2

    ga, gb = (cv2.GaussianBlur(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).astype(np.float64), (0, 0), 1.0) for x in (a, b))
    gy, gx = np.gradient(gb)
    m = where & (cv2.erode(where.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)
    J = np.stack([gx[m], gy[m]], 1)
    return -np.linalg.solve(J.T @ J, J.T @ (ga - gb)[m])


@pytest.mark.parametrize("name", ["crop only", "shrink by 2", "padding"])
def test_warping_with_M_reproduces_the_aligned_image(exact_cases, name):
    """cv2.warpAffine(photo, M) lands every pixel where the exact path put it.

    The two resample differently (the exact path: a bilinear 4096 canvas, then LANCZOS; the
    check: bilinear at 4x the output, then area-averaged, to avoid aliasing when shrinking),
    so pixels differ by a few levels at edges; the registration error must be ~0.
    """
    import cv2

    img, _, size, _, crop, M = exact_cases[name]
    up = np.array([[4.0, 0.0, 1.5], [0.0, 4.0, 1.5], [0.0, 0.0, 1.0]])  # output -> 4x output pixels
    big = cv2.warpAffine(img, (up @ np.vstack([M, [0, 0, 1]]))[:2], (4 * size, 4 * size), flags=cv2.INTER_LINEAR)
    warped = cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)
    # Away from the padded border: output pixels whose source lies inside the photo.
    h, w = img.shape[:2]
    yy, xx = np.mgrid[:size, :size]
    src = apply_affine(invert_affine(M), np.stack([xx.ravel(), yy.ravel()], 1)).reshape(size, size, 2)
    # The LANCZOS footprint (3 output pixels) plus the blur of the padding (2 % of the quad).
    margin = 3.0 / np.sqrt(abs(np.linalg.det(M[:, :2]))) + 0.02 * np.sqrt(abs(np.linalg.det(invert_affine(M)[:, :2]))) * size
    inside = (src[..., 0] > margin) & (src[..., 1] > margin) & (src[..., 0] < w - 1 - margin) & (src[..., 1] < h - 1 - margin)
    assert inside.mean() > 0.5
    diff = np.abs(crop.astype(np.float32) - warped.astype(np.float32)).mean(-1)[inside]
    # Measured: mean 0.5, 1.0, 1.3 levels (crop only, shrink by 2, padding): resampling, not geometry.
    assert diff.mean() < 2.0
    # Registration: measured <= 0.018 px; M moved by 0.1 px reads 0.08-0.105.
    assert np.abs(_shift(crop, warped, inside)).max() < 0.04


def test_the_fast_crop_is_close_to_the_exact_one(exact_cases):
    """ffhq_crop (per frame) is the exact path's geometry at a fraction of the cost."""
    img, lm, size, _, crop, M = exact_cases["crop only"]
    fast, Mf = ffhq_crop(img, lm, size)
    np.testing.assert_allclose(Mf, M, atol=1e-6)  # no shrink: the same map
    diff = np.abs(fast.astype(np.float32) - crop.astype(np.float32))
    assert diff.mean() < 1.5  # measured 0.6 on the astronaut (bilinear + area vs 4096 canvas + LANCZOS)


def test_exact_alignment_rejects_landmarks_outside_the_image(astronaut_rgb, astronaut_face):
    from render.errors import RetargetError

    with pytest.raises(RetargetError, match="outside the image"):
        ffhq_align_exact(astronaut_rgb, astronaut_face.lmk68 + 5000.0, 128)
