"""A face backend with the real interface and small stand-in models, for the GPU machine.

dlib's 68-point predictor (100 MB) cannot travel to the benchmark GPU host (64 MiB a call, with
wheels), and the bench must run every stage of `retarget run` there on a 1080p clip. This backend
is `tracking.faces.DlibBackend` (the same HOG detector, built into dlib: no file, the same
detection, tracking windows and boxes) with dlib's real 5-point shape predictor
(`shape_predictor_5_face_landmarks.dat`, 9 MB, from face-recognition-models) in place of the
68-point one, and the 68 points placed by a least-squares similarity fit of a mean 68-point shape
to the 5 points. The 68 points are a STAND-IN for landmark positions: they follow the face's
position, size and roll, never its expression (the SMIRK crop and the FFHQ alignment of the actor
photo use them; both depend on the face's box and eye/mouth line, which the fit keeps). Cost:
the same detector; the 5-point predictor is a little cheaper than the 68-point one (both are
well under a millisecond a face, against several ms of HOG detection a frame).

The mean shape (bench/standin_mean_shape.json) was made here with `fit` from the real 68-point
and 5-point predictors on two public-domain photos (scikit-image's astronaut and matplotlib's
grace_hopper.jpg), each at several rotations and scales, aligned by generalised Procrustes on
the 5 points. Its error against the real 68 points is in the JSON (mean, per face, in units of
the inter-ocular distance), for the photos it was fitted on and left out.

    python bench/standin_faces.py fit [OUT.json]      # here: needs the 68-point model
    python bench/standin_faces.py check IMAGE...      # boxes and 68-point error vs the real backend

On the GPU host: `install(path_5pt)` (bench/run.py does it) makes `tracking.faces.make_face_backend`
build this backend, in this process and in the tracker's spawned face-finding workers (their
factory pickles a reference to this module's `make_face_backend`; the .dat path travels in
the environment variable RETARGET_STANDIN_5PT).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracking.faces import DlibBackend, Face, kps5_from_lmk68  # noqa: E402

ENV = "RETARGET_STANDIN_5PT"
PREDICTOR_5_FILE = "shape_predictor_5_face_landmarks.dat"
MEAN_SHAPE = Path(__file__).resolve().with_name("standin_mean_shape.json")


def predictor_5_path() -> Path:
    """$RETARGET_STANDIN_5PT, else the 5-point model of the installed face-recognition-models."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "models" / PREDICTOR_5_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(f"{PREDICTOR_5_FILE} not found: set {ENV} to its path "
                            "(face-recognition-models ships it in its models folder)")


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, no reflection) mapping (N, 2) `src` onto `dst`: a 2x3 matrix."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, s, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.sign(np.linalg.det(u @ vt))
    R = u @ np.diag([1.0, d]) @ vt
    scale = (s * [1.0, d]).sum() / a.var(0).sum()
    A = np.zeros((2, 3))
    A[:, :2] = scale * R
    A[:, 2] = md - scale * R @ ms
    return A


def _apply(A: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.asarray(pts, np.float64) @ A[:, :2].T + A[:, 2]


class StandinFaces(DlibBackend):
    """DlibBackend (HOG detection and tracking, unchanged) with 5-point landmarks and 68 points
    fitted from a mean shape: a Face with bbox and score as DlibBackend's, lmk68 and landmarks
    the (68, 2) fitted points, kps5 from them as for the 68-point model."""

    name = "dlib-hog+5pt, 68 points from a mean shape (bench stand-in)"

    def __init__(self, predictor_path: str | os.PathLike | None = None, mean_shape: str | os.PathLike | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        import dlib

        path = Path(predictor_path) if predictor_path else predictor_5_path()
        shape = json.loads(Path(mean_shape or MEAN_SHAPE).read_text())
        self.mean5 = np.asarray(shape["mean5"], np.float64)
        self.mean68 = np.asarray(shape["mean68"], np.float64)
        self._own = (dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)))

    def _models(self):
        return self._own

    def _face(self, bbox, score, points):
        lmk68 = _apply(similarity_fit(self.mean5, points), self.mean68).astype(np.float32)
        return Face(bbox=bbox, score=score, kps5=kps5_from_lmk68(lmk68), lmk68=lmk68, landmarks=lmk68)


def make_face_backend(*args, **kwargs) -> StandinFaces:
    """Stands in for tracking.faces.make_face_backend (any arguments): the stand-in backend with
    the 5-point model at $RETARGET_STANDIN_5PT. A module-level function, so that the tracker's
    backend factory (a functools.partial of it) pickles to its spawned workers."""
    return StandinFaces()


def install(predictor_path: str | os.PathLike | None = None) -> None:
    """Make every face backend of this process, and of the processes it spawns after, the stand-in."""
    import tracking.faces as faces

    path = Path(predictor_path) if predictor_path else predictor_5_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the 5-point dlib model ({PREDICTOR_5_FILE}) is not there")
    os.environ[ENV] = str(path.resolve())
    faces.make_face_backend = make_face_backend


# -- making and checking the mean shape (here, with the 68-point model) ------------------------

def _photos() -> dict[str, np.ndarray]:
    from skimage import data

    out = {"astronaut": np.ascontiguousarray(data.astronaut())}
    try:
        import matplotlib
        from PIL import Image

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        out["grace_hopper"] = np.asarray(Image.open(p).convert("RGB"))
    except Exception:  # matplotlib's sample data may be absent; the astronaut alone then
        pass
    return out


def _views(rgb: np.ndarray):
    """The photo rotated and scaled about its centre: the predictors' answers at several poses."""
    import cv2

    h, w = rgb.shape[:2]
    for angle in (-10.0, -4.0, 0.0, 4.0, 10.0):
        for scale in (0.8, 1.0, 1.25):
            A = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
            yield cv2.warpAffine(rgb, A, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _pairs(rgb_list) -> list[tuple[np.ndarray, np.ndarray]]:
    """(5-point, 68-point) predictions on the largest HOG face of each image."""
    import dlib

    real = DlibBackend()
    p5 = dlib.shape_predictor(str(predictor_5_path()))
    out = []
    for rgb in rgb_list:
        faces = real.detect(rgb)
        if not faces:
            continue
        b = faces[0].bbox
        rect = dlib.rectangle(int(round(b[0])), int(round(b[1])), int(round(b[2])) - 1, int(round(b[3])) - 1)
        five = np.array([(p.x, p.y) for p in p5(rgb, rect).parts()], np.float64)
        out.append((five, faces[0].lmk68.astype(np.float64)))
    return out


def mean_shape(pairs) -> tuple[np.ndarray, np.ndarray]:
    """Generalised Procrustes on the 5 points: (mean5 (5, 2), mean68 (68, 2)) in a frame where
    the mean 5 points have unit RMS size about their centre."""
    ref = pairs[0][0] - pairs[0][0].mean(0)
    ref /= np.sqrt((ref ** 2).sum(1).mean())
    for _ in range(5):
        A = [similarity_fit(five, ref) for five, _ in pairs]
        m5 = np.mean([_apply(a, f) for a, (f, _) in zip(A, pairs)], axis=0)
        m5 -= m5.mean(0)
        ref = m5 / np.sqrt((m5 ** 2).sum(1).mean())
    A = [similarity_fit(five, ref) for five, _ in pairs]
    m68 = np.mean([_apply(a, l68) for a, (_, l68) in zip(A, pairs)], axis=0)
    return ref, m68


def fit_error(mean5, mean68, pairs) -> float:
    """Mean distance, over faces and the 68 points, between the fitted and the real points, in
    units of each face's inter-ocular distance (eye centres of the real 68 points)."""
    errs = []
    for five, l68 in pairs:
        fitted = _apply(similarity_fit(mean5, five), mean68)
        iod = np.linalg.norm(l68[36:42].mean(0) - l68[42:48].mean(0))
        errs.append(np.linalg.norm(fitted - l68, axis=1).mean() / iod)
    return float(np.mean(errs))


def fit(out: Path = MEAN_SHAPE) -> Path:
    photos = _photos()
    pairs = {name: _pairs(_views(rgb)) for name, rgb in photos.items()}
    allp = [p for v in pairs.values() for p in v]
    m5, m68 = mean_shape(allp)
    errors = {f"{n} (fitted on all)": fit_error(m5, m68, v) for n, v in pairs.items()}
    for n in pairs:  # leave one photo out: the error on a face the shape was not made from
        rest = [p for k, v in pairs.items() if k != n for p in v]
        if rest:
            a5, a68 = mean_shape(rest)
            errors[f"{n} (left out)"] = fit_error(a5, a68, pairs[n])
    doc = {"what": "mean 68-point shape for bench/standin_faces.py, in the frame of the mean dlib 5-point shape",
           "made_from": {n: len(v) for n, v in pairs.items()},
           "mean_error_interocular": errors,
           "mean5": np.round(m5, 6).tolist(), "mean68": np.round(m68, 6).tolist()}
    Path(out).write_text(json.dumps(doc, indent=1))
    return Path(out)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "fit":
        path = fit(Path(sys.argv[2]) if len(sys.argv) > 2 else MEAN_SHAPE)
        print(path, json.dumps(json.loads(path.read_text())["mean_error_interocular"], indent=1))
    elif len(sys.argv) >= 3 and sys.argv[1] == "check":
        from render.video import open_video

        real, stand = DlibBackend(), StandinFaces()
        for p in sys.argv[2:]:
            rgb = next(iter(open_video(p))).rgb
            a, b = real.detect(rgb), stand.detect(rgb)
            for fa, fb in zip(a, b):
                iod = np.linalg.norm(fa.lmk68[36:42].mean(0) - fa.lmk68[42:48].mean(0))
                print(p, "box equal:", bool(np.array_equal(fa.bbox, fb.bbox)), "68-point error / inter-ocular:",
                      round(float(np.linalg.norm(fa.lmk68 - fb.lmk68, axis=1).mean() / iod), 4))
            print(p, f"faces: real {len(a)}, stand-in {len(b)}")
    else:
        sys.exit(__doc__)
