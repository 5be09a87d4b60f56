"""Paste-back of a generated aligned face into the full-resolution image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from render.errors import RetargetError
from render.paste import face_mask, paste_back


def similarity(center_xy, crop_size, span_px, angle_deg=0.0):
    """Target->crop matrix: a square of `span_px` target pixels around `center_xy`, rotated."""
    scale = crop_size / span_px
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    c = np.asarray(center_xy, np.float64)
    t = np.array([crop_size / 2 - 0.5, crop_size / 2 - 0.5]) - rot @ c
    return np.hstack([rot, t[:, None]])


def crop_coords(M, height, width):
    """Crop-space coordinates (x, y) of every target pixel: (H, W, 2)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([M[0, 0] * xs + M[0, 1] * ys + M[0, 2], M[1, 0] * xs + M[1, 1] * ys + M[1, 2]], -1)


def to_target(M, pt):
    inv = cv2.invertAffineTransform(M)
    return inv[:, :2] @ np.asarray(pt, np.float64) + inv[:, 2]


@pytest.fixture
def noise_target():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)  # non-square on purpose


def test_face_mask_shape_range_and_support():
    mask = face_mask(128)
    assert mask.shape == (128, 128) and mask.dtype == np.float32
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert mask[70, 64] == 1.0  # face centre of the FFHQ crop
    assert mask[0, 0] == 0.0 and mask[127, 127] == 0.0 and mask[64, 2] == 0.0
    # The fade is a ramp, not a step: intermediate values exist.
    assert ((mask > 0.05) & (mask < 0.95)).sum() > 100
    hard = face_mask(128, feather=0.0)
    assert set(np.unique(hard)) == {0.0, 1.0}
    # Feathering only removes weight inside the region, never adds it outside.
    assert np.all(mask[hard == 0] == 0)


def test_face_mask_from_landmarks_is_zero_outside_hull():
    pts = np.array([[20, 20], [100, 30], [90, 110], [30, 100]], np.float64)
    mask = face_mask(128, pts, feather=0.05)
    assert mask[5, 5] == 0.0 and mask[120, 120] == 0.0
    assert mask[64, 60] == 1.0
    with pytest.raises(RetargetError):
        face_mask(128, np.zeros((2, 2)))


def test_far_pixels_bit_identical_and_centre_from_face(noise_target):
    H, W = noise_target.shape[:2]
    M = similarity((230, 140), 128, 180, angle_deg=17.0)
    face = np.full((128, 128, 3), (10, 200, 30), np.uint8)
    out = paste_back(noise_target, face, M, color_match=False)
    assert out.dtype == np.uint8 and out.shape == noise_target.shape

    cc = crop_coords(M, H, W) / 128.0
    # Well outside the default face ellipse (x 0.19..0.81, y 0.16..0.94 of the crop).
    far = (cc[..., 0] < 0.15) | (cc[..., 0] > 0.85) | (cc[..., 1] < 0.12) | (cc[..., 1] > 0.96)
    assert far.sum() > 0.5 * H * W
    np.testing.assert_array_equal(out[far], noise_target[far])
    assert (out != noise_target).any(axis=-1).sum() > 5000

    cx, cy = np.rint(to_target(M, (64, 70))).astype(int)
    np.testing.assert_array_equal(out[cy, cx], (10, 200, 30))


def test_rotation_puts_crop_points_at_their_target_positions(noise_target):
    M = similarity((200, 150), 128, 160, angle_deg=-35.0)
    face = np.full((128, 128, 3), 128, np.uint8)
    cv2.circle(face, (50, 60), 6, (255, 0, 0), -1)
    cv2.circle(face, (80, 90), 6, (0, 0, 255), -1)
    out = paste_back(noise_target, face, M, color_match=False, feather=0.02)
    for (px, py), color in (((50, 60), (255, 0, 0)), ((80, 90), (0, 0, 255))):
        x, y = np.rint(to_target(M, (px, py))).astype(int)
        np.testing.assert_array_equal(out[y, x], color)


def test_generated_resolution_differs_from_crop_size(noise_target):
    """A 64 px face pasted with a 128 px crop matrix lands where the 128 px face does."""
    M = similarity((210, 160), 128, 200, angle_deg=8.0)
    ys, xs = np.mgrid[0:128, 0:128].astype(np.float32)
    big = np.stack([xs * 2, ys * 2, 255 - xs - ys], -1).clip(0, 255).astype(np.uint8)
    small = cv2.resize(big, (64, 64), interpolation=cv2.INTER_AREA)
    ref = paste_back(noise_target, big, M, color_match=False).astype(int)
    got = paste_back(noise_target, small, M, crop_size=128, color_match=False).astype(int)
    cc = crop_coords(M, *noise_target.shape[:2]) / 128.0
    inner = (np.hypot((cc[..., 0] - 0.5) / 0.25, (cc[..., 1] - 0.55) / 0.3) < 1.0)
    assert inner.sum() > 1000
    # Smooth gradient (2 levels per crop pixel): resampling costs ~0.05 levels; scaling
    # without keeping pixel centres (a half-crop-pixel shift) costs ~1 level.
    assert np.abs(got[inner] - ref[inner]).mean() < 0.4
    # Without crop_size the same 64 px face would be pasted at half the scale: far off.
    wrong = paste_back(noise_target, small, M, color_match=False).astype(int)
    assert np.abs(wrong[inner] - ref[inner]).mean() > 10


def test_color_match_pulls_cast_toward_target(astronaut_rgb):
    M = similarity((220, 130), 128, 220)
    crop = cv2.warpAffine(astronaut_rgb, M, (128, 128), flags=cv2.INTER_LINEAR)
    cast = np.clip(crop.astype(int) + np.array([45, -10, -40]), 0, 255).astype(np.uint8)
    plain = paste_back(astronaut_rgb, cast, M, color_match=False).astype(int)
    matched = paste_back(astronaut_rgb, cast, M, color_match=True).astype(int)
    target = astronaut_rgb.astype(int)

    # The seam: where the warped mask fades, both images are visible.
    alpha = cv2.warpAffine(face_mask(128), M, astronaut_rgb.shape[1::-1], flags=cv2.WARP_INVERSE_MAP)
    seam = (alpha > 0.05) & (alpha < 0.95)
    face = alpha > 0.95
    err_plain = np.abs(plain[seam] - target[seam]).mean()
    err_matched = np.abs(matched[seam] - target[seam]).mean()
    assert err_matched < 0.5 * err_plain
    # The whole face is corrected, not just the seam: mean red excess mostly removed.
    red_plain = (plain[face] - target[face]).mean(0)[0]
    red_matched = (matched[face] - target[face]).mean(0)[0]
    assert red_plain > 30 and abs(red_matched) < 10


def test_face_off_image_edge_keeps_shape(noise_target):
    # Face partly outside the target: no error, outside-image part just dropped.
    M = similarity((10, 10), 128, 150)
    face = np.full((128, 128, 3), 77, np.uint8)
    out = paste_back(noise_target, face, M)
    assert out.shape == noise_target.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[200:, 200:], noise_target[200:, 200:])


def test_bad_inputs_raise_retarget_error(noise_target):
    face = np.zeros((64, 64, 3), np.uint8)
    M = similarity((100, 100), 64, 100)
    with pytest.raises(RetargetError, match="uint8"):
        paste_back(noise_target.astype(np.float32), face, M)
    with pytest.raises(RetargetError, match="square"):
        paste_back(noise_target, np.zeros((64, 32, 3), np.uint8), M)
    with pytest.raises(RetargetError, match="2x3"):
        paste_back(noise_target, face, np.eye(3))
    with pytest.raises(RetargetError, match="singular"):
        paste_back(noise_target, face, np.zeros((2, 3)))


@pytest.fixture(scope="module")
def astronaut_ffhq(astronaut_rgb):
    """The astronaut's real FFHQ crop (512 px) and matrix, from dlib landmarks."""
    from tracking.align import ffhq_crop
    from tracking.faces import DlibBackend

    face = DlibBackend().detect(astronaut_rgb)[0]
    return ffhq_crop(astronaut_rgb, face.lmk68, 512)


def test_round_trip_with_ffhq_crop(astronaut_rgb, astronaut_ffhq):
    """Pasting the FFHQ crop itself back (tracking.align's M convention) restores the photo."""
    crop, M = astronaut_ffhq
    alpha = cv2.warpAffine(face_mask(512), M, astronaut_rgb.shape[1::-1], flags=cv2.WARP_INVERSE_MAP)
    inside = alpha > 0.99
    assert inside.sum() > 3000
    target = astronaut_rgb.astype(int)
    full = paste_back(astronaut_rgb, crop, M, color_match=False).astype(int)
    assert np.abs(full[inside] - target[inside]).mean() < 2.0  # two bilinear resamplings
    # At the tiny weights' 64 px the detail is gone but the placement is the same: the error
    # is blur (~8 levels), far below a misplacement by a few pixels.
    small = cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA)
    tiny = paste_back(astronaut_rgb, small, M, crop_size=512, color_match=False).astype(int)
    err = np.abs(tiny[inside] - target[inside]).mean()
    shifted = np.abs(np.roll(tiny, 4, axis=1)[inside] - target[inside]).mean()
    assert err < 10 and shifted > err + 3


def test_roi_warp_equals_full_frame_warp(noise_target):
    """paste_back warps only the face's bounding box; a full-frame warp gives the same image."""
    M = similarity((230, 140), 96, 170, angle_deg=-23.0)
    rng = np.random.default_rng(3)
    face = cv2.GaussianBlur(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), (0, 0), 2)
    got = paste_back(noise_target, face, M, color_match=False).astype(np.float64)
    size = noise_target.shape[1::-1]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    alpha = cv2.warpAffine(face_mask(96), M, size, flags=flags)[..., None]
    back = cv2.warpAffine(face.astype(np.float32), M, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    ref = np.rint(noise_target * (1.0 - alpha) + back * alpha)
    # cv2 resolves sub-pixel positions to 1/32 px, which the ROI offset can round differently.
    assert np.abs(got - ref).max() <= 1 and np.abs(got - ref).mean() < 0.001


def test_paster_reused_for_many_faces_equals_paste_back(astronaut_rgb):
    """Paster does the photo's share once; every face it pastes is paste_back's result bit for
    bit (colour match on and off, landmark mask), and the faces stay distinct."""
    from render.paste import Paster

    rng = np.random.default_rng(7)
    M = np.array([[0.9, 0.1, -20.0], [-0.1, 0.9, 15.0]])
    hull = np.array([[100, 120], [400, 110], [420, 400], [260, 480], [90, 390]], np.float64)
    for kw in ({}, {"color_match": False}, {"mask_landmarks": hull}):
        paster = Paster(astronaut_rgb, M, 256, crop_size=512, **kw)
        outs = []
        for _ in range(3):
            face = rng.integers(0, 256, (256, 256, 3), np.uint8)
            got = paster.paste(face)
            np.testing.assert_array_equal(got, paste_back(astronaut_rgb, face, M, crop_size=512, **kw))
            outs.append(got)
        assert (outs[0] != outs[1]).any() and (outs[1] != outs[2]).any()
    with pytest.raises(RetargetError, match="256x256"):
        paster.paste(np.zeros((128, 128, 3), np.uint8))


def test_run_paste_keeps_one_paster_per_photo_and_actor(astronaut_rgb):
    """retarget.video_sink.pipe_paste reuses the photo's work only for the same photo and actor: a new
    actor (another job in the app) gets its own alignment."""
    from types import SimpleNamespace

    from retarget.video_sink import pipe_paste

    face = np.random.default_rng(8).integers(0, 256, (128, 128, 3), np.uint8)
    a = SimpleNamespace(M=np.array([[0.5, 0.0, -40.0], [0.0, 0.5, -30.0]]), crop=np.zeros((512, 512, 3)))
    b = SimpleNamespace(M=np.array([[0.4, 0.0, -10.0], [0.0, 0.4, -60.0]]), crop=np.zeros((512, 512, 3)))
    for actor in (a, b, a):
        np.testing.assert_array_equal(pipe_paste(astronaut_rgb, face, actor),
                                      paste_back(astronaut_rgb, face, actor.M, crop_size=512))
