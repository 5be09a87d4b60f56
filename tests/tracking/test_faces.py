"""Face backends on a real face (the astronaut): detection, landmarks, equivariance, factory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from render.errors import RetargetError
from tracking.align import apply_affine
from tracking.faces import (
    DlibBackend,
    Face,
    bbox_iou,
    follow_subject,
    kps5_from_lmk68,
    make_face_backend,
    to_rgb_uint8,
)

# Head region of the astronaut (rows, cols) pasted into the two-face scene.
HEAD = (slice(20, 280), slice(110, 340))
PASTES = [(2.0, (10, 40)), (1.3, (480, 200))]  # (scale, (x, y) offset); largest first


@pytest.fixture(scope="module")
def two_face_scene(dlib_backend, astronaut_rgb):
    """An 800x600 grey frame with the astronaut's head at 2.0x and 1.3x; their detections."""
    import cv2

    head = astronaut_rgb[HEAD]
    scene = np.full((600, 800, 3), 128, np.uint8)
    for scale, (ox, oy) in PASTES:
        h, w = head.shape[:2]
        big = cv2.resize(head, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
        scene[oy:oy + big.shape[0], ox:ox + big.shape[1]] = big
    return scene, dlib_backend.detect(scene)


def test_dlib_finds_the_astronaut_with_plausible_landmarks(astronaut_faces, astronaut_rgb):
    assert len(astronaut_faces) == 1
    face = astronaut_faces[0]
    assert face.bbox.shape == (4,) and face.bbox.dtype == np.float32
    assert face.lmk68.shape == (68, 2) and face.lmk68.dtype == np.float32
    assert face.landmarks is face.lmk68
    assert face.score > 0
    # The face is in the upper middle of the photo and of a believable size.
    w, h = face.bbox[2] - face.bbox[0], face.bbox[3] - face.bbox[1]
    assert 60 < w < 150 and 60 < h < 150
    # dlib's box is tight (brows to lower lip); the jaw line may leave it by a few pixels.
    x0, y0, x1, y1 = face.bbox
    inner = face.lmk68[17:]  # brows, nose, eyes, mouth
    assert np.all((inner[:, 0] >= x0) & (inner[:, 0] <= x1) & (inner[:, 1] >= y0) & (inner[:, 1] <= y1))
    margin = 0.25 * w
    assert np.all((face.lmk68[:, 0] >= x0 - margin) & (face.lmk68[:, 0] <= x1 + margin))
    assert np.all((face.lmk68[:, 1] >= y0 - margin) & (face.lmk68[:, 1] <= y1 + margin))
    eye_l, eye_r, nose, mouth_l, mouth_r = face.kps5
    assert eye_l[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
    assert eye_l[0] < nose[0] < eye_r[0]
    # Chin (8) below the mouth, brows (19, 24) above the eyes.
    assert face.lmk68[8, 1] > face.lmk68[57, 1] and face.lmk68[19, 1] < eye_l[1]


def test_kps5_follow_insightface_order():
    lmk = np.zeros((68, 2), np.float32)
    lmk[36:42] = [10, 20]
    lmk[42:48] = [30, 20]
    lmk[30] = [20, 30]
    lmk[48] = [12, 40]
    lmk[54] = [28, 40]
    expected = np.array([[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]], np.float32)
    np.testing.assert_array_equal(kps5_from_lmk68(lmk), expected)


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_no_face_on_blank_or_noise(dlib_backend, kind):
    rng = np.random.default_rng(0)
    image = np.full((480, 640, 3), 200, np.uint8) if kind == "blank" else rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    assert dlib_backend.detect(image) == []


def test_two_faces_largest_first(two_face_scene, astronaut_face):
    scene, faces = two_face_scene
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    for face, (scale, (ox, oy)) in zip(faces, PASTES):
        # Where the original face box lands in the scene.
        x0, y0, x1, y1 = astronaut_face.bbox
        expected = np.array(
            [(x0 - HEAD[1].start) * scale + ox, (y0 - HEAD[0].start) * scale + oy,
             (x1 - HEAD[1].start) * scale + ox, (y1 - HEAD[0].start) * scale + oy]
        )
        assert bbox_iou(face.bbox, expected) > 0.6


def test_landmarks_follow_a_known_rotation_and_scale(astronaut_view, astronaut_face):
    """Landmarks found on a rotated/scaled copy = the original landmarks moved by the same affine.

    Tolerance: mean error under 2 px and 2.5% of the face size, max under 5 px (measured
    about 0.6-1.0 px mean, 2.5 px max on both views).
    """
    assert astronaut_view.faces, "no face on the warped astronaut"
    face = astronaut_view.faces[0]
    expected = apply_affine(astronaut_view.A, astronaut_face.lmk68)
    err = np.linalg.norm(face.lmk68 - expected, axis=1)
    size = np.sqrt(face.area)
    assert err.mean() < min(2.0, 0.025 * size)
    assert err.max() < 5.0
    # The box scaled with the image (HOG boxes come in fixed steps: loose tolerance).
    scale = np.sqrt(abs(np.linalg.det(astronaut_view.A[:, :2])))
    assert 0.75 < size / (np.sqrt(astronaut_face.area) * scale) < 1.33


def test_input_conversions_give_the_same_landmarks(dlib_backend, astronaut_rgb, astronaut_face):
    rgba = np.dstack([astronaut_rgb, np.full(astronaut_rgb.shape[:2], 255, np.uint8)])
    strided = np.dstack([astronaut_rgb, astronaut_rgb])[:, :, :3]
    fortran = np.asfortranarray(astronaut_rgb)
    assert not strided.flags.c_contiguous and not fortran.flags.c_contiguous
    for variant in (rgba, strided, fortran, astronaut_rgb.astype(np.int16)):
        faces = dlib_backend.detect(variant)
        assert len(faces) == 1
        np.testing.assert_array_equal(faces[0].lmk68, astronaut_face.lmk68)
    gray = (astronaut_rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
    faces = dlib_backend.detect(gray)
    assert len(faces) == 1
    assert np.abs(faces[0].lmk68 - astronaut_face.lmk68).mean() < 2.0


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.full((64, 64, 3), 300, np.int32), "0..255"),
        (np.zeros((64, 64, 2), np.uint8), "shape"),
        (np.zeros((0, 64, 3), np.uint8), "shape"),
        (np.zeros((4, 64, 64, 3), np.uint8), "shape"),
    ],
)
def test_bad_images_are_rejected(dlib_backend, bad, words):
    with pytest.raises(RetargetError, match=words):
        dlib_backend.detect(bad)
    with pytest.raises(RetargetError, match="frame 7"):
        to_rgb_uint8(bad, what="frame 7")


def test_large_frames_are_detected_on_a_shrunk_copy(dlib_backend, astronaut_rgb, astronaut_face):
    """A 1536x1536 frame (3x) is searched at 640 px; landmarks come from full resolution."""
    import cv2

    big = cv2.resize(astronaut_rgb, (1536, 1536), interpolation=cv2.INTER_CUBIC)
    faces = dlib_backend.detect(big)
    assert len(faces) == 1
    expected = (astronaut_face.lmk68 + 0.5) * 3 - 0.5
    err = np.linalg.norm(faces[0].lmk68 - expected, axis=1)
    assert err.mean() < 4.0  # 1.3 % of the 300 px face


def test_small_faces_in_large_frames_get_a_second_try(astronaut_rgb):
    """A face too small for HOG in the 640 px copy is found by the 2x retry."""
    import cv2

    frame = np.full((1080, 1920, 3), 128, np.uint8)
    head = cv2.resize(astronaut_rgb[HEAD], None, fx=1.4, fy=1.4, interpolation=cv2.INTER_LINEAR)
    frame[300:300 + head.shape[0], 900:900 + head.shape[1]] = head  # face ~120 px, ~40 px at 640
    single = DlibBackend(detect_side=640)
    shrunk = cv2.resize(frame, (640, 360), interpolation=cv2.INTER_AREA)
    assert single.detect(shrunk) == []  # the first, 640 px pass alone misses it
    faces = single.detect(frame)
    assert len(faces) == 1
    cx, cy = faces[0].centre
    assert 900 < cx < 900 + head.shape[1] and 300 < cy < 300 + head.shape[0]


# --- follow_subject ------------------------------------------------------------------------


def _moved(face: Face, dx: float, dy: float = 0.0) -> Face:
    shift = np.array([dx, dy], np.float32)
    return dataclasses.replace(
        face,
        bbox=face.bbox + np.tile(shift, 2),
        kps5=face.kps5 + shift,
        lmk68=face.lmk68 + shift,
        landmarks=face.landmarks + shift,
    )


def test_follow_subject_keeps_the_subject_when_a_larger_bystander_appears(two_face_scene):
    _, faces = two_face_scene
    big, small = faces
    assert follow_subject(faces, None) is big
    # The subject (small face) moved a little since the last frame.
    previous = _moved(small, -12.0, 5.0)
    assert follow_subject(faces, previous) is small
    assert follow_subject(list(reversed(faces)), previous) is small


def test_follow_subject_drops_a_track_instead_of_jumping(two_face_scene):
    _, faces = two_face_scene
    big, small = faces
    assert follow_subject([big], small) is None
    assert follow_subject([], small) is None
    width = float(small.bbox[2] - small.bbox[0])
    assert follow_subject([_moved(small, 0.6 * width)], small) is not None
    assert follow_subject([_moved(small, 1.5 * width)], small) is None


# --- factory ---------------------------------------------------------------------------------


def test_factory_falls_back_to_dlib_without_release_models(tmp_path):
    assert make_face_backend().name == "dlib"
    assert make_face_backend(antelopev2_dir=tmp_path / "missing").name == "dlib"
    assert make_face_backend(antelopev2_dir=tmp_path, landmarker_path=tmp_path / "none.task").name == "dlib"
    assert make_face_backend("dlib").name == "dlib"


def test_factory_rejects_unknown_or_incomplete_requests(tmp_path):
    with pytest.raises(RetargetError, match="unknown face backend"):
        make_face_backend("retinaface")
    with pytest.raises(RetargetError, match="antelopev2"):
        make_face_backend("insightface")
    with pytest.raises(RetargetError, match="scrfd_10g_bnkps.onnx"):
        make_face_backend("insightface", antelopev2_dir=tmp_path)
    with pytest.raises(RetargetError, match="face_landmarker.task"):
        make_face_backend("mediapipe")
    with pytest.raises(RetargetError, match="nothing.task"):
        make_face_backend("mediapipe", landmarker_path=tmp_path / "nothing.task")


def test_corrupt_scrfd_file_is_named(tmp_path):
    bad = tmp_path / "scrfd_10g_bnkps.onnx"
    bad.write_bytes(b"\x08\x07 not an onnx model " * 64)
    with pytest.raises(RetargetError, match="scrfd_10g_bnkps.onnx"):
        make_face_backend(antelopev2_dir=tmp_path)


def test_an_onnx_file_that_is_not_a_detector_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 50, 50])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 50, 50])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "scrfd_10g_bnkps.onnx")
    with pytest.raises(RetargetError, match="scrfd_10g_bnkps.onnx.*detection"):
        make_face_backend(antelopev2_dir=tmp_path)


def test_corrupt_landmarker_task_is_named_and_not_skipped(tmp_path):
    bad = tmp_path / "face_landmarker.task"
    bad.write_bytes(b"PK garbage, not a MediaPipe bundle" * 32)
    # A present but broken model must fail loudly, not fall back to dlib.
    with pytest.raises(RetargetError, match="face_landmarker.task"):
        make_face_backend(landmarker_path=bad)


def _write_scrfd_shaped_onnx(path):
    """An ONNX graph with SCRFD's interface (9 outputs: scores, box and keypoint distances
    at strides 8/16/32, 2 anchors) and handmade weights: it is no face detector. Its
    stride-32 score is the mean of the network's first input channel over each 32x32 cell
    (insightface swaps BGR to RGB, so that is red); boxes are anchor +- 1 stride; keypoint
    k sits at anchor + (0.2k, 0.2k + 0.1) strides. It exercises our use of insightface's
    SCRFD code: colour order, det-size scaling, output parsing."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    for kind, ch in (("score", 1), ("bbox", 4), ("kps", 10)):
        for s in (8, 16, 32):
            w = np.zeros((2 * ch, 3, s, s), np.float32)
            b = np.zeros(2 * ch, np.float32)
            if kind == "score" and s == 32:
                w[:, 0] = 0.5 / (s * s)  # input normalised to about [-1, 1] -> score in [0, 1]
                b[:] = 0.5
            elif kind == "bbox":
                b[:] = 1.0
            elif kind == "kps":
                b[:] = np.tile(np.arange(10, dtype=np.float32) * 0.1, 2)
            name = f"{kind}{s}"
            inits += [
                numpy_helper.from_array(w, name + "_w"),
                numpy_helper.from_array(b, name + "_b"),
                numpy_helper.from_array(np.array([-1, ch], np.int64), name + "_shape"),
            ]
            nodes += [
                helper.make_node("Conv", ["input.1", name + "_w", name + "_b"], [name + "_c"], kernel_shape=[s, s], strides=[s, s]),
                helper.make_node("Transpose", [name + "_c"], [name + "_t"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [name + "_t", name + "_shape"], [name]),
            ]
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", ch]))
    model = helper.make_model(
        helper.make_graph(nodes, "scrfd_shaped", [x], outs, initializer=inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.save(model, path)


def test_insightface_backend_drives_scrfd_code_correctly(tmp_path):
    _write_scrfd_shaped_onnx(tmp_path / "scrfd_10g_bnkps.onnx")
    backend = make_face_backend(antelopev2_dir=tmp_path)
    assert backend.name == "insightface"
    # 1280x960 goes into the 640x640 detector at scale 0.5. A red 256 px square covers 4x4
    # stride-32 cells of the detector input: anchors x 320..416, y 160..256 there.
    image = np.zeros((960, 1280, 3), np.uint8)
    image[320:576, 640:896, 0] = 255
    faces = backend.detect(image)
    assert len(faces) == 16
    centres = np.array([f.centre for f in faces])
    np.testing.assert_allclose(centres.min(0), [640, 320])
    np.testing.assert_allclose(centres.max(0), [832, 512])
    for face in faces:
        assert face.score == pytest.approx(0.5 + 0.5 * 127.5 / 128, abs=1e-3)
        np.testing.assert_allclose(face.bbox[2:] - face.bbox[:2], [128, 128])  # +-1 stride, /0.5
        offsets = (face.kps5 - face.centre) / 64.0
        np.testing.assert_allclose(offsets, np.arange(10).reshape(5, 2) * 0.1, atol=1e-5)
        assert face.lmk68 is None and face.landmarks is face.kps5
    # The same square in blue is not seen: colours reach the network in the order it expects.
    assert backend.detect(image[:, :, ::-1]) == []


def test_landmarks_in_box_equals_detect_in_the_detected_box(dlib_backend, astronaut_rgb, astronaut_face):
    again = dlib_backend.landmarks_in_box(astronaut_rgb, astronaut_face.bbox, astronaut_face.score)
    np.testing.assert_array_equal(again.lmk68, astronaut_face.lmk68)
    np.testing.assert_array_equal(again.kps5, astronaut_face.kps5)
    np.testing.assert_array_equal(again.bbox, astronaut_face.bbox)


def test_track_refinds_a_moved_face_and_rejects_blank_and_jumps(dlib_backend, astronaut_rgb, astronaut_face):
    """track(): the face shifted 6 px and turned 4 degrees is found again with landmarks
    within 1 px (mean) of a full detection's; a blank or noise frame, or the face moved
    far from where it was, gives None (so the caller runs full detection)."""
    import cv2

    from tracking.faces import DlibBackend

    assert isinstance(dlib_backend, DlibBackend)
    A = cv2.getRotationMatrix2D(tuple(astronaut_face.centre), 4.0, 1.03)
    A[:, 2] += (6.0, -4.0)
    moved = cv2.warpAffine(astronaut_rgb, A, (512, 512), borderMode=cv2.BORDER_REFLECT)
    full = dlib_backend.detect(moved)[0]
    found = dlib_backend.track(moved, astronaut_face)
    assert found is not None and found.lmk68.shape == (68, 2)
    assert np.linalg.norm(found.lmk68 - full.lmk68, axis=1).mean() < 1.0
    assert bbox_iou(found.bbox, full.bbox) > 0.6
    rng = np.random.default_rng(3)
    assert dlib_backend.track(np.full_like(astronaut_rgb, 128), astronaut_face) is None
    assert dlib_backend.track(rng.integers(0, 256, astronaut_rgb.shape, dtype=np.uint8), astronaut_face) is None
    far = np.roll(astronaut_rgb, (200, 200), axis=(0, 1))  # the face left its window
    assert dlib_backend.track(far, astronaut_face) is None
