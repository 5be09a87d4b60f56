"""Face detection and landmarks: three backends behind one small interface.

- ``dlib``: HOG detector + 68-point shape predictor from the ``dlib-bin`` and
  ``face-recognition-models`` packages. Always available offline; the fallback when the
  release models are absent.
- ``insightface``: SCRFD (``scrfd_10g_bnkps.onnx``) boxes and 5 keypoints plus ``1k3d68.onnx``
  68 landmarks from the antelopev2 folder; the release backend for identity (SPEC.md §2).
- ``mediapipe``: the Face Landmarker ``.task`` (478 landmarks); the release backend for
  tracking, whose landmarks define the SMIRK crop (SPEC.md §5).

Every backend returns :class:`Face` records in input-image pixels, largest face first.
Models load lazily (never at import) and the dlib models once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from render.errors import RetargetError

__all__ = [
    "Face",
    "FaceBackend",
    "DlibBackend",
    "InsightFaceBackend",
    "MediaPipeBackend",
    "make_face_backend",
    "follow_subject",
    "kps5_from_lmk68",
    "to_rgb_uint8",
    "bbox_iou",
    "dlib_predictor_path",
]

SCRFD_FILE = "scrfd_10g_bnkps.onnx"
LANDMARK68_FILE = "1k3d68.onnx"
DLIB_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"

# MediaPipe face-mesh indices (subject's right eye is image-left in an unmirrored image;
# FaceLandmarksConnections.FACE_LANDMARKS_RIGHT_EYE holds 33 and 133).
_MP_EYE_IMAGE_LEFT = (33, 133)
_MP_EYE_IMAGE_RIGHT = (362, 263)
_MP_NOSE_TIP = 1
_MP_MOUTH_IMAGE_LEFT = 61
_MP_MOUTH_IMAGE_RIGHT = 291


@dataclass
class Face:
    """One detected face, all coordinates in pixels of the image given to ``detect``.

    bbox: (4,) float32 x0, y0, x1, y1. score: detector confidence (SCRFD probability, dlib
    HOG margin, 1.0 for MediaPipe which reports none). kps5: (5, 2) float32 in insightface
    order: eye (image-left), eye (image-right), nose tip, mouth corner (image-left), mouth
    corner (image-right). lmk68: (68, 2) float32 iBUG-68 points or None. landmarks: (N, 2)
    float32, the densest set the backend has (478 MediaPipe, 68 dlib/insightface, or the 5
    keypoints when insightface runs without its landmark model).
    """

    bbox: np.ndarray
    score: float
    kps5: np.ndarray
    lmk68: np.ndarray | None
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        """Area of ``bbox`` in square pixels (0 for a degenerate box)."""
        w = max(float(self.bbox[2] - self.bbox[0]), 0.0)
        h = max(float(self.bbox[3] - self.bbox[1]), 0.0)
        return w * h

    @property
    def centre(self) -> np.ndarray:
        """(2,) float64 centre of ``bbox`` in pixels."""
        b = np.asarray(self.bbox, dtype=np.float64)
        return np.array([(b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0])


@runtime_checkable
class FaceBackend(Protocol):
    """A face detector with landmarks.

    ``detect(image_rgb, timestamp_ms=None)`` takes an HxWx3 uint8 RGB image (gray, RGBA
    and non-contiguous arrays are converted) and returns every face found, largest first.
    ``timestamp_ms`` (int, increasing) lets MediaPipe track across video frames; the other
    backends ignore it.
    """

    name: str

    def detect(self, image_rgb: np.ndarray, timestamp_ms: int | None = None) -> list[Face]: ...


# ---------------------------------------------------------------------------------------
# Small shared helpers


def to_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Return ``image`` as a C-contiguous HxWx3 uint8 RGB array.

    Accepts HxW (gray), HxWx1, HxWx3 and HxWx4 (alpha dropped) arrays of dtype uint8, or of
    another integer dtype whose values lie in 0..255. Anything else (floats, whose range is
    ambiguous; empty or wrongly shaped arrays) raises RetargetError naming ``what``.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "iub" or arr.size == 0:
            raise RetargetError(
                f"{what}: expected an 8-bit RGB image (uint8), got dtype {arr.dtype}; "
                "convert floats with (img * 255).round().astype(np.uint8)"
            )
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise RetargetError(
                f"{what}: integer image values {lo}..{hi} do not fit 8-bit RGB (0..255)"
            )
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise RetargetError(
            f"{what}: expected an HxW, HxWx3 or HxWx4 image, got shape {tuple(arr.shape)}"
        )
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def kps5_from_lmk68(lmk68: np.ndarray) -> np.ndarray:
    """(68, 2) iBUG points -> (5, 2) float32 keypoints in insightface order.

    Eye centres are the means of points 36-41 (image-left eye) and 42-47; nose tip 30;
    mouth corners 48 (image-left) and 54.
    """
    lm = np.asarray(lmk68, dtype=np.float64)
    return np.stack(
        [lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]
    ).astype(np.float32)


def bbox_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (4,) x0, y0, x1, y1 boxes; 0 when either is empty."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = float(ix) * float(iy)
    area_a = float(a[2] - a[0]) * float(a[3] - a[1])
    area_b = float(b[2] - b[0]) * float(b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def _largest_first(faces: list[Face]) -> list[Face]:
    return sorted(faces, key=lambda f: f.area, reverse=True)


def follow_subject(
    faces: list[Face],
    previous: Face | None,
    *,
    max_shift: float = 1.0,
    max_scale_change: float = 2.0,
    min_iou: float = 0.3,
) -> Face | None:
    """Pick the face that continues a track from one frame to the next.

    faces: this frame's detections (any order). previous: the subject's face in the last
    frame where it was found, or None to start a track (then the largest face is returned).
    A face plausibly continues the track when its box overlaps the previous one with IoU >=
    ``min_iou``, or when its centre moved at most ``max_shift`` previous face sizes (size =
    sqrt of box area) and its size changed by less than ``max_scale_change`` times. Among
    plausible faces the highest IoU wins, then the smallest move. Returns None when no face
    is plausible, so that the caller marks the frame invalid instead of jumping to a
    bystander.
    """
    if not faces:
        return None
    if previous is None:
        return _largest_first(faces)[0]
    prev_size = np.sqrt(max(previous.area, 1e-6))
    best, best_key = None, None
    for face in faces:
        iou = bbox_iou(face.bbox, previous.bbox)
        shift = float(np.linalg.norm(face.centre - previous.centre)) / prev_size
        ratio = np.sqrt(max(face.area, 1e-6)) / prev_size
        plausible = iou >= min_iou or (
            shift <= max_shift and 1.0 / max_scale_change < ratio < max_scale_change
        )
        if not plausible:
            continue
        key = (-iou, shift)
        if best_key is None or key < best_key:
            best, best_key = face, key
    return best


# ---------------------------------------------------------------------------------------
# dlib (offline fallback)


def dlib_predictor_path() -> Path:
    """Path of the 68-point predictor shipped by ``face-recognition-models``.

    Located without importing that package (its ``__init__`` needs pkg_resources). Raises
    RetargetError when the package or the file is missing.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "models" / DLIB_PREDICTOR_FILE
        if path.is_file():
            return path
    raise RetargetError(
        f"{DLIB_PREDICTOR_FILE} not found: the dlib face backend needs the "
        "face-recognition-models package (pip install face-recognition-models)"
    )


# dlib's detector and predictor are shared by every backend of the process (`_dlib_models`) and
# are not safe to call from two threads at once (seen: heap corruption when a job found the
# actor's face while its clip was tracked in another thread): each call holds this lock.
DLIB_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _dlib_models():
    """(HOG detector, 68-point predictor), loaded once per process."""
    try:
        import dlib
    except ImportError as exc:
        raise RetargetError(
            "the dlib face backend needs the dlib-bin package (pip install dlib-bin)"
        ) from exc
    path = dlib_predictor_path()
    try:
        predictor = dlib.shape_predictor(str(path))
    except RuntimeError as exc:
        raise RetargetError(f"{path}: cannot load the dlib 68-point predictor ({exc})") from exc
    return dlib, dlib.get_frontal_face_detector(), predictor


class DlibBackend:
    """HOG face detector + 68-point landmarks (dlib), CPU only.

    Detection runs on a copy shrunk to ``detect_side`` pixels on its longest side (HOG cost
    grows with area); when nothing is found there, once more at twice that size, so faces
    of ~80 px in the shrunk copy (the HOG window) or ~40 px in the larger try are found.
    Images whose detection copy is under ``upsample_below`` pixels are upsampled once by
    dlib so that faces in small images are found. Landmarks are predicted at full
    resolution. ``adjust_threshold`` shifts dlib's HOG decision threshold (0 = default).
    """

    name = "dlib"

    def __init__(
        self, *, detect_side: int = 640, upsample_below: int = 400, adjust_threshold: float = 0.0
    ) -> None:
        if detect_side < 80:
            raise RetargetError(f"detect_side must be at least 80 pixels, got {detect_side}")
        self.detect_side = int(detect_side)
        self.upsample_below = int(upsample_below)
        self.adjust_threshold = float(adjust_threshold)

    def _boxes(self, detector, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        import cv2

        h, w = image.shape[:2]
        longest = max(h, w)
        first = min(1.0, self.detect_side / longest)
        scales = [first] if first >= 1.0 else [first, min(1.0, 2.0 * first)]
        for s in scales:
            if s < 1.0:
                size = (max(1, round(w * s)), max(1, round(h * s)))
                small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
                sx, sy = size[0] / w, size[1] / h
            else:
                small, sx, sy = image, 1.0, 1.0
            upsample = 1 if max(small.shape[:2]) < self.upsample_below else 0
            with DLIB_LOCK:
                rects, scores, _ = detector.run(small, upsample, self.adjust_threshold)
            if len(rects):
                # dlib rectangles are inclusive pixel indices; the box edges are left and
                # right + 1, scaled back to full-resolution edges.
                return [
                    (
                        np.array(
                            [r.left() / sx, r.top() / sy, (r.right() + 1) / sx, (r.bottom() + 1) / sy],
                            dtype=np.float32,
                        ),
                        float(score),
                    )
                    for r, score in zip(rects, scores)
                ]
        return []

    def _models(self):
        """(dlib module, HOG detector, landmark predictor); subclasses may bring another predictor."""
        return _dlib_models()

    def _face(self, bbox: np.ndarray, score: float, points: np.ndarray) -> Face:
        """A Face from a detector box and the predictor's points (68 here)."""
        return Face(bbox=bbox, score=score, kps5=kps5_from_lmk68(points), lmk68=points, landmarks=points)

    def _landmarks(self, image: np.ndarray, bbox: np.ndarray, score: float) -> Face:
        dlib, _, predictor = self._models()
        # dlib rectangles hold inclusive pixel indices: right = x1 - 1.
        rect = dlib.rectangle(
            int(round(bbox[0])), int(round(bbox[1])), int(round(bbox[2])) - 1, int(round(bbox[3])) - 1
        )
        with DLIB_LOCK:
            shape = predictor(image, rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        return self._face(np.asarray(bbox, dtype=np.float32), float(score), points)

    def landmarks_in_box(self, image_rgb: np.ndarray, bbox: np.ndarray, score: float = 0.0) -> Face:
        """Run only the landmark predictor inside ``bbox`` (no detection, no check that a face
        is there). image_rgb: HxWx3 uint8 RGB; bbox: (4,) x0, y0, x1, y1 pixels, a box like
        the HOG detector's (brows to lower lip, cheek to cheek). Returns a Face with that
        bbox, ``score`` and the predicted points (~0.6 ms a face for the 68-point model)."""
        return self._landmarks(to_rgb_uint8(image_rgb), np.asarray(bbox, dtype=np.float32), score)

    def detect(self, image_rgb: np.ndarray, timestamp_ms: int | None = None) -> list[Face]:
        """HxWx3 uint8 RGB image -> faces (bbox, HOG margin, kps5, lmk68), largest first."""
        image = to_rgb_uint8(image_rgb)
        _, detector, _ = self._models()
        faces = [self._landmarks(image, box, score) for box, score in self._boxes(detector, image)]
        return _largest_first(faces)

    # Tracking: the HOG detector re-run on a small window around the previous landmarks,
    # scaled so that the face is about TRACK_FACE_PX (the HOG window is 80 px, and dlib's
    # pyramid shrinks by 5/6 a level, so faces of ~80-115 px in the window are found).
    TRACK_FACE_PX = 88.0
    TRACK_MARGIN = 0.15  # the window: the previous landmarks' box grown by this on each side
    TRACK_MIN_IOU = 0.3  # below this the face jumped: not the same face, let detection decide

    def track(self, image_rgb: np.ndarray, previous: Face) -> Face | None:
        """Find ``previous`` (a Face of the last frame) again in this frame, ~10x cheaper than
        ``detect``: HOG detection only in a window around the previous landmarks' box, at a
        fixed face scale, then the landmark predictor in the box found. Returns None when the
        window holds no face the detector accepts (face gone, blank frame, occlusion), or the
        box found overlaps the previous one by IoU < TRACK_MIN_IOU; the caller should then run
        ``detect`` on the whole frame."""
        import cv2

        image = to_rgb_uint8(image_rgb)
        h, w = image.shape[:2]
        lm = np.asarray(previous.landmarks, dtype=np.float64)
        # The box of the landmarks and the detector box together: sparse landmark sets
        # (5 points) would leave out most of the face.
        box = np.asarray(previous.bbox, dtype=np.float64)
        lo, hi = np.minimum(lm.min(0), box[:2]), np.maximum(lm.max(0), box[2:])
        span = hi - lo
        face_size = float(np.sqrt(max(previous.area, 1.0)))
        if min(span) < 2.0 or face_size < 8.0:
            return None
        grow = self.TRACK_MARGIN * span
        x0, y0 = (int(np.floor(v)) for v in np.maximum(lo - grow, 0))
        x1, y1 = int(np.ceil(min(hi[0] + grow[0], w))), int(np.ceil(min(hi[1] + grow[1], h)))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        s = self.TRACK_FACE_PX / face_size
        size = (max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s)))
        window = cv2.resize(image[y0:y1, x0:x1], size,
                            interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        sx, sy = size[0] / (x1 - x0), size[1] / (y1 - y0)
        _, detector, _ = self._models()
        with DLIB_LOCK:
            rects, scores, _ = detector.run(window, 0, self.adjust_threshold)
        best, best_iou = None, self.TRACK_MIN_IOU
        for r, score in zip(rects, scores):
            box = np.array([r.left() / sx + x0, r.top() / sy + y0,
                            (r.right() + 1) / sx + x0, (r.bottom() + 1) / sy + y0], dtype=np.float32)
            iou = bbox_iou(box, previous.bbox)
            if iou >= best_iou:
                best, best_iou = (box, float(score)), iou
        if best is None:
            return None
        return self._landmarks(image, *best)


# ---------------------------------------------------------------------------------------
# insightface (release identity backend)


def _onnx_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, else CPU only."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _load_insightface_model(path: Path, providers: list[str], taskname: str):
    """One insightface model-zoo model from an ONNX file, checked to be ``taskname``."""
    try:
        from insightface.model_zoo import get_model
    except ImportError as exc:
        raise RetargetError(
            "the insightface face backend needs the insightface package (pip install insightface)"
        ) from exc
    try:
        model = get_model(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for truncated/garbage files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetargetError(f"{path}: not a readable insightface ONNX model ({detail[:200]})") from exc
    found = getattr(model, "taskname", None)
    if found != taskname:
        what = f"a {found} model" if found else "a model insightface does not recognise"
        raise RetargetError(f"{path}: expected an insightface {taskname} model, found {what}")
    return model


class InsightFaceBackend:
    """SCRFD boxes + 5 keypoints, and 68 landmarks from ``1k3d68.onnx`` when present.

    antelopev2_dir: the release folder holding ``scrfd_10g_bnkps.onnx`` (required) and
    ``1k3d68.onnx`` (optional). The recognition model in that folder (glintr100.onnx) is
    never loaded; identity uses ``arcface.onnx`` elsewhere. det_size: SCRFD input side
    (640 as in the Arc2Face demo). Models load here, so a bad file fails at construction.
    """

    name = "insightface"

    def __init__(self, antelopev2_dir: str | Path, *, det_size: int = 640, det_thresh: float = 0.5):
        folder = Path(antelopev2_dir)
        scrfd = folder / SCRFD_FILE
        if not scrfd.is_file():
            raise RetargetError(f"{scrfd}: insightface face detector not found")
        providers = _onnx_providers()
        ctx_id = 0 if providers[0] == "CUDAExecutionProvider" else -1
        self._detector = _load_insightface_model(scrfd, providers, "detection")
        self._detector.prepare(ctx_id, input_size=(det_size, det_size), det_thresh=det_thresh)
        self._landmarker = None
        lmk_file = folder / LANDMARK68_FILE
        if lmk_file.is_file():
            self._landmarker = _load_insightface_model(lmk_file, providers, "landmark_3d_68")
            self._landmarker.prepare(ctx_id)

    def detect(self, image_rgb: np.ndarray, timestamp_ms: int | None = None) -> list[Face]:
        """HxWx3 uint8 RGB image -> faces (SCRFD bbox/score/kps5, lmk68 if 1k3d68), largest first."""
        image = to_rgb_uint8(image_rgb)
        # insightface models take OpenCV-order (BGR) images and swap to RGB internally.
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        boxes, kpss = self._detector.detect(bgr, max_num=0)
        faces = []
        for i in range(boxes.shape[0]):
            bbox = np.asarray(boxes[i, :4], dtype=np.float32)
            kps = np.asarray(kpss[i], dtype=np.float32)
            lmk68 = None
            if self._landmarker is not None:
                from insightface.app.common import Face as InsightFace

                record = InsightFace(bbox=boxes[i, :4], kps=kpss[i], det_score=boxes[i, 4])
                pred = self._landmarker.get(bgr, record)
                lmk68 = np.asarray(pred[:, :2], dtype=np.float32)
            faces.append(
                Face(
                    bbox=bbox,
                    score=float(boxes[i, 4]),
                    kps5=kps,
                    lmk68=lmk68,
                    landmarks=lmk68 if lmk68 is not None else kps,
                )
            )
        return _largest_first(faces)


# ---------------------------------------------------------------------------------------
# MediaPipe Face Landmarker (release tracking backend)


class MediaPipeBackend:
    """MediaPipe Face Landmarker: 478 landmarks per face, in pixels.

    landmarker_path: the ``face_landmarker.task`` file (SPEC.md §1). IMAGE mode when
    ``detect`` gets no timestamp; VIDEO mode (landmarks tracked between frames) when it
    gets increasing ``timestamp_ms`` values. bbox is the min/max of the landmarks; kps5
    comes from mesh points (eye corners 33/133 and 362/263 averaged, nose tip 1, mouth
    corners 61/291); lmk68 is None (no published 478->68 map we trust). The model loads
    here, so a bad file fails at construction.
    """

    name = "mediapipe"

    def __init__(
        self, landmarker_path: str | Path, *, max_faces: int = 4, min_confidence: float = 0.5
    ) -> None:
        self.path = Path(landmarker_path)
        if not self.path.is_file():
            raise RetargetError(f"{self.path}: MediaPipe Face Landmarker model not found")
        self.max_faces = int(max_faces)
        self.min_confidence = float(min_confidence)
        self._image_mode = self._create("IMAGE")
        self._video_mode = None
        self._last_timestamp: int | None = None

    def _create(self, mode: str):
        try:
            from mediapipe.tasks.python import vision
            from mediapipe.tasks.python.core.base_options import BaseOptions
        except ImportError as exc:
            raise RetargetError(
                "the mediapipe face backend needs the mediapipe package (pip install mediapipe)"
            ) from exc
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(self.path)),
            running_mode=getattr(vision.RunningMode, mode),
            num_faces=self.max_faces,
            min_face_detection_confidence=self.min_confidence,
            min_face_presence_confidence=self.min_confidence,
        )
        try:
            return vision.FaceLandmarker.create_from_options(options)
        except Exception as exc:  # mediapipe raises RuntimeError/ValueError for bad models
            raise RetargetError(
                f"{self.path}: not a usable MediaPipe Face Landmarker model ({str(exc)[:200]})"
            ) from exc

    def detect(self, image_rgb: np.ndarray, timestamp_ms: int | None = None) -> list[Face]:
        """HxWx3 uint8 RGB image (+ optional increasing timestamp in ms) -> faces, largest first."""
        import mediapipe as mp

        image = to_rgb_uint8(image_rgb)
        h, w = image.shape[:2]
        mp_image = mp.Image(image_format=mp.ImageFormat.SRGB, data=image)
        if timestamp_ms is None:
            result = self._image_mode.detect(mp_image)
        else:
            ts = int(timestamp_ms)
            if self._last_timestamp is not None and ts <= self._last_timestamp:
                raise RetargetError(
                    f"MediaPipe video mode needs increasing timestamps: got {ts} ms after "
                    f"{self._last_timestamp} ms"
                )
            if self._video_mode is None:
                self._video_mode = self._create("VIDEO")
            result = self._video_mode.detect_for_video(mp_image, ts)
            self._last_timestamp = ts
        faces = []
        for points in result.face_landmarks:
            pts = np.array([(p.x * w, p.y * h) for p in points], dtype=np.float32)
            kps5 = np.stack(
                [
                    pts[list(_MP_EYE_IMAGE_LEFT)].mean(0),
                    pts[list(_MP_EYE_IMAGE_RIGHT)].mean(0),
                    pts[_MP_NOSE_TIP],
                    pts[_MP_MOUTH_IMAGE_LEFT],
                    pts[_MP_MOUTH_IMAGE_RIGHT],
                ]
            ).astype(np.float32)
            bbox = np.concatenate([pts.min(0), pts.max(0)]).astype(np.float32)
            faces.append(Face(bbox=bbox, score=1.0, kps5=kps5, lmk68=None, landmarks=pts))
        return _largest_first(faces)

    def close(self) -> None:
        """Release the MediaPipe graphs (also done when the object is garbage collected)."""
        for landmarker in (self._image_mode, self._video_mode):
            if landmarker is not None:
                landmarker.close()
        self._image_mode = self._video_mode = None


# ---------------------------------------------------------------------------------------


def make_face_backend(
    kind: str = "auto",
    *,
    antelopev2_dir: str | Path | None = None,
    landmarker_path: str | Path | None = None,
) -> FaceBackend:
    """Build a face backend.

    kind: "auto", "mediapipe", "insightface" or "dlib". "auto" picks MediaPipe when
    ``landmarker_path`` is an existing file (tracking), else insightface when
    ``antelopev2_dir`` holds ``scrfd_10g_bnkps.onnx`` (identity), else dlib. Naming a
    backend explicitly requires its model (RetargetError naming the missing path). A
    present but corrupt model file raises RetargetError naming the file; it never falls
    back silently.
    """
    if kind == "auto":
        if landmarker_path is not None and Path(landmarker_path).is_file():
            return MediaPipeBackend(landmarker_path)
        if antelopev2_dir is not None and (Path(antelopev2_dir) / SCRFD_FILE).is_file():
            return InsightFaceBackend(antelopev2_dir)
        return DlibBackend()
    if kind == "dlib":
        return DlibBackend()
    if kind == "insightface":
        if antelopev2_dir is None:
            raise RetargetError("face backend 'insightface' needs the antelopev2 folder")
        return InsightFaceBackend(antelopev2_dir)
    if kind == "mediapipe":
        if landmarker_path is None:
            raise RetargetError("face backend 'mediapipe' needs the face_landmarker.task path")
        return MediaPipeBackend(landmarker_path)
    raise RetargetError(
        f"unknown face backend {kind!r}: choose auto, mediapipe, insightface or dlib"
    )
