"""The models that judge an output: dlib's face descriptor (independent of the generator), and
ArcFace and SMIRK (the generator's own models, reported as their view).

dlib's ResNet descriptor (`dlib_face_recognition_resnet_model_v1.dat`, 128-d, from the
`face-recognition-models` package) maps faces so that dlib documents a Euclidean distance under
0.6 as "same person" (99.38% on LFW). Measured here on real photos (issue 20): the astronaut
against itself shifted, scaled, rotated 10 degrees, JPEG-compressed and mirrored 0.00-0.20;
different people 0.57-0.85. So the distance is the number; a verdict always names the threshold.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from tracking.faces import DlibBackend, Face, dlib_predictor_path

SAME_PERSON_THRESHOLD = 0.6
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def descriptor_path() -> Path:
    """Path of dlib's ResNet face descriptor, beside the 68-point predictor in the
    `face-recognition-models` package (RetargetError when it is missing)."""
    path = dlib_predictor_path().parent / DESCRIPTOR_FILE
    if not path.is_file():
        raise RetargetError(f"{DESCRIPTOR_FILE} not found beside {dlib_predictor_path().name}: the identity judge "
                            "needs the face-recognition-models package (pip install face-recognition-models)")
    return path


@functools.lru_cache(maxsize=1)
def _descriptor_model():
    import dlib

    path = descriptor_path()
    try:
        return dlib, dlib.face_recognition_model_v1(str(path))
    except RuntimeError as exc:
        raise RetargetError(f"{path}: cannot load dlib's face descriptor ({exc})") from exc


class DlibJudge:
    """Faces, 68 landmarks and 128-d identity descriptors from dlib, CPU only.

    Faces come from the tracker's dlib backend (`tracking.faces.DlibBackend`: HOG detector and
    68-point predictor, loaded once per process and shared with tracking); the descriptor runs on
    the predictor's points of those faces, so no model is loaded twice.
    """

    name = "dlib"

    def __init__(self, backend: DlibBackend | None = None):
        self.backend = backend or DlibBackend()
        self._dlib, self._model = _descriptor_model()

    def face(self, rgb: np.ndarray) -> Face | None:
        """The most confident face (highest HOG margin) of an HxWx3 uint8 RGB image, or None.
        Not the largest, as tracking starts: on a JPEG of the astronaut at quality 30 the HOG
        detector also fires, weakly (margin 0.14 vs 1.53), on a larger patch of her suit."""
        return most_confident(self.backend.detect(rgb))

    def descriptor(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """(128,) float64 descriptor of `face` (from this judge's backend) in `rgb` (HxWx3 uint8).
        dlib aligns the face itself (a 150x150 chip from the 68 points, 25% padding)."""
        dlib = self._dlib
        x0, y0, x1, y1 = (int(round(float(v))) for v in face.bbox)
        rect = dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
        points = [dlib.point(int(round(float(x))), int(round(float(y)))) for x, y in face.lmk68]
        shape = dlib.full_object_detection(rect, points)
        return np.array(self._model.compute_face_descriptor(np.ascontiguousarray(rgb), shape), np.float64)

    def model_ids(self) -> dict:
        """Which files judged: {"descriptor": name, "landmarks": name}."""
        return {"descriptor": DESCRIPTOR_FILE, "landmarks": dlib_predictor_path().name,
                "detector": "dlib HOG frontal face detector"}


def most_confident(faces: list[Face]) -> Face | None:
    """The face with the highest detector score, or None for no faces."""
    return max(faces, key=lambda f: f.score) if faces else None


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two dlib descriptors (same person: under SAME_PERSON_THRESHOLD)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


class ArcFaceJudge:
    """ArcFace cosine similarity with the pipeline's own alignment: the conditioning model's view
    (it flatters the output, which was generated to match it). The actor photo is embedded as
    `RetargetPipeline.prepare_actor` does (the FFHQ script's alignment, then the 112 px ArcFace crop
    of the face found again on it); output frames from their own keypoints."""

    def __init__(self, onnx_path: Path, face_backend=None):
        from retarget.identity import ArcFaceEmbedder

        self.path = Path(onnx_path)
        self.embedder = ArcFaceEmbedder(self.path)
        self.face_backend = face_backend  # None: use the faces the caller found (dlib)

    def faces_for(self, rgb: np.ndarray, dlib_face: Face | None) -> Face | None:
        if self.face_backend is None:
            return dlib_face
        faces = self.face_backend.detect(rgb)
        return faces[0] if faces else None

    def actor_embedding(self, rgb: np.ndarray, face: Face, backend) -> np.ndarray:
        """(512,) unit vector of the actor photo, aligned as the pipeline aligns it
        (tracking.align.reference_and_identity; `backend` detects the face again on the aligned image)."""
        from tracking.align import arcface_crop, reference_and_identity

        if face.lmk68 is None:
            crop112, _ = arcface_crop(rgb, face.kps5)
        else:
            crop112 = reference_and_identity(rgb, face, self.face_backend or backend, size=512)[2]
        return self.embedder(crop112)[0]

    def embedding(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """(512,) unit vector of a face in a frame (5-point ArcFace crop)."""
        from tracking.align import arcface_crop

        return self.embedder(arcface_crop(rgb, face.kps5)[0])[0]
