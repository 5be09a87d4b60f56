"""The track file (format v1): per-frame 55-d FLAME vectors of one face through a video.

A `.npz` (numpy zip, no pickles) with these arrays:

| key | shape, dtype | meaning |
| --- | --- | --- |
| `format_version` | () int64 | 1 |
| `raw` | (T, 55) float32 | encoder output per frame; NaN rows where no face was found |
| `params` | (T, 55) float32 | what the pipeline uses: invalid rows filled by linear interpolation in time (ends held), then smoothed |
| `valid` | (T,) bool | a face was found and encoded in that frame |
| `times` | (T,) float64 | presentation time of each frame in seconds (real timestamps, non-decreasing) |
| `fps` | () float64 | the source's average frame rate |
| `source` | () str | the input path as given |
| `source_sha256` | () str | SHA-256 of the input file (folders: of the names and bytes of its images) |
| `backend` | () str | face backend that found the landmarks ("mediapipe", "dlib", ...) |
| `weights_id` | () str | SMIRK checkpoint identity, "<file>:sha256:<16 hex>" |
| `smoothing` | () str | JSON object: {"method": ..., parameters...} |
| `range_start`, `range_end` | () float64, optional | the track holds every source frame with time in [range_start, range_end) seconds; range_end inf: to the end of the source. Absent in files written before 2026-12 (readers of v1 that do not know these keys ignore them) |

Columns of `raw` and `params`: FLAME expression 0-49, eyelids 50-51, jaw 52-54 (SPEC.md §5).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from render.files import atomic_open

FORMAT_VERSION = 1
N_PARAMS = 55
COLUMN_NAMES = ([f"exp_{i}" for i in range(50)] + ["eyelid_l", "eyelid_r"] + ["jaw_0", "jaw_1", "jaw_2"])
_ARRAYS = ("raw", "params", "valid", "times")
_SCALARS = ("fps", "source", "source_sha256", "backend", "weights_id", "smoothing")


@dataclass
class Track:
    """One tracked face through a video (see the module docstring for the file layout).

    raw: (T, 55) float32, NaN rows where invalid. params: (T, 55) float32, filled and smoothed.
    valid: (T,) bool. times: (T,) float64 seconds. fps: float. smoothing: dict with "method".
    """

    raw: np.ndarray
    params: np.ndarray
    valid: np.ndarray
    times: np.ndarray
    fps: float
    source: str = ""
    source_sha256: str = ""
    backend: str = ""
    weights_id: str = ""
    smoothing: dict = field(default_factory=lambda: {"method": "none"})
    version: int = FORMAT_VERSION
    # The source time range the frames cover (None: not recorded; see `covers`).
    range_start: float | None = None
    range_end: float | None = None

    def __post_init__(self) -> None:
        self.raw = np.asarray(self.raw, dtype=np.float32)
        self.params = np.asarray(self.params, dtype=np.float32)
        self.valid = np.asarray(self.valid, dtype=bool)
        self.times = np.asarray(self.times, dtype=np.float64)
        self.fps = float(self.fps)
        self.validate()

    def __len__(self) -> int:
        return int(self.params.shape[0])

    @property
    def n_invalid(self) -> int:
        return int((~self.valid).sum())

    def validate(self, where: str = "track") -> None:
        """Raise RetargetError naming `where` unless shapes, dtypes and values are consistent."""
        T = self.params.shape[0] if self.params.ndim == 2 else -1
        problems = []
        if self.version != FORMAT_VERSION:
            problems.append(f"format version {self.version}, this program reads version {FORMAT_VERSION}")
        if self.params.ndim != 2 or self.params.shape[1] != N_PARAMS or T < 1:
            problems.append(f"params has shape {self.params.shape}, expected (T, {N_PARAMS}) with T >= 1")
        elif self.raw.shape != (T, N_PARAMS):
            problems.append(f"raw has shape {self.raw.shape}, expected {(T, N_PARAMS)}")
        elif self.valid.shape != (T,) or self.times.shape != (T,):
            problems.append(f"valid {self.valid.shape} / times {self.times.shape} do not match T = {T}")
        else:
            if not np.all(np.isfinite(self.params)):
                problems.append("params holds non-finite values")
            if not np.all(np.isfinite(self.raw[self.valid])):
                problems.append("raw holds non-finite values in valid frames")
            if not np.all(np.isfinite(self.times)) or np.any(np.diff(self.times) < 0):
                problems.append("times are not finite and non-decreasing")
        if not (self.fps > 0 and np.isfinite(self.fps)):
            problems.append(f"fps {self.fps} is not positive")
        if (self.range_start is None) != (self.range_end is None):
            problems.append("range_start and range_end come together")
        elif self.range_start is not None and not (
                np.isfinite(self.range_start) and self.range_end > self.range_start):
            problems.append(f"range [{self.range_start}, {self.range_end}) is not a time range")
        if problems:
            raise RetargetError(f"{where}: {'; '.join(problems)}")

    def covers(self, start: float | None, end: float | None) -> bool:
        """Whether this track holds every source frame with time in [start, end) seconds
        (start None: 0; end None: to the end of the source), from the recorded range; a track
        without one covers only what lies between its first and last frame times."""
        start = 0.0 if start is None else float(start)
        eps = 1e-6
        if self.range_start is None or self.range_end is None:
            lo, hi = float(self.times[0]), float(self.times[-1])
            return start >= lo - eps and end is not None and float(end) <= hi + eps
        if start < self.range_start - eps:
            return False
        if math.isinf(self.range_end):
            return True
        return end is not None and float(end) <= self.range_end + eps

    def invalid_ranges(self) -> list[tuple[int, int]]:
        """Runs of invalid frames as (first, last) frame indices, inclusive."""
        bad = ~self.valid
        ranges, start = [], None
        for i, b in enumerate(bad):
            if b and start is None:
                start = i
            elif not b and start is not None:
                ranges.append((start, i - 1))
                start = None
        if start is not None:
            ranges.append((start, len(bad) - 1))
        return ranges

    def save(self, path: str | os.PathLike) -> Path:
        """Write the track to `path` (.npz) atomically: a temporary file in the same folder,
        renamed over `path` once complete. Returns the path."""
        path = Path(path)
        self.validate(str(path))
        arrays = {
            "format_version": np.int64(self.version),
            "raw": self.raw, "params": self.params, "valid": self.valid, "times": self.times,
            "fps": np.float64(self.fps),
            "source": np.str_(self.source), "source_sha256": np.str_(self.source_sha256),
            "backend": np.str_(self.backend), "weights_id": np.str_(self.weights_id),
            "smoothing": np.str_(json.dumps(self.smoothing, sort_keys=True)),
        }
        if self.range_start is not None:
            arrays["range_start"] = np.float64(self.range_start)
            arrays["range_end"] = np.float64(self.range_end)
        with atomic_open(path, "wb") as f:  # a file object: np.savez must not append ".npz" to the name
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Track":
        """Read a track file. Raises RetargetError naming the file if it is missing, not a
        track file, of another format version, or has fields missing or of wrong shapes."""
        path = Path(path)
        if not path.is_file():
            raise RetargetError(f"track file {path} not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {k: data[k] for k in data.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
            raise RetargetError(f"{path} is not a track file (.npz): {str(e).splitlines()[0] if str(e) else e!r}") \
                from None
        if "format_version" not in fields:
            raise RetargetError(f"{path} is not a track file: no format_version field")
        try:
            version = int(fields["format_version"])
        except (TypeError, ValueError):
            raise RetargetError(f"{path}: format_version is not an integer") from None
        if version != FORMAT_VERSION:
            raise RetargetError(f"{path}: track format version {version}, this program reads version "
                                f"{FORMAT_VERSION}; re-run `retarget track` on the source video")
        missing = [k for k in _ARRAYS + _SCALARS if k not in fields]
        if missing:
            raise RetargetError(f"{path}: track file lacks {', '.join(missing)}")
        try:
            smoothing = json.loads(str(fields["smoothing"]))
            fps = float(fields["fps"])
            span = {k: float(fields[k]) for k in ("range_start", "range_end") if k in fields}
        except (ValueError, TypeError) as e:
            raise RetargetError(f"{path}: bad smoothing/fps/range field ({e})") from None
        for k in ("raw", "params", "times"):
            if fields[k].dtype.kind != "f":
                raise RetargetError(f"{path}: {k} has dtype {fields[k].dtype}, expected floats")
        if fields["valid"].dtype != np.bool_:
            raise RetargetError(f"{path}: valid has dtype {fields['valid'].dtype}, expected bool")
        try:
            return cls(raw=fields["raw"], params=fields["params"], valid=fields["valid"], times=fields["times"],
                       fps=fps, source=str(fields["source"]), source_sha256=str(fields["source_sha256"]),
                       backend=str(fields["backend"]), weights_id=str(fields["weights_id"]),
                       smoothing=smoothing, version=version, **span)
        except RetargetError as e:
            raise RetargetError(f"{path}: {str(e).split(': ', 1)[-1]}") from None
