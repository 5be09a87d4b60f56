"""Face fixtures for the tracking tests: real dlib detections on the astronaut, shared per session."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass
class View:
    """The astronaut warped by a known affine ``A`` (2x3, original pixels -> view pixels)."""

    image: np.ndarray
    A: np.ndarray
    faces: list


def warp_about_face(image: np.ndarray, centre, angle_deg: float, scale: float, canvas: int):
    """Rotate/scale ``image`` about ``centre`` and move that point to the canvas centre.

    Returns (canvas x canvas x 3 uint8 image on a grey background, 2x3 float64 A).
    """
    import cv2

    A = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle_deg, scale)
    A[:, 2] += np.array([canvas / 2.0, canvas / 2.0]) - np.asarray(centre, dtype=np.float64)
    out = cv2.warpAffine(image, A, (canvas, canvas), flags=cv2.INTER_LINEAR, borderValue=(128, 128, 128))
    return out, A


@pytest.fixture(scope="session")
def dlib_backend():
    from tracking.faces import DlibBackend

    return DlibBackend()


@pytest.fixture(scope="session")
def astronaut_faces(dlib_backend, astronaut_rgb):
    """All dlib detections on the astronaut (512x512)."""
    return dlib_backend.detect(astronaut_rgb)


@pytest.fixture(scope="session")
def astronaut_face(astronaut_faces):
    """The astronaut's face (the largest detection)."""
    assert astronaut_faces, "dlib found no face on the astronaut"
    return astronaut_faces[0]


# Two views: rotated and enlarged on a large canvas (no upsampling in the detector), and
# rotated the other way and shrunk to a ~60 px face on a small canvas (detector upsamples).
VIEW_PARAMS = {
    "rot20_x1.25": (20.0, 1.25, 640),
    "rot-15_x0.7": (-15.0, 0.7, 384),
}


@pytest.fixture(scope="session", params=sorted(VIEW_PARAMS))
def astronaut_view(request, dlib_backend, astronaut_rgb, astronaut_face) -> View:
    angle, scale, canvas = VIEW_PARAMS[request.param]
    image, A = warp_about_face(astronaut_rgb, astronaut_face.centre, angle, scale, canvas)
    return View(image=image, A=A, faces=dlib_backend.detect(image))
