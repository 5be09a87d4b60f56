"""Matching output frames to driving frames by their timestamps, not their indices."""

from __future__ import annotations

from typing import Iterator

import numpy as np


def match_tolerance(fps: float) -> float:
    """Largest |output time - driving time| (seconds) still counted as the same moment: half a
    driving frame, plus a millisecond for timestamp rounding in containers."""
    return 0.5 / max(float(fps), 1e-6) + 1e-3


class NearestFrame:
    """Walks a time-ordered frame iterator (objects with `.time_s`) once, returning for each
    increasing query time the nearest frame, or None when the nearest is farther than
    `tolerance` seconds (the query lies outside the clip or in a gap of it).

    Holds at most two frames, so a long driving clip streams alongside the output.
    """

    def __init__(self, frames: Iterator, tolerance: float):
        self.frames = iter(frames)
        self.tolerance = float(tolerance)
        self.current = next(self.frames, None)
        self.following = next(self.frames, None)

    def at(self, t: float):
        """The frame nearest to time `t` (seconds); queries must not go back in time."""
        while self.following is not None and abs(self.following.time_s - t) <= abs(self.current.time_s - t):
            self.current, self.following = self.following, next(self.frames, None)
        if self.current is None or abs(self.current.time_s - t) > self.tolerance:
            return None
        return self.current


def nearest_indices(times: np.ndarray, at: np.ndarray, tolerance: float) -> np.ndarray:
    """For each time of `at`, the index of the nearest entry of sorted `times`, or -1 when the
    nearest is farther than `tolerance` seconds."""
    times, at = np.asarray(times, np.float64), np.asarray(at, np.float64)
    idx = np.clip(np.searchsorted(times, at), 1, max(len(times) - 1, 1))
    if len(times) == 1:
        idx = np.zeros(len(at), int)
    else:
        left = idx - 1
        idx = np.where(np.abs(at - times[left]) <= np.abs(times[idx] - at), left, idx)
    return np.where(np.abs(times[idx] - at) <= tolerance, idx, -1)
