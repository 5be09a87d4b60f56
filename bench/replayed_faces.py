"""Faces found here, replayed on the GPU machine.

The benchmark GPU host has neither dlib nor room for its 100 MB 68-point model (64 MiB travel
limit), yet the once-per-video actor preparation needs the actor's 68 landmarks. So the bench's
input images are run through the real dlib backend on this machine (`record`), and on the GPU
host `install` makes `tracking.faces.make_face_backend` return a backend that gives back those
same `Face`s for those same images (matched by their bytes) and refuses any other image. Only
face *finding* is replayed, and only for the images recorded; everything after it (alignment,
ArcFace, VAE, writer, rendering, paste-back, video) runs for real. The replay takes no time,
where dlib takes a few tens of ms once per video on one photo: state it beside the figures.

    python bench/replayed_faces.py record OUT.json IMAGE...     # here, with dlib installed
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def _key(rgb: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest()[:20] + f"-{rgb.shape}"


def _thumb(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(np.ascontiguousarray(rgb), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def _faces_json(faces) -> list[dict]:
    return [{"bbox": f.bbox.tolist(), "score": float(f.score), "kps5": f.kps5.tolist(),
             "lmk68": None if f.lmk68 is None else f.lmk68.tolist(), "landmarks": f.landmarks.tolist()}
            for f in faces]


def record(out: str | Path, images: list[str | Path]) -> Path:
    """Detect the faces of each image with the dlib backend and save them as JSON at `out`; also
    those of each image's FFHQ-aligned reference, where the pipeline detects the face again."""
    from render.video import open_video
    from tracking.align import ffhq_align_exact
    from tracking.faces import make_face_backend

    backend = make_face_backend("dlib")
    table = {}

    def put(rgb, name):
        faces = backend.detect(rgb)
        table[_key(rgb)] = {"image": name, "shape": list(rgb.shape), "thumb": _thumb(rgb).round(2).tolist(),
                            "faces": _faces_json(faces)}
        return faces

    for path in images:
        rgb = next(iter(open_video(path))).rgb
        faces = put(rgb, Path(path).name)
        if faces and faces[0].lmk68 is not None:
            face = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
            put(ffhq_align_exact(rgb, face.lmk68, size=512)[0], Path(path).name + " (FFHQ-aligned)")
    Path(out).write_text(json.dumps(table))
    return Path(out)


class ReplayedFaces:
    """A FaceBackend (tracking.faces) answering only for the recorded images: the same bytes, or
    (for the aligned reference, which another OpenCV/PIL build may resample a level apart) an image
    of the same shape within 3 levels of a recorded one at 32x32."""

    name = "dlib (replayed)"

    def __init__(self, table: dict):
        self.table = table

    def _entry(self, rgb: np.ndarray) -> dict | None:
        entry = self.table.get(_key(rgb))
        if entry is not None:
            return entry
        thumb = _thumb(rgb)
        for e in self.table.values():
            if tuple(e["shape"]) == rgb.shape and np.abs(np.asarray(e["thumb"], np.float32) - thumb).mean() < 3:
                return e
        return None

    def detect(self, image_rgb: np.ndarray, timestamp_ms=None) -> list:
        from tracking.faces import Face

        image = np.asarray(image_rgb)
        if image.min() == image.max():
            return []  # a blank image (a worker's warm-up call) has no face, for dlib too
        entry = self._entry(image)
        if entry is None:
            raise RuntimeError("replayed faces: this image was not recorded (record it with bench/replayed_faces.py)")
        return [Face(bbox=np.asarray(f["bbox"], np.float32), score=f["score"], kps5=np.asarray(f["kps5"], np.float32),
                     lmk68=None if f["lmk68"] is None else np.asarray(f["lmk68"], np.float32),
                     landmarks=np.asarray(f["landmarks"], np.float32)) for f in entry["faces"]]


def install(path: str | Path) -> None:
    """Make every face backend of this process the replay of the faces recorded in `path`."""
    import tracking.faces as faces

    backend = ReplayedFaces(json.loads(Path(path).read_text()))
    faces.make_face_backend = lambda *a, **k: backend


ENV = "RETARGET_REPLAYED_FACES"


def install_from_env() -> None:
    """`install($RETARGET_REPLAYED_FACES)`: a Ray `worker_process_setup_hook`, so that the
    bench's Ray workers replay the same faces as its driver."""
    import os

    if os.environ.get(ENV):
        install(os.environ[ENV])


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "record":
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(record(sys.argv[2], sys.argv[3:]))
