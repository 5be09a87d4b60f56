"""Sample inputs for the demo and tests, made on the fly from a public-domain photo.

The actor is scikit-image's `astronaut.png` (NASA, public domain). The driving clip is the
same photo, mirrored and cropped around the face, with head motion (small rotations, shifts,
zoom) and a mouth that opens and closes (a smooth local warp below the lips), plus a tone
whose loudness follows the mouth, so audio sync is visible in the result.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np


def sample_actor() -> np.ndarray:
    """The sample actor photo: 512x512x3 uint8 RGB."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def mouth_opening(t: np.ndarray | float, period: float = 1.0) -> np.ndarray:
    """Mouth opening of the sample clip at time t (seconds), 0 (closed) .. 1 (open)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.asarray(t) / period)


def _face_geometry(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(face centre, mouth centre, face size) from the offline landmarks."""
    from tracking.faces import make_face_backend

    faces = make_face_backend("dlib").detect(image)
    if not faces:
        raise RuntimeError("the sample photo has no detectable face")
    lmk = faces[0].lmk68
    centre = lmk.mean(axis=0)
    mouth = lmk[48:68].mean(axis=0)
    size = float(np.ptp(lmk[:, 0]))
    return centre, mouth, size


def sample_driving_frames(seconds: float = 2.0, fps: float = 25.0, size: int = 256):
    """Yield (time_s, HxWx3 uint8 RGB) frames of the sample driving performance."""
    import cv2

    base = sample_actor()[:, ::-1].copy()  # mirrored: not pixel-identical to the actor
    centre, mouth, face = _face_geometry(base)
    h, w = base.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Displacement field for an open mouth: lower lip and jaw move down, fading with distance.
    dy_open = np.exp(-(((xx - mouth[0]) / (0.35 * face)) ** 2 + ((yy - mouth[1] - 0.1 * face) / (0.3 * face)) ** 2))
    dy_open *= (yy > mouth[1] - 0.02 * face)
    crop = 2.2 * face
    n = int(round(seconds * fps))
    for k in range(n):
        t = k / fps
        o = float(mouth_opening(t))
        warped = cv2.remap(base, xx, yy - (0.12 * face * o) * dy_open, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        angle = 6.0 * math.sin(2 * math.pi * t / 1.7)
        scale = size / crop * (1.0 + 0.05 * math.sin(2 * math.pi * t / 2.3))
        M = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, scale)
        M[:, 2] += np.array([size / 2, size / 2]) - centre + np.array([6 * math.sin(2 * math.pi * t / 1.3), 0.0])
        yield t, cv2.warpAffine(warped, M, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)


def write_tone(path: Path, seconds: float, rate: int = 44100) -> None:
    """A mono 16-bit WAV: a 220 Hz tone whose loudness follows the sample mouth opening."""
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.4 * mouth_opening(t) * np.sin(2 * np.pi * 220 * t)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((signal * 32767).astype("<i2").tobytes())


def write_sample_drive(path: str | Path, seconds: float = 2.0, fps: float = 25.0, size: int = 256) -> Path:
    """Write the sample driving clip (H.264 + AAC) to `path`; returns the path."""
    import tempfile

    from render.video import VideoWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "tone.wav"
        write_tone(wav, seconds)
        with VideoWriter(path, fps, audio_from=wav) as writer:
            for _, frame in sample_driving_frames(seconds, fps, size):
                writer.write(frame)
    return path
