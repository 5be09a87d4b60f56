"""Face geometry from the 68 iBUG landmarks (dlib's predictor): expression signals, landmark
distance after alignment, and head pose. Independent of SMIRK and of the generator.

Left/right are image sides: "_l" is the eye or brow on the image's left (the subject's right
in an unmirrored photo). 2-D landmarks cannot tell a mirrored clip from an unmirrored one, so
subject sides would be a guess.
"""

from __future__ import annotations

import numpy as np

from tracking.align import apply_affine, similarity_transform

# Per-frame signals, each normalised by the inter-ocular distance (eye centre to eye centre),
# so they do not depend on face size or distance to the camera.
SIGNALS = ("mouth_open", "lip_gap", "mouth_width", "eye_open_l", "eye_open_r", "brow_l", "brow_r")
SIGNAL_HELP = {
    "mouth_open": "mouth height between the outer lip edges (points 50-58, 51-57, 52-56)",
    "lip_gap": "gap between the inner lip edges (61-67, 62-66, 63-65); 0 with the lips together",
    "mouth_width": "mouth corner to corner (48-54)",
    "eye_open_l": "image-left eyelid gap (37-41, 38-40)",
    "eye_open_r": "image-right eyelid gap (43-47, 44-46)",
    "brow_l": "image-left brow above its eye centre, across the eye line (17-21 vs 36-41)",
    "brow_r": "image-right brow above its eye centre (22-26 vs 42-47)",
}

# Points that expressions move least (nose bridge and base, eye corners): the alignment for
# LMD uses only these, so that a mouth difference is not spread over the whole face.
RIGID = np.array([27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45])
MOUTH = np.arange(48, 68)
EYES = np.arange(36, 48)

# A generic 3-D face for head pose, in millimetres, written for this project from average adult
# proportions (anthropometric means of the kind tabulated by Farkas, "Anthropometry of the Head
# and Face", 1994: outer eye corners ~90 mm apart, inner ~32 mm, mouth ~50 mm wide, nose tip ~20
# mm ahead of the nose base and ~35-40 mm ahead of the outer eye corners). Axes as OpenCV's
# camera: x to the image right, y down, z away from the camera; origin at the nose tip. A face
# looking straight at the camera has zero rotation. Values are rounded: yaw/pitch/roll are good
# to a few degrees in absolute terms, better as differences (APD), where the model's error cancels.
# Only points that expressions barely move: with the chin and mouth corners in the fit, opening the
# mouth reads as pitch. On the sample clip (in-plane rotation of +-6 degrees only, mouth opening and
# closing, 256 px) the pitch's spread was 3.5 degrees with them and 1.2 without; roll followed the
# known rotation with slope 1.00 either way.
POSE_POINTS = np.array([27, 30, 31, 33, 35, 36, 39, 42, 45])
GENERIC_FACE_MM = np.array([
    [0.0, -45.0, 22.0],    # 27 nasion (top of the nose bridge)
    [0.0, 0.0, 0.0],       # 30 nose tip
    [-12.0, 9.0, 17.0],    # 31 nostril, image-left
    [0.0, 12.0, 18.0],     # 33 nose base, centre
    [12.0, 9.0, 17.0],     # 35 nostril, image-right
    [-45.0, -38.0, 38.0],  # 36 outer corner, image-left eye
    [-16.0, -38.0, 27.0],  # 39 inner corner, image-left eye
    [16.0, -38.0, 27.0],   # 42 inner corner, image-right eye
    [45.0, -38.0, 38.0],   # 45 outer corner, image-right eye
])


def interocular(lmk: np.ndarray) -> float:
    """Distance in pixels between the eye centres (means of points 36-41 and 42-47)."""
    lmk = np.asarray(lmk, np.float64)
    return float(np.linalg.norm(lmk[36:42].mean(0) - lmk[42:48].mean(0)))


def signals(lmk: np.ndarray) -> np.ndarray:
    """(68, 2) landmarks in pixels -> (7,) float64 SIGNALS, each in inter-ocular distances.

    Mouth opening is measured at the outer lip edges: the predictor places the inner edges
    together on lips that are stretched apart without a dark gap between them (as in the
    sample clip's warp), so the inner gap, kept as `lip_gap`, follows opening less reliably."""
    p = np.asarray(lmk, np.float64)
    iod = max(interocular(p), 1e-6)

    def gap(pairs):
        return float(np.mean([np.linalg.norm(p[a] - p[b]) for a, b in pairs])) / iod

    eye_l, eye_r = p[36:42].mean(0), p[42:48].mean(0)
    across = eye_r - eye_l
    up = np.array([across[1], -across[0]]) / max(np.linalg.norm(across), 1e-6)  # perpendicular, pointing up
    return np.array([
        gap([(50, 58), (51, 57), (52, 56)]),
        gap([(61, 67), (62, 66), (63, 65)]),
        gap([(48, 54)]),
        gap([(37, 41), (38, 40)]),
        gap([(43, 47), (44, 46)]),
        float((p[17:22].mean(0) - eye_l) @ up) / iod,
        float((p[22:27].mean(0) - eye_r) @ up) / iod,
    ])


def normalised(lmk: np.ndarray) -> np.ndarray:
    """(68, 2) landmarks in a face-centred frame: the rigid points' centroid at the origin, the eye
    line horizontal, inter-ocular distance 1. Head translation, in-plane rotation and scale are
    removed; expression (and out-of-plane rotation) remains. Returns (68, 2) float64."""
    p = np.asarray(lmk, np.float64)
    eye_l, eye_r = p[36:42].mean(0), p[42:48].mean(0)
    d = eye_r - eye_l
    iod = max(np.linalg.norm(d), 1e-6)
    c, s = d / iod
    R = np.array([[c, s], [-s, c]])
    return (p - p[RIGID].mean(0)) @ R.T / iod


def landmark_distance(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """LMD of one frame: `out` (68, 2) similarity-aligned onto `ref` (68, 2) by the RIGID points,
    then the mean point distance over the mouth (48-67), the eyes (36-47) and all 68, in units of
    `ref`'s inter-ocular distance. Identical landmarks give exactly 0."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    M = similarity_transform(out[RIGID], ref[RIGID])
    moved = apply_affine(M, out)
    dist = np.linalg.norm(moved - ref, axis=1) / max(interocular(ref), 1e-6)
    return {"mouth": float(dist[MOUTH].mean()), "eyes": float(dist[EYES].mean()), "all": float(dist.mean())}


def head_pose(lmk: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(yaw, pitch, roll) in degrees from (68, 2) landmarks of an image of `image_size` (w, h):
    a perspective fit (cv2.solvePnP) of GENERIC_FACE_MM to the POSE_POINTS, focal length = the
    image's longest side in pixels, principal point at its centre, no lens distortion.
    Frontal face: (0, 0, 0); roll grows as the face turns clockwise on screen. NaN when the fit
    fails."""
    import cv2

    w, h = image_size
    f = float(max(w, h))
    camera = np.array([[f, 0, w / 2.0], [0, f, h / 2.0], [0, 0, 1]], np.float64)
    img_pts = np.ascontiguousarray(np.asarray(lmk, np.float64)[POSE_POINTS])
    ok, rvec, tvec = cv2.solvePnP(GENERIC_FACE_MM, img_pts, camera, None, flags=cv2.SOLVEPNP_EPNP)
    if ok:
        ok, rvec, tvec = cv2.solvePnP(GENERIC_FACE_MM, img_pts, camera, None, rvec, tvec,
                                      useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return np.full(3, np.nan)
    R, _ = cv2.Rodrigues(rvec)
    angles = cv2.RQDecomp3x3(R)[0]  # degrees about x (pitch), y (yaw), z (roll)
    return np.array([angles[1], angles[0], angles[2]], np.float64)
