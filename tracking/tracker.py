"""Video -> track: decode, find the subject's face, SMIRK-crop, encode, fill gaps, smooth.

Streaming: frames are decoded on a background thread a few frames ahead and dropped once
cropped; at most a window of frames (for parallel face finding) and a batch of 224x224 crops
(for the encoder) are held. Frames where the subject's face is not found are marked invalid,
stored as NaN in `Track.raw` and filled by interpolation in `Track.params`.

Faces are found by full detection every `redetect_every` frames (and whenever a face is
lost); in between, backends that can (dlib) re-find each face near its last landmarks, about
8x cheaper (`FaceTracker`). Detection runs on frames whose index is a multiple of the
cadence, so the work splits into chunks that start with a detection, and worker processes
give exactly the faces the sequential run finds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from render.errors import RetargetError
from render.video import VideoFrame, open_video, prefetch
from tracking import smoothing as sm
from tracking.track import N_PARAMS, Track

# After this long without the subject, start over with the largest face (the subject may
# have left and come back elsewhere in the frame).
REACQUIRE_AFTER_S = 1.0


@dataclass
class TrackOptions:
    """Options of `retarget track` (the CLI is generated from these fields)."""

    smoothing: str = field(default="zero_phase", metadata={
        "help": "temporal smoothing: zero_phase (offline, no lag), one_euro (causal, for streaming) or none",
        "choices": sm.METHODS})
    cutoff_hz: float = field(default=sm.ZERO_PHASE_CUTOFF_HZ, metadata={
        "help": "zero_phase: half-power cutoff in Hz (higher keeps faster motion, and more jitter)", "above": 0})
    min_cutoff: float = field(default=sm.ONE_EURO_MIN_CUTOFF, metadata={
        "help": "one_euro: cutoff in Hz when the face is still (lower: less jitter, more lag)", "above": 0})
    beta: float = field(default=sm.ONE_EURO_BETA, metadata={
        "help": "one_euro: how fast the cutoff rises with speed (higher: less lag in fast motion)", "min": 0})
    d_cutoff: float = field(default=sm.ONE_EURO_D_CUTOFF, metadata={
        "help": "one_euro: cutoff in Hz of the speed estimate", "above": 0})
    batch_size: int = field(default=0, metadata={
        "help": "face crops per encoder call (0: 64 on GPU, 8 on CPU)", "min": 0})
    device: str = field(default="auto", metadata={
        "help": "where the SMIRK encoder runs: auto (cuda if available), cpu or cuda", "choices": ("auto", "cpu", "cuda")})
    redetect_every: int = field(default=10, metadata={
        "help": "run the full face detector every N frames and track the face between them "
                "(1: detect on every frame; the face is also re-detected whenever it is lost)", "min": 1})
    decode_ahead: int = field(default=16, metadata={
        "help": "frames decoded ahead on a background thread (0: decode in the main thread)", "min": 0})
    detect_workers: int = field(default=-1, metadata={
        "help": "processes running face detection in parallel (0: none; -1: auto, half the cores, at most "
                "16, on machines with more than 4 cores and clips of 100+ frames)", "min": -1})
    start: float = field(default=0.0, metadata={
        "help": "first second of the video to track (decoding seeks there; the smoothing's margin around the range is tracked too, then cut)",
        "min": 0})
    end: float | None = field(default=None, metadata={"help": "stop at this second (default: the end)", "above": 0})
    max_frames: int | None = field(default=None, metadata={"help": "track at most this many frames", "min": 1})
    image_fps: float | None = field(default=None, metadata={
        "help": "frame rate given to a folder of images (default 25)", "above": 0})

    def smoothing_params(self) -> dict:
        """The record stored in the track: {"method": ..., its parameters}."""
        if self.smoothing == "zero_phase":
            return {"method": "zero_phase", "cutoff_hz": self.cutoff_hz}
        if self.smoothing == "one_euro":
            return {"method": "one_euro", "min_cutoff": self.min_cutoff, "beta": self.beta,
                    "d_cutoff": self.d_cutoff}
        if self.smoothing == "none":
            return {"method": "none"}
        raise RetargetError(f"--smoothing {self.smoothing!r}: choose one of {', '.join(sm.METHODS)}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'. 'cuda' without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RetargetError("--device cuda: no CUDA GPU is visible to torch")
    if device not in ("cpu", "cuda"):
        raise RetargetError(f"--device {device!r}: choose auto, cpu or cuda")
    return device


def source_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes; for a folder, of its image names and bytes in natural order."""
    from render.video import IMAGE_EXTENSIONS, _natural_key

    path = Path(path)
    h = hashlib.sha256()
    files = [path]
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                       key=lambda p: _natural_key(p.name))
    for p in files:
        if path.is_dir():
            h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


# -- finding faces, sequential or in worker processes ----------------------------------------

class FaceTracker:
    """Faces per frame: the backend's full `detect` on frames whose index is a multiple of
    `redetect_every`, on the first frame and on every frame after a face was lost; in
    between, each face of the previous frame is re-found with `backend.track(image, face)`
    (backends without `track`, such as MediaPipe, which tracks inside its video mode, get
    `detect` on every frame). If any face is not re-found, the frame gets a full detection,
    so a frame with no face (cut, blank, occlusion) always ends in the detector's verdict.
    `detections` counts the full detections run."""

    def __init__(self, backend, redetect_every: int = 1):
        if int(redetect_every) < 1:
            raise RetargetError(f"--redetect-every must be at least 1, got {redetect_every}")
        self.backend = backend
        self.every = int(redetect_every)
        self.can_track = self.every > 1 and callable(getattr(backend, "track", None))
        self.faces: list = []
        self.detections = 0

    def __call__(self, rgb: np.ndarray, index: int, timestamp_ms: int | None = None) -> list:
        """rgb: HxWx3 uint8 frame; index: its position in the run (0 = first frame);
        timestamp_ms: passed to `detect` (MediaPipe video mode). Returns the faces."""
        if self.can_track and self.faces and index % self.every != 0:
            tracked = []
            for face in self.faces:
                found = self.backend.track(rgb, face)
                if found is None:
                    break
                tracked.append(found)
            else:
                self.faces = tracked
                return tracked
        self.faces = self.backend.detect(rgb, timestamp_ms=timestamp_ms)
        self.detections += 1
        return self.faces


_worker_backend = None


def _init_worker(factory: Callable[[], object]) -> None:
    global _worker_backend
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    # These arrays never become UMats: no OpenCL runtime in the workers (on the H200 host its
    # start measured 5 ms, so this is hygiene, not speed).
    cv2.ocl.setUseOpenCL(False)
    _worker_backend = factory()


def _faces_for_chunk(indices: list[int], frames, redetect_every: int) -> list:
    """frames: a list of HxWx3 uint8 arrays, or a `_RingSlot` naming them in shared memory."""
    if isinstance(frames, _RingSlot):
        frames = frames.view()
    # A chunk starts on a detection frame, so a fresh tracker sees what the sequential one does.
    tracker = FaceTracker(_worker_backend, redetect_every)
    return [tracker(rgb, i) for i, rgb in zip(indices, frames)]


_attached: dict = {}  # worker side: shared-memory name -> SharedMemory, attached once


@dataclass(frozen=True)
class _RingSlot:
    """Where a chunk's frames lie in the parent's shared-memory ring: the first `count`
    frames of slot `slot` of an array (slots, chunk_len, H, W, 3) uint8. Pickles to a few
    bytes, so a chunk costs the parent one copy of its frames instead of pickling them
    through a pipe (measured 2.4 ms a 512x512 frame vs 0.09 ms)."""

    name: str
    shape: tuple
    slot: int
    count: int

    def view(self) -> np.ndarray:
        from multiprocessing import shared_memory

        shm = _attached.get(self.name)
        if shm is None:
            shm = _attached[self.name] = shared_memory.SharedMemory(name=self.name)
        return np.ndarray(self.shape, np.uint8, buffer=shm.buf)[self.slot, :self.count]


class _FrameRing:
    """Parent side of the shared-memory ring: `slots` chunks of `chunk_len` frames of one
    shape. `put(frames)` copies a chunk into a free slot and returns its `_RingSlot`, or None
    when no slot is free or a frame has another shape (the caller then pickles the frames);
    `release(slot)` frees a slot once its worker has answered."""

    def __init__(self, slots: int, chunk_len: int, frame_shape: tuple):
        from multiprocessing import shared_memory

        self.shape = (slots, chunk_len) + tuple(frame_shape)
        self.shm = shared_memory.SharedMemory(create=True, size=int(np.prod(self.shape)))
        self.array = np.ndarray(self.shape, np.uint8, buffer=self.shm.buf)
        self.free = list(range(slots))

    def put(self, frames: list[np.ndarray]) -> _RingSlot | None:
        if not self.free or len(frames) > self.shape[1] or any(
                f.shape != self.shape[2:] or f.dtype != np.uint8 for f in frames):
            return None
        slot = self.free.pop()
        for j, f in enumerate(frames):
            self.array[slot, j] = f
        return _RingSlot(self.shm.name, self.shape, slot, len(frames))

    def release(self, ref) -> None:
        if isinstance(ref, _RingSlot):
            self.free.append(ref.slot)

    def close(self) -> None:
        self.array = None  # the view must go before the buffer can be released
        self.shm.close()
        self.shm.unlink()


def default_backend_factory(landmarker_path: str | os.PathLike | None = None) -> Callable[[], object]:
    """A picklable callable building the tracking backend: MediaPipe when `landmarker_path`
    exists, else dlib (make_face_backend("auto"))."""
    from tracking.faces import make_face_backend

    lm = str(landmarker_path) if landmarker_path is not None else None
    return functools.partial(make_face_backend, "auto", landmarker_path=lm)


# Chunks travel to the workers through a shared-memory ring (False: pickled through the
# pool's pipe, as before 2026-11-24; kept for bench/tracking.py's comparison).
SHARE_FRAMES = True

# Frames held in flight for the workers (all chunks together) stay under this many bytes
# when chunks are small enough; each worker always gets one chunk and one more waits.
INFLIGHT_BYTES = 1 << 30


def _ready() -> bool:
    return _worker_backend is not None


def start_workers(workers: int, factory: Callable[[], object]):
    """Start `workers` face-finding processes (spawned; each builds its backend with the
    picklable `factory`) and return the `ProcessPoolExecutor` without waiting for them, so
    that their start-up (~1 s: imports, model load) overlaps the caller's own (the SMIRK
    encoder, CUDA). The caller shuts it down (`with` or `.shutdown()`)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent may hold torch/OpenMP threads, which fork would copy in a broken state.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(factory,))
    # The pool spawns a process per task while none is idle; `ready` tells when all have started.
    pool.ready = [pool.submit(_ready) for _ in range(workers)]
    return pool


def detect_stream(frames: Iterator[VideoFrame], backend, *, workers: int = 0,
                  factory: Callable[[], object] | None = None, redetect_every: int = 1,
                  pool=None, stats: dict | None = None) -> Iterator[tuple[VideoFrame, list]]:
    """Yield (frame, faces) in frame order, faces from a `FaceTracker(backend,
    redetect_every)` fed every frame. workers > 0: the frames go in chunks of a multiple of
    `redetect_every` frames (each starting on a detection frame) to that many processes,
    `pool` (from `start_workers`) or a pool started here with the picklable `factory`. Chunks
    travel through a shared-memory ring (only their slot numbers are pickled); at most about
    two chunks a worker (and INFLIGHT_BYTES) are in flight, so memory stays bounded. The
    faces equal the sequential run's, except with MediaPipe, which runs in its video mode
    (landmarks tracked between frames) only sequentially; in workers each frame is detected
    alone. stats: a dict that, with workers, receives seconds the caller's thread spent
    waiting for input frames (`input_wait_s`), handing chunks over (`submit_s`) and waiting
    for workers (`worker_wait_s`), for benchmarks."""
    if workers <= 0:
        tracker = FaceTracker(backend, redetect_every)
        last_ms = -1
        for frame in frames:
            ms = max(int(round(frame.time_s * 1000)), last_ms + 1)
            last_ms = ms
            yield frame, tracker(frame.rgb, frame.index, ms if backend.name == "mediapipe" else None)
        return
    if pool is None:
        if factory is None:
            raise ValueError("parallel detection needs a backend factory or a pool")
        with start_workers(workers, factory) as own_pool:
            yield from detect_stream(frames, backend, workers=workers, redetect_every=redetect_every,
                                     pool=own_pool, stats=stats)
        return
    from concurrent.futures import wait
    from concurrent.futures.process import BrokenProcessPool

    every = max(1, int(redetect_every))
    chunk_len = every * -(-8 // every)  # >= 8 frames a task: fewer round trips
    ring: _FrameRing | None = None
    window: deque = deque()
    max_chunks = 0
    chunk: list[VideoFrame] = []
    clock = {"input_wait_s": 0.0, "submit_s": 0.0, "worker_wait_s": 0.0}
    if stats is not None:
        stats.update(clock)
        clock = stats

    def submit() -> None:
        nonlocal max_chunks, ring
        t0 = time.perf_counter()
        rgbs = [f.rgb for f in chunk]
        if ring is None:
            nbytes = max(sum(r.nbytes for r in rgbs), 1)
            max_chunks = max(workers + 1, min(2 * workers, INFLIGHT_BYTES // nbytes))
            # Frames of the first chunk's shape travel through shared memory; others (a
            # folder of images of several sizes) are pickled.
            ring = _FrameRing(max_chunks, chunk_len, rgbs[0].shape)
        ref = (ring.put(rgbs) if SHARE_FRAMES else None) or rgbs
        window.append((list(chunk), ref, pool.submit(_faces_for_chunk, [f.index for f in chunk], ref, every)))
        chunk.clear()
        clock["submit_s"] += time.perf_counter() - t0

    def collect():
        done, ref, fut = window.popleft()
        t0 = time.perf_counter()
        faces = fut.result()
        clock["worker_wait_s"] += time.perf_counter() - t0
        ring.release(ref)
        return zip(done, faces)

    try:
        frames = iter(frames)
        while True:
            t0 = time.perf_counter()
            frame = next(frames, None)
            clock["input_wait_s"] += time.perf_counter() - t0
            if frame is None:
                break
            if chunk and frame.index % chunk_len == 0:
                submit()
                # Full window: wait for the oldest chunk. Otherwise hand on the chunks already
                # done, in order: waiting for the window to fill first held the first faces back
                # until ~2 chunks a worker were decoded (0.8 s at 1080p on a 16-core host).
                while window and (len(window) >= max_chunks or window[0][2].done()):
                    yield from collect()
            chunk.append(frame)
        if chunk:
            submit()
        while window:
            yield from collect()
    except BrokenProcessPool:
        raise RetargetError(WORKERS_BROKE) from None
    finally:
        if ring is not None:
            # Stopped early or failed: no worker may read a slot after the ring is gone.
            futures = [fut for _, _, fut in window]
            for fut in futures:
                fut.cancel()
            wait(futures)
            ring.close()


WORKERS_BROKE = ("the face-finding worker processes stopped; if a Python script calls retarget, put its "
                 "top level under `if __name__ == \"__main__\":` (each worker process imports the script "
                 "again), or use detect_workers=0 (--detect-workers 0)")

# Worker processes take a second or two to start and cost a frame copy each; below these,
# one process is as fast (measured: bench/results/tracking_cpu_*.json, 2 cores).
AUTO_WORKERS_MIN_CORES = 5
AUTO_WORKERS_MIN_FRAMES = 100


def _auto_workers(requested: int, n_frames: int | None = None) -> int:
    """Detection processes to use: `requested` if >= 0, else half the cores (at most 16)
    when the machine has at least AUTO_WORKERS_MIN_CORES cores and the clip is long enough.
    Half, not all but one: the rest decode (FFmpeg's threads), convert, crop and feed the
    encoder; on a 16-core H100 host 6-12 workers beat 15 by 5-10% and 8 was best
    (bench/results/tracking_cuda_transport_2026-11-24_c_workers.json)."""
    if requested >= 0:
        return requested
    cores = os.cpu_count() or 1
    if cores < AUTO_WORKERS_MIN_CORES or (n_frames is not None and 0 < n_frames < AUTO_WORKERS_MIN_FRAMES):
        return 0
    return max(1, min(cores // 2, 16))


def encoder_crop(rgb: np.ndarray, face) -> np.ndarray:
    """The SMIRK input for one face: (224, 224, 3) uint8 RGB, the square around the face's
    landmarks enlarged 1.4x (SPEC.md §5). The encoder divides by 255, as SMIRK's demo does
    with its 8-bit crops, which this one equals (truncated, not rounded: see
    tracking.align.smirk_crop)."""
    from tracking.align import smirk_crop

    return smirk_crop(rgb, face.landmarks, size=224, scale=1.4)[0]


def _encode_subject(stream: Iterator[tuple[VideoFrame, list]], encoder, batch_size: int,
                    on_frame: Callable[[int], object], observe: Callable | None = None, *,
                    one_shape: bool = False) -> tuple[list[float], list[np.ndarray], list[bool]]:
    """Follow the subject through `stream` ((frame, faces) in order, from detect_stream) and
    SMIRK-encode its crops in batches of `batch_size` (one_shape: every call padded to
    `batch_size` and run on tracking.encode_thread's thread, for CUDA). Returns per frame: time in seconds,
    the 55-d float32 vector (NaN where the subject was not found) and whether it was found.
    `on_frame(1)` is called after each frame (a progress bar's update); `observe`, after each
    encoder batch, gets (times, rows, valid) of every frame so far, as new lists: all settled,
    since no crop is left waiting for the encoder then."""
    from tracking.encode_thread import encode_batch
    from tracking.faces import follow_subject

    times: list[float] = []
    raw_rows: list[np.ndarray] = []
    valid: list[bool] = []
    crops: list[np.ndarray] = []
    crop_rows: list[int] = []

    def flush() -> None:
        if crops:
            out = encode_batch(encoder, np.stack(crops), batch_size if one_shape else 0)
            for row, vec in zip(crop_rows, out):
                raw_rows[row] = vec
            crops.clear()
            crop_rows.clear()
            if observe is not None:
                observe(list(times), list(raw_rows), list(valid))

    previous, last_seen = None, None
    nan_row = np.full(N_PARAMS, np.nan, np.float32)
    for frame, faces in stream:
        if previous is not None and last_seen is not None and frame.time_s - last_seen > REACQUIRE_AFTER_S:
            previous = None
        face = follow_subject(faces, previous)
        times.append(frame.time_s)
        raw_rows.append(nan_row)
        valid.append(face is not None)
        if face is not None:
            crops.append(encoder_crop(frame.rgb, face))
            crop_rows.append(len(raw_rows) - 1)
            previous, last_seen = face, frame.time_s
            if len(crops) >= batch_size:
                flush()
        on_frame(1)
    flush()
    return times, raw_rows, valid


# -- the whole run ----------------------------------------------------------------------------

def _span_frames(reader, span_start: float, start: float, end: float | None, max_frames: int | None,
                 after: int) -> Iterator[VideoFrame]:
    """The frames to track for the range [start, end) (at most `max_frames` of them): from
    `span_start` (the reader seeks to the keyframe before it and drops what precedes it)
    through the range, then `after` more frames (at least one, so the caller learns where the
    range ends), then stop decoding."""
    inner = reader.frames(start_s=span_start)
    kept, tail = 0, 0
    with contextlib.closing(inner):
        for frame in inner:
            past = (end is not None and frame.time_s >= end) or (max_frames is not None and kept >= max_frames)
            if frame.time_s >= start - 1e-6 and not past:
                kept += 1
            elif past:
                if tail >= max(1, after):
                    return
                tail += 1
            yield frame


def _span_start(reader, start: float, before: int, every: int) -> float:
    """Where to start decoding for a range from `start` s with `before` frames of margin: the
    time of the source frame `before` frames ahead of the range, moved back to a multiple of
    the detection cadence `every` (counted from the source's first frame), so that the faces
    found are those the whole clip's run finds (exact for constant frame rate). 0: from the
    beginning."""
    fps, t0 = reader.fps, reader.first_time_s
    first = int(math.ceil((start - t0) * fps - 1e-6))  # index of the range's first frame
    k = (first - before) // every * every
    return 0.0 if k <= 0 else t0 + (k - 0.5) / fps


def track_video(path: str | os.PathLike, *, smirk_path: str | os.PathLike,
                landmarker_path: str | os.PathLike | None = None, options: TrackOptions | None = None,
                progress: bool = True, backend_factory: Callable[[], object] | None = None,
                stats: dict | None = None, observe: Callable | None = None) -> Track:
    """Track the subject's face through a video file, a folder of images or one image.

    smirk_path: the SMIRK checkpoint (release or tiny). landmarker_path: MediaPipe's
    face_landmarker.task; when absent the dlib backend finds the landmarks. backend_factory:
    a picklable callable returning a face backend, to use another one (it overrides
    landmarker_path). Returns a Track
    (T frames, 55 parameters each; `raw` NaN where no face was found, `params` filled and
    smoothed; `times` the source's timestamps in seconds). Raises RetargetError for
    unreadable input, bad weights, or when no frame shows a face.

    A range (`options.start`, `end`, `max_frames`) is tracked alone: decoding seeks to the
    keyframe before it, and only the range plus the smoothing's settling margin on each side
    (`smoothing.margin_frames`: 6 frames at 25 fps for zero_phase at 2.5 Hz, 4 sigma of its
    kernel) is tracked, smoothed, then cut to the range; the start is moved back to a
    detection frame of the whole clip's cadence. So the range's params equal those of
    tracking the whole clip and cutting, within float32 batch-shape rounding (~2e-5), as long
    as the face is found at the margin's outer frames (a gap there is held from inside the
    span instead of interpolated from beyond it) and one face is in view (with several, the
    subject is picked afresh at the span's start). The track records the range it covers
    (`Track.range_start/range_end`). stats: a dict that receives `frames_decoded` (by the
    decoder, those dropped after the seek included), `frames_tracked` (through the face
    finder and encoder), `frames_kept` (in the track) `margin_frames` (before, after) and
    `timeline`: [(event, seconds since the call)] for benchmarks of the tracker's start
    (workers started and ready, encoder loaded and warm, first frame decoded, first faces, each encoder
    batch as "rows N", end).
    observe: called in this thread after each encoder batch with (times, raw rows, valid) of
    every frame tracked so far (see `smooth_rows` for what they give); an exception it raises
    stops the tracking (retarget.ahead renders while tracking with it).
    """
    import torch

    from tracking.smirk import load_smirk_encoder, weights_identity

    options = options or TrackOptions()
    smoothing = options.smoothing_params()
    smooth_params = {k: v for k, v in smoothing.items() if k != "method"}
    if options.redetect_every < 1:
        raise RetargetError(f"--redetect-every must be at least 1, got {options.redetect_every}")
    start = max(0.0, float(options.start or 0.0))
    end = options.end
    if end is not None and end <= start:
        raise RetargetError(f"--end {end:g}s must be after --start {start:g}s")
    if options.max_frames is not None and options.max_frames < 1:
        raise RetargetError(f"--max-frames must be at least 1, got {options.max_frames}")
    path = Path(path)
    reader = open_video(path, fps=options.image_fps)
    if start > 0 and reader.duration_s > 0 and start >= reader.first_time_s + reader.duration_s:
        raise RetargetError(f"--start {start:g}s is at or after the end of {path} ({reader.duration_s:.2f}s long)")
    before, after = sm.margin_frames(smoothing["method"], reader.fps, **smooth_params)
    span_start = _span_start(reader, start, before, options.redetect_every) if start > 0 else 0.0
    device = resolve_device(options.device)
    batch_size = options.batch_size or (64 if device == "cuda" else 8)
    total = reader.frame_count or None  # frames to track, for the progress bar and worker count
    if total:
        upto = total
        if end is not None:
            upto = min(upto, int(round(end * reader.fps)) + after)
        if options.max_frames is not None:
            upto = min(upto, int(round(start * reader.fps)) + options.max_frames + after)
        total = max(1, upto - int(round(span_start * reader.fps)))
    workers = _auto_workers(options.detect_workers, total)
    factory = backend_factory or default_backend_factory(landmarker_path)
    from tqdm import tqdm

    t_call = time.perf_counter()
    timeline: list = []

    def mark(event: str) -> None:
        timeline.append((event, round(time.perf_counter() - t_call, 4)))

    # Workers start first: their start-up overlaps loading the encoder (and CUDA's).
    with start_workers(workers, factory) if workers > 0 else contextlib.nullcontext() as pool:
        if pool is not None:
            mark("workers started")
            _when_all(pool.ready, lambda: mark("workers ready"))
        encoder = load_smirk_encoder(smirk_path, device=device, dtype=torch.float32)
        # On CUDA: one batch shape, on one thread whose cuDNN plans outlive the job, warmed
        # while the workers start (tracking/encode_thread.py says what that saves).
        one_shape = device == "cuda"
        if one_shape:
            from tracking.encode_thread import warm_up

            warm_up(encoder, batch_size).add_done_callback(lambda _: mark("encoder warm"))
        mark("encoder loaded")
        backend = factory()
        mark("backend built")
        bar = tqdm(total=total, unit="frame", desc=f"tracking {path.name}", disable=not progress,
                   dynamic_ncols=True)
        torch_threads = torch.get_num_threads()
        if device == "cpu" and workers > 0:
            # Leave the detection workers their cores: OpenMP threads competing with them for a
            # core spin and slow the encoder several times over (seen on 2 cores).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
        try:
            frames = _span_frames(reader, span_start, start, end, options.max_frames, after)
            if options.decode_ahead > 0:
                frames = prefetch(frames, options.decode_ahead)
            stream = detect_stream(_first_marked(frames, mark, "first frame"), backend, workers=workers, pool=pool,
                                   redetect_every=options.redetect_every)

            def observed(times, rows, valid):
                mark(f"rows {len(rows)}")
                if observe is not None:
                    observe(times, rows, valid)

            times, raw_rows, valid = _encode_subject(_first_marked(stream, mark, "first faces"), encoder,
                                                     batch_size, bar.update, observed, one_shape=one_shape)
            mark("end")
        except torch.cuda.OutOfMemoryError:
            raise RetargetError(f"out of GPU memory while encoding {path}; use a smaller --batch-size") from None
        finally:
            bar.close()
            torch.set_num_threads(torch_threads)

    valid_arr = np.array(valid, dtype=bool)
    times_arr = np.array(times, dtype=np.float64)
    keep = rows_in_range(times_arr, start, end)[:options.max_frames]
    if stats is not None:
        stats.update(frames_decoded=reader.decoded, frames_tracked=len(times), frames_kept=len(keep),
                     margin_frames=(before, after), timeline=timeline)
    if not len(keep):
        where = f"between {start:g}s and {end:g}s" if end is not None else f"from {start:g}s on"
        raise RetargetError(f"{path} has no frame {where} (its last frame is at {times_arr[-1]:.3f}s)")
    if not valid_arr[keep].any():
        what = "the image" if reader.kind == "image" else f"any of the {len(keep)} frames"
        raise RetargetError(f"no face found in {what} of {path} (face backend: {backend.name})")
    raw = np.stack(raw_rows).astype(np.float32)
    params = smooth_rows(raw, valid_arr, times_arr, smoothing)
    # The first frame after the range tells where it ends; none: the source ended.
    range_end = float(times_arr[keep[-1] + 1]) if keep[-1] + 1 < len(times_arr) else math.inf
    return Track(raw=raw[keep], params=params[keep], valid=valid_arr[keep], times=times_arr[keep],
                 fps=reader.fps, source=str(path), source_sha256=source_sha256(path), backend=backend.name,
                 weights_id=weights_identity(smirk_path), smoothing=smoothing, range_start=start,
                 range_end=range_end)


def _first_marked(items: Iterator, mark: Callable[[str], None], event: str) -> Iterator:
    """`items` unchanged, calling mark(event) when the first one arrives."""
    items = iter(items)
    first = next(items, None)
    if first is None:
        return
    mark(event)
    yield first
    yield from items


def _when_all(futures: list, call: Callable[[], None]) -> None:
    """call() (in whichever thread finishes last) once every future is done."""
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_):
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            call()

    for fut in futures:
        fut.add_done_callback(one_done)


def rows_in_range(times: np.ndarray, start: float, end: float | None) -> np.ndarray:
    """Indices of the tracked rows (times (T,) seconds) that a range [start, end) keeps (end None:
    to the end): what track_video cuts its span to, after smoothing."""
    inside = times >= start - 1e-6
    if end is not None:
        inside &= times < end
    return np.flatnonzero(inside)


def smooth_rows(raw: np.ndarray, valid: np.ndarray, times: np.ndarray, smoothing: dict) -> np.ndarray:
    """A track's `params` from its tracked rows: frames without a face filled from their
    neighbours in time, then smoothed (`smoothing`: TrackOptions.smoothing_params()).
    raw: (T, 55) float32, NaN where invalid; valid: (T,) bool, at least one True; times: (T,)
    seconds. Returns (T, 55) float32, for every row of the span (track_video cuts it to the range).
    Row i depends only on the rows within the smoothing's reach of it (`smoothing.margin_frames`)
    and, for a row without a face, on the valid rows on either side of its gap."""
    filled = sm.fill_invalid(raw, valid, times)
    return sm.smooth(filled, times, smoothing["method"], **{k: v for k, v in smoothing.items() if k != "method"})


def track_range(path: str | os.PathLike, start: float, end: float | None = None, *,
                smirk_path: str | os.PathLike, landmarker_path: str | os.PathLike | None = None,
                options: TrackOptions | None = None, progress: bool = False,
                backend_factory: Callable[[], object] | None = None, stats: dict | None = None) -> Track:
    """Track only the frames of `path` with time in [start, end) seconds (end None: to the end),
    seeking to them and tracking the smoothing's margin around them (see `track_video`, of
    which this is the range form; `options` give the rest, their start/end replaced). For one
    moment t of a clip, `track_range(path, t, t + 1 / fps)` holds the first frame at or after
    t (fps: `render.video.open_video(path).fps`), smoothed as within the whole clip."""
    import dataclasses

    options = dataclasses.replace(options or TrackOptions(), start=float(start), end=end)
    return track_video(path, smirk_path=smirk_path, landmarker_path=landmarker_path, options=options,
                       progress=progress, backend_factory=backend_factory, stats=stats)


def _fmt_ranges(track: Track, limit: int = 6) -> str:
    parts = []
    for a, b in track.invalid_ranges()[:limit]:
        frames = f"{a}" if a == b else f"{a}-{b}"
        secs = f"{track.times[a]:.2f}s" if a == b else f"{track.times[a]:.2f}-{track.times[b]:.2f}s"
        parts.append(f"{frames} ({secs})")
    more = len(track.invalid_ranges()) - limit
    return ", ".join(parts) + (f", +{more} more" if more > 0 else "")


def summarize(track: Track) -> str:
    """One line: frames, duration, fps, how many had a face, and where the face was missing."""
    T = len(track)
    span = float(track.times[-1] - track.times[0]) if T > 1 else 0.0
    line = (f"{Path(track.source).name or 'track'}: {T} frame{'s' if T != 1 else ''}, {span:.2f} s at "
            f"{track.fps:.2f} fps, face in {T - track.n_invalid}/{T} ({track.backend}, "
            f"smoothing {track.smoothing.get('method', 'none')})")
    if track.n_invalid:
        line += f"; no face in {track.n_invalid} (filled): frames {_fmt_ranges(track)}"
    return line
