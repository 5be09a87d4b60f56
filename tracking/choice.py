"""Which face to follow in footage with several people: `--drive-face` / `--actor-face`.

A choice is `largest` (the default), `N` (the N-th largest face, 1 = the largest, counted in the
first frame where faces appear) or `X,Y` (the face nearest that point, in pixels of the first
frame). The choice picks the subject once; `Subject` then follows it from frame to frame with
`tracking.faces.follow_subject`, so the other faces are never taken for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from render.errors import RetargetError
from tracking.faces import Face, follow_subject

# After this long without the subject, pick again (the person may have left and come back).
REACQUIRE_AFTER_S = 1.0


@dataclass(frozen=True)
class FaceChoice:
    """kind "largest", "rank" (rank >= 1) or "point" (x, y pixels)."""

    kind: str = "largest"
    rank: int = 1
    point: tuple[float, float] = (0.0, 0.0)

    def __str__(self) -> str:
        if self.kind == "rank":
            return f"face {self.rank} by size"
        if self.kind == "point":
            return f"face nearest ({self.point[0]:g}, {self.point[1]:g})"
        return "largest face"


def parse_face_choice(spec: str | None, option: str = "--actor-face") -> FaceChoice:
    """'largest' | 'N' | 'X,Y' -> FaceChoice; RetargetError naming `option` otherwise."""
    text = (spec or "largest").strip().lower()
    if text == "largest":
        return FaceChoice()
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = None
    if numbers is not None and len(numbers) == 1 and numbers[0].is_integer() and numbers[0] >= 1:
        return FaceChoice("rank", rank=int(numbers[0]))
    if numbers is not None and len(numbers) == 2 and all(np.isfinite(numbers)):
        return FaceChoice("point", point=(numbers[0], numbers[1]))
    raise RetargetError(f"{option} {spec!r}: use largest, N (1 = the largest face, 2 = the next) "
                        f"or X,Y (the face nearest that pixel of the first frame)")


def _pick(faces: list[Face], choice: FaceChoice, near: np.ndarray | None) -> Face | None:
    if not faces:
        return None
    by_size = sorted(faces, key=lambda f: f.area, reverse=True)
    if near is not None:  # re-acquiring: the face nearest where the subject was last seen
        return min(faces, key=lambda f: float(np.linalg.norm(f.centre - near)))
    if choice.kind == "rank":
        return by_size[choice.rank - 1] if choice.rank <= len(by_size) else None
    if choice.kind == "point":
        p = np.asarray(choice.point, np.float64)
        return min(faces, key=lambda f: float(np.linalg.norm(f.centre - p)))
    return by_size[0]


class Subject:
    """Follows the chosen face through a stream of frames: `subject(faces, time_s)` returns the
    subject's Face in this frame, or None (not found, or not the subject: a bystander is never
    returned in its place). A rank beyond the faces of the first frame with faces raises."""

    def __init__(self, choice: FaceChoice, option: str = "--actor-face"):
        self.choice = choice
        self.option = option
        self.previous: Face | None = None
        self.last_seen: float | None = None
        self.started = False

    def __call__(self, faces: list[Face], time_s: float) -> Face | None:
        if not self.started:
            if not faces:
                return None
            self.started = True
            if self.choice.kind == "rank" and self.choice.rank > len(faces):
                raise RetargetError(f"{self.option} {self.choice.rank}: the first frame with faces "
                                    f"({time_s:.2f}s) shows only {len(faces)}")
            face = _pick(faces, self.choice, None)
        elif self.previous is not None and self.last_seen is not None and time_s - self.last_seen > REACQUIRE_AFTER_S:
            face = _pick(faces, self.choice, self.previous.centre if self.choice.kind != "largest" else None)
        else:
            face = follow_subject(faces, self.previous)
        if face is not None:
            self.previous, self.last_seen = face, time_s
        return face
