"""prepare_actor's reference: the FFHQ script's alignment, and the identity from the face found again."""

from __future__ import annotations

import numpy as np
import pytest

from tracking.align import aligned_identity_crop, apply_affine, arcface_crop, ffhq_align_exact


class _FirstCallOnly:
    """A backend that finds the faces of the photo, then nothing on the aligned image."""

    name = "dlib"

    def __init__(self, backend):
        self.backend, self.calls = backend, 0

    def detect(self, image_rgb, timestamp_ms=None):
        self.calls += 1
        return self.backend.detect(image_rgb) if self.calls == 1 else []


@pytest.fixture
def dlib_pipe(pipe):
    from tracking.faces import DlibBackend

    before = pipe.face_backend
    pipe.face_backend = DlibBackend()
    yield pipe
    pipe.face_backend = before


def test_reference_is_the_exact_alignment_and_identity_the_face_found_again(dlib_pipe, astronaut_rgb):
    actor = dlib_pipe.prepare_actor(astronaut_rgb, seed=1)
    face = dlib_pipe.face_backend.detect(astronaut_rgb)[0]
    crop, M = ffhq_align_exact(astronaut_rgb, face.lmk68, 512)
    np.testing.assert_array_equal(actor.crop, crop)
    np.testing.assert_array_equal(actor.M, M)
    again = dlib_pipe.face_backend.detect(crop)[0]
    expected = dlib_pipe.arcface(arcface_crop(crop, again.kps5)[0])[0]
    np.testing.assert_allclose(actor.arcface, expected / np.linalg.norm(expected), atol=1e-6)
    assert "carried" not in actor.face_report


def test_identity_falls_back_to_carried_keypoints(dlib_pipe, astronaut_rgb):
    photo_backend = dlib_pipe.face_backend
    dlib_pipe.face_backend = _FirstCallOnly(photo_backend)
    actor = dlib_pipe.prepare_actor(astronaut_rgb, seed=1)
    assert dlib_pipe.face_backend.calls == 2
    assert "identity keypoints carried from the photo" in actor.face_report
    face = photo_backend.detect(astronaut_rgb)[0]
    carried = apply_affine(actor.M, face.kps5).astype(np.float32)
    expected = dlib_pipe.arcface(arcface_crop(actor.crop, carried)[0])[0]
    np.testing.assert_allclose(actor.arcface, expected / np.linalg.norm(expected), atol=1e-6)


def test_aligned_identity_crop_prefers_the_largest_face_found_again(astronaut_rgb):
    from tracking.faces import DlibBackend

    backend = DlibBackend()
    face = backend.detect(astronaut_rgb)[0]
    crop, M = ffhq_align_exact(astronaut_rgb, face.lmk68, 512)
    carried = apply_affine(M, face.kps5)
    crop112, kps, found = aligned_identity_crop(backend, crop, carried)
    assert found and crop112.shape == (112, 112, 3)
    np.testing.assert_array_equal(kps, backend.detect(crop)[0].kps5)
    # Found again vs carried: different keypoints (measured 1.2 px mean on the astronaut), and
    # so a different crop; the carried ones are only the fallback.
    assert 0.3 < np.linalg.norm(kps - carried, axis=1).mean() < 3.0
    nothing = _FirstCallOnly(backend)
    nothing.calls = 1  # past its first call: finds nothing
    fallback, kps_carried, found = aligned_identity_crop(nothing, crop, carried)
    assert not found
    np.testing.assert_allclose(kps_carried, carried, atol=1e-4)
    np.testing.assert_array_equal(fallback, arcface_crop(crop, carried.astype(np.float32))[0])
