"""Streaming video reading and writing (PyAV), with rotation, real timestamps and audio.

Reading: `open_video(path)` accepts a video file (mp4/mov/webm/mkv/...), a folder of images
or a single image, and yields `VideoFrame`s one at a time: frames are never all held in
memory. Writing: `VideoWriter` encodes H.264 (yuv420p) into a temporary file beside the
destination and renames it only when `close()` succeeds, so a failed run leaves nothing
half-written; audio can be carried over from the driving video, trimmed in sync.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from render.errors import RetargetError
from render.files import partial_name

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_IMAGE_FPS = 25.0

# Audio codecs an mp4/mov file can hold as they are (copy without re-encoding).
_MP4_AUDIO_CODECS = {"aac", "mp3", "alac"}
X264_PRESET = "medium"  # libx264 preset of VideoWriter (bench/run.py --x264-preset compares others)
_OUTPUT_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}


@dataclass
class VideoFrame:
    """One decoded frame: `index` counts frames yielded from 0, `time_s` is the presentation
    time in seconds (real timestamps, also for variable frame rate), `rgb` is HxWx3 uint8 RGB
    with the container's rotation already applied."""

    index: int
    time_s: float
    rgb: np.ndarray


def _natural_key(name: str) -> list:
    """Sort key for 'frame2.png' < 'frame10.png'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# Frame colour tags (FFmpeg's AVColorSpace, AVColorRange) for which OpenCV's I420 -> RGB
# conversion (BT.601 matrix, limited range) is the right one: untagged, BT.470BG, SMPTE 170M;
# range untagged or limited.
_BT601_SPACES = {2, 5, 6}
_LIMITED_RANGES = {0, 1}


def frame_to_rgb(frame) -> np.ndarray:
    """A decoded PyAV `VideoFrame` -> HxWx3 uint8 RGB, coded orientation (no rotation).

    8-bit 4:2:0 frames of even size tagged BT.601 or untagged, limited range (most H.264
    files, ours included) are converted by OpenCV from the Y/U/V planes: decoding with it ran
    4-6x faster than with swscale's rgb24 path on the H100 host and 1.5x here (2 cores), and
    it lacks swscale's bias (on an H.264 file of a photo: mean error 1.39 vs 1.81 levels,
    bias 0.0-0.1 vs -1.0 to -1.2).
    Everything else (BT.709 and other tags, full range, 10-bit, 4:2:2, 4:4:4, odd sizes)
    goes through swscale, which honours the frame's colour tags."""
    if (frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0
            and int(frame.colorspace) in _BT601_SPACES and int(frame.color_range) in _LIMITED_RANGES):
        import cv2

        return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2RGB_I420)
    return frame.to_ndarray(format="rgb24")


def apply_rotation(rgb: np.ndarray, rotation_deg: float) -> np.ndarray:
    """Rotate a decoded HxWx3 frame for display.

    `rotation_deg` is the display-matrix angle as PyAV reports it (`VideoFrame.rotation`):
    the counter-clockwise rotation to apply to the coded picture. Only multiples of 90 occur
    in practice; other angles are rounded to the nearest one. Returns a contiguous array.
    """
    k = int(round(float(rotation_deg) / 90.0)) % 4
    if k == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k))


def _read_image(path: Path) -> np.ndarray:
    """Read one image file as HxWx3 uint8 RGB (EXIF orientation applied)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise RetargetError(f"cannot read image {path}: {e}") from None


class VideoReader:
    """Streaming frame source. Attributes: `path`, `fps` (average rate; for images the rate
    given), `size` (w, h after rotation), `frame_count` (may be an estimate; 0 if unknown),
    `has_audio`, `duration_s` (0.0 if unknown), `kind` ("video", "folder" or "image"),
    `first_time_s` (the first frame's time, 0.0 for images), `decoded` (frames decoded so far
    by all iterations, those dropped before a `start_s` included: a counter for tests).

    Iterating yields `VideoFrame`s in presentation order. Each iteration decodes afresh.
    """

    def __init__(self, path: Path, kind: str, fps: float, size: tuple[int, int], frame_count: int,
                 has_audio: bool, duration_s: float, images: list[Path] | None = None,
                 first_time_s: float = 0.0):
        self.path = path
        self.kind = kind
        self.fps = float(fps)
        self.size = size
        self.frame_count = int(frame_count)
        self.has_audio = has_audio
        self.duration_s = float(duration_s)
        self._images = images
        self.first_time_s = float(first_time_s)
        self.decoded = 0

    def __iter__(self) -> Iterator[VideoFrame]:
        return self.frames()

    def __len__(self) -> int:
        return self.frame_count

    def frames(self, start_s: float = 0.0, end_s: float | None = None,
               max_frames: int | None = None) -> Iterator[VideoFrame]:
        """Yield frames whose time lies in [start_s, end_s) (end None: to the end), at most
        `max_frames` of them. Indices count from 0 at the first frame yielded.
        Raises RetargetError if the source cannot be decoded or yields no frame at all."""
        if self.kind == "video":
            gen = self._video_frames(start_s, end_s)
        else:
            gen = self._image_frames(start_s, end_s)
        n = 0
        for frame in gen:
            if max_frames is not None and n >= max_frames:
                break
            yield VideoFrame(n, frame[0], frame[1])
            n += 1
        if n == 0:
            where = ("" if (start_s <= 0 and end_s is None) else f" after {start_s:g}s" if end_s is None
                     else f" between {start_s:g}s and {end_s:g}s")
            raise RetargetError(f"{self.path} contains no decodable video frames{where}")

    def _image_frames(self, start_s: float, end_s: float | None) -> Iterator[tuple[float, np.ndarray]]:
        for i, p in enumerate(self._images):
            t = i / self.fps
            if t < start_s - 1e-9:
                continue
            if end_s is not None and t >= end_s:
                break
            rgb = _read_image(p)
            self.decoded += 1
            if self.kind == "folder" and (rgb.shape[1], rgb.shape[0]) != self.size:
                raise RetargetError(
                    f"image {p} is {rgb.shape[1]}x{rgb.shape[0]} but the first image of {self.path} is "
                    f"{self.size[0]}x{self.size[1]}; all frames of a folder must have one size")
            yield t, rgb

    def _video_frames(self, start_s: float, end_s: float | None) -> Iterator[tuple[float, np.ndarray]]:
        import av

        container = _open_container(self.path)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start_s > 0 and stream.time_base is not None:
                try:
                    container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
                except av.error.FFmpegError:
                    container.seek(0)
            count = 0
            for frame in _decode(container, stream, self.path):
                t = frame.time
                if t is None:
                    # No pts (some raw streams): fall back to a constant-rate clock.
                    t = count / self.fps
                count += 1
                self.decoded += 1
                if t < start_s - 1e-6:
                    continue
                if end_s is not None and t >= end_s:
                    break
                rgb = frame_to_rgb(frame)
                yield float(t), apply_rotation(rgb, getattr(frame, "rotation", 0) or 0)
        finally:
            container.close()


def prefetch(frames: Iterator[VideoFrame], depth: int = 8) -> Iterator[VideoFrame]:
    """Yield the items of `frames` (any iterator, e.g. `VideoReader.frames()`), unchanged and
    in order, while a background thread reads up to `depth` items ahead, so that decoding
    overlaps with the caller's work (PyAV and NumPy release the GIL while they decode and
    convert). An exception raised by `frames` (e.g. RetargetError for a corrupt file) is
    raised here at the point where that item would have come. When the caller stops early
    (break, error, close()), the thread stops too and `frames` is closed in it, so the file
    is released."""
    import queue
    import threading

    if depth < 1:
        raise ValueError(f"prefetch depth must be at least 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in frames:
                if not put((item, None)):
                    break
            else:
                put((done, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((done, e))
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="video-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _open_container(path: Path):
    import av

    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise RetargetError(f"cannot read video {path}: {_short(e)}") from None
    if not container.streams.video:
        container.close()
        raise RetargetError(f"{path} has no video stream")
    return container


def _decode(container, stream, path: Path):
    """Decode frames of `stream`, turning decoder failures into RetargetError."""
    import av

    it = container.decode(stream)
    while True:
        try:
            frame = next(it)
        except StopIteration:
            return
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise RetargetError(f"cannot decode video {path}: {_short(e)}") from None
        yield frame


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def open_video(path: str | os.PathLike, *, fps: float | None = None) -> VideoReader:
    """Open a video file, a folder of images (natural sort order) or a single image.

    `fps` is the frame rate given to image folders and single images (default 25); for
    video files it is ignored and the stream's average rate is used. Probes the first frame
    to learn the size after rotation. Raises RetargetError naming the path if it is missing,
    unreadable, not a video, has no video stream, or holds no decodable frame.
    """
    path = Path(path)
    if not path.exists():
        raise RetargetError(f"no such file or folder: {path}")
    img_fps = float(fps) if fps else DEFAULT_IMAGE_FPS
    if img_fps <= 0:
        raise RetargetError(f"fps must be positive for image input {path}, got {fps}")
    if path.is_dir():
        images = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                        key=lambda p: _natural_key(p.name))
        if not images:
            raise RetargetError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        first = _read_image(images[0])
        return VideoReader(path, "folder", img_fps, (first.shape[1], first.shape[0]), len(images), False,
                           len(images) / img_fps, images)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        first = _read_image(path)
        return VideoReader(path, "image", img_fps, (first.shape[1], first.shape[0]), 1, False, 0.0, [path])
    if not os.access(path, os.R_OK):
        raise RetargetError(f"cannot read video {path}: permission denied")
    if path.stat().st_size == 0:
        raise RetargetError(f"cannot read video {path}: the file is empty")

    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        video_fps = float(rate) if rate else 0.0
        duration_s = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / 1_000_000
        first = None
        for frame in _decode(container, stream, path):
            first = frame
            break
        if first is None:
            raise RetargetError(f"{path} contains no decodable video frames")
        w, h = first.width, first.height
        if int(round((getattr(first, "rotation", 0) or 0) / 90.0)) % 2:
            w, h = h, w
        if video_fps <= 0:
            video_fps = DEFAULT_IMAGE_FPS
        frame_count = stream.frames or int(round(duration_s * video_fps))
        has_audio = bool(container.streams.audio)
        first_time_s = float(first.time) if first.time is not None else 0.0
    finally:
        container.close()
    return VideoReader(path, "video", video_fps, (w, h), frame_count, has_audio, duration_s,
                       first_time_s=first_time_s)


def _even(n: int) -> int:
    return n + (n % 2)


class Prepared:
    """A frame from `VideoWriter.prepare`: the encoder's pixel format, and the RGB size it came from."""

    __slots__ = ("frame", "size")

    def __init__(self, frame, size: tuple[int, int]):
        self.frame, self.size = frame, size


class VideoWriter:
    """H.264 (yuv420p) video writer with optional audio from another file; a context manager.

    `path`: .mp4, .mov or .mkv. `fps`: frame rate (frames written without a time get
    times index/fps). `audio_from`: a media file whose first audio stream is carried over
    (usually the driving video), trimmed to [audio_start, audio_end] seconds of that file
    (audio_end None: to its end) and shifted so `audio_start` plays at time 0 of the output.
    The stream is copied when its codec fits the container and no trimming is needed, else
    re-encoded to AAC. A file without audio gives a silent output. `crf`: x264 quality; `preset`:
    x264's speed/size trade-off (default X264_PRESET). `audio_later`: the audio's range is not
    known yet (a job that writes while its clip is still being tracked; audio_start and audio_end
    are then ignored): the audio is trimmed (AAC) and held back until `set_audio_range`, which
    must come before `close`.

    Frames are HxWx3 uint8 RGB of one size; odd widths/heights are padded by one replicated
    pixel row/column to even sizes (yuv420p needs them). Output goes to a temporary file in
    the destination folder, renamed onto `path` by a successful `close()`; on an exception
    inside the `with` block (or `abort()`), the temporary file is deleted and `path` is
    untouched.
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, audio_from: str | os.PathLike | None = None,
                 audio_start: float = 0.0, audio_end: float | None = None, crf: int = 18,
                 preset: str | None = None, audio_later: bool = False):
        self.path = Path(path)
        fmt = _OUTPUT_FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise RetargetError(f"output {self.path}: use .mp4, .mov or .mkv for H.264 video")
        if not fps or fps <= 0:
            raise RetargetError(f"output {self.path}: fps must be positive, got {fps}")
        if not self.path.parent.is_dir():
            raise RetargetError(f"output folder {self.path.parent} does not exist")
        if audio_end is not None and audio_end <= audio_start:
            raise RetargetError(f"audio range [{audio_start}, {audio_end}] of {audio_from} is empty")
        self.fps = float(fps)
        self.crf = int(crf)
        self.preset = preset or X264_PRESET
        self._format = fmt
        self._tmp = partial_name(self.path)
        self._container = None
        self._vstream = None
        self._size: tuple[int, int] | None = None
        self._count = 0
        self._last_pts = -1
        self._closed = False
        self._audio = None
        self._audio_args = (Path(audio_from) if audio_from is not None else None, float(audio_start), audio_end)
        # Audio waits while its range is unknown: written ahead of the video (up to a second) it could
        # run past the end, and an AAC frame already muxed cannot be taken back.
        self._audio_held = bool(audio_later) and audio_from is not None
        if audio_from is not None:
            _probe_audio(Path(audio_from))  # fail early on an unreadable audio source

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def frames_written(self) -> int:
        return self._count

    @property
    def partial(self) -> Path:
        """The temporary file written until `close` renames it onto `path` (it may not exist yet)."""
        return self._tmp

    def _start(self, w: int, h: int) -> None:
        import av

        try:
            # faststart: the index goes first, so players can start before the whole file loads.
            options = {"movflags": "+faststart"} if self._format in ("mp4", "mov") else {}
            self._container = av.open(str(self._tmp), mode="w", format=self._format, options=options)
        except (av.error.FFmpegError, OSError) as e:
            raise RetargetError(f"cannot write {self.path}: {_short(e)}") from None
        rate = Fraction(self.fps).limit_denominator(1001)
        stream, codec = None, None
        for codec in ("libx264", "h264", "libopenh264", "h264_nvenc"):
            try:
                stream = self._container.add_stream(codec, rate=rate)
                break
            except (av.error.FFmpegError, ValueError, av.codec.codec.UnknownCodecError):
                continue
        if stream is None:
            raise RetargetError("no H.264 encoder in this PyAV/FFmpeg build (tried libx264, h264, libopenh264)")
        stream.width, stream.height = _even(w), _even(h)
        stream.pix_fmt = "yuv420p"
        # A fine clock so frames with real (variable-rate) times keep them.
        stream.codec_context.time_base = Fraction(1, 90000)
        if codec == "libx264":
            stream.options = {"crf": str(self.crf), "preset": self.preset}
        self._vstream = stream
        src, start, end = self._audio_args
        if src is not None:
            self._audio = _AudioCarrier(src, self._container, self._format, start, end, trim=self._audio_held)

    def set_audio_range(self, start_s: float, end_s: float) -> None:
        """The audio's range (seconds of the source; start_s plays at output time 0) for a writer
        made with `audio_later`; the held audio follows with the next frame or at `close`."""
        src = self._audio_args[0]
        if end_s <= start_s:
            raise RetargetError(f"audio range [{start_s}, {end_s}] of {src} is empty")
        self._audio_args = (src, float(start_s), float(end_s))
        if self._audio is not None:  # made at the first frame; nothing of it has been pumped yet
            self._audio.start, self._audio.end = float(start_s), float(end_s)
        self._audio_held = False

    def prepare(self, rgb: np.ndarray) -> "Prepared":
        """One HxWx3 uint8 RGB frame converted to what the encoder takes (yuv420p, padded to even
        sizes), for `write`. Keeps no state: other threads may prepare the next frames while this
        writer encodes (swscale releases the GIL); `write(rgb)` converts through here too."""
        import av

        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise RetargetError(f"frames for {self.path} must be HxWx3 uint8 RGB, got {rgb.shape} {rgb.dtype}")
        h, w = rgb.shape[:2]
        if w % 2 or h % 2:
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
        return Prepared(frame, (w, h))

    def write(self, rgb: "np.ndarray | Prepared", time_s: float | None = None) -> None:
        """Append one HxWx3 uint8 RGB frame (or one from `prepare`) shown at `time_s` seconds of
        the output (default: frames_written / fps). Times must increase."""
        import av

        if self._closed:
            raise RetargetError(f"writer for {self.path} is already closed")
        prepared = rgb if isinstance(rgb, Prepared) else self.prepare(rgb)
        w, h = prepared.size
        if self._size is None:
            self._size = (w, h)
            self._start(w, h)
        elif self._size != (w, h):
            raise RetargetError(f"frame {self._count} for {self.path} is {w}x{h}, the first was "
                                f"{self._size[0]}x{self._size[1]}")
        t = self._count / self.fps if time_s is None else float(time_s)
        tb = self._vstream.codec_context.time_base
        pts = int(round(t / tb))
        if pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts = pts
        frame = prepared.frame
        frame.pts = pts
        frame.time_base = tb
        try:
            for packet in self._vstream.encode(frame):
                self._container.mux(packet)
            if self._audio is not None and not self._audio_held:
                self._audio.pump(until_s=t + 1.0)
        except av.error.FFmpegError as e:
            raise RetargetError(f"cannot write {self.path}: {_short(e)}") from None
        self._count += 1

    def close(self) -> None:
        """Finish the file and move it onto `path`. Raises RetargetError if no frame was written."""
        import av

        if self._closed:
            return
        try:
            if self._count == 0:
                raise RetargetError(f"no frames were written to {self.path}")
            if self._audio_held:
                raise RuntimeError(f"{self.path}: set_audio_range was never called")
            for packet in self._vstream.encode():
                self._container.mux(packet)
            if self._audio is not None:
                self._audio.pump(until_s=None)
                self._audio.close()
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
        except BaseException as e:
            self.abort()
            if isinstance(e, av.error.FFmpegError):
                raise RetargetError(f"cannot write {self.path}: {_short(e)}") from None
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; `path` is left as it was."""
        self._closed = True
        if self._audio is not None:
            try:
                self._audio.close()
            except Exception:
                pass
            self._audio = None
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass


def _probe_audio(path: Path) -> None:
    if not path.exists():
        raise RetargetError(f"audio source {path} does not exist")
    container = _open_media(path, "audio source")
    container.close()


def _open_media(path: Path, what: str):
    import av

    try:
        return av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise RetargetError(f"cannot read {what} {path}: {_short(e)}") from None


class _AudioCarrier:
    """Moves audio from a source file into the output container, interleaved with the video
    as it is written (`pump(until_s)`), by stream copy or AAC re-encoding with trimming."""

    def __init__(self, src: Path, out, out_format: str, start: float, end: float | None, trim: bool = False):
        import av

        self.src = src
        self.start, self.end = start, end
        self.inp = _open_media(src, "audio source")
        self.out = out
        self.done = not self.inp.streams.audio
        if self.done:
            return
        self.in_stream = self.inp.streams.audio[0]
        name = self.in_stream.codec_context.name
        trimming = trim or start > 0 or end is not None
        fits = out_format == "matroska" or name in _MP4_AUDIO_CODECS
        self.copy = fits and not trimming
        if self.copy:
            self.out_stream = out.add_stream_from_template(self.in_stream)
            self._packets = self.inp.demux(self.in_stream)
        else:
            rate = self.in_stream.codec_context.sample_rate or 48000
            # By channel count, not the source's layout name: a WAV without a channel mask reports
            # "1 channels", which the AAC encoder refuses.
            layout = "mono" if self.in_stream.codec_context.channels == 1 else "stereo"
            self.out_stream = out.add_stream("aac", rate=rate)
            self.out_stream.codec_context.layout = layout
            self.out_stream.codec_context.format = "fltp"
            self.out_stream.codec_context.bit_rate = 192_000
            self.out_stream.codec_context.time_base = Fraction(1, rate)
            self.rate, self.layout = rate, layout
            self.resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            self._frames = self.inp.decode(self.in_stream)
            self.samples_out = 0
        self.time = 0.0  # output time (s) reached so far

    def pump(self, until_s: float | None) -> None:
        """Write audio up to output time `until_s` (None: all that remains)."""
        import av

        while not self.done and (until_s is None or self.time < until_s):
            try:
                if self.copy:
                    self._copy_one()
                else:
                    self._encode_one()
            except StopIteration:
                self.done = True
                if not self.copy:
                    for packet in self.out_stream.encode(None):
                        self.out.mux(packet)
            except (av.error.FFmpegError, OSError) as e:
                raise RetargetError(f"cannot read audio from {self.src}: {_short(e)}") from None

    def _copy_one(self) -> None:
        packet = next(self._packets)
        if packet.dts is None:  # the demuxer's final flush packet
            return
        if packet.pts is not None and packet.time_base is not None:
            self.time = float(packet.pts * packet.time_base)
        packet.stream = self.out_stream
        self.out.mux(packet)

    def _encode_one(self) -> None:
        frame = next(self._frames)
        t0 = frame.time
        if t0 is None:
            t0 = self.samples_out / self.rate + self.start
        for rs in self.resampler.resample(frame):
            self._emit(rs, t0)
            t0 += rs.samples / self.rate

    def _emit(self, frame, t0: float) -> None:
        import av

        data = frame.to_ndarray()  # (channels, samples) float32, planar
        n = data.shape[1]
        a = int(round((self.start - t0) * self.rate)) if t0 < self.start else 0
        b = n if self.end is None else min(n, int(round((self.end - t0) * self.rate)))
        if self.end is not None and t0 >= self.end:
            raise StopIteration
        if b <= a:
            return
        out = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, a:b]), format="fltp", layout=self.layout)
        out.sample_rate = self.rate
        out.pts = self.samples_out
        out.time_base = Fraction(1, self.rate)
        self.samples_out += b - a
        self.time = self.samples_out / self.rate
        for packet in self.out_stream.encode(out):
            self.out.mux(packet)

    def close(self) -> None:
        self.inp.close()
