"""The writer stage of `retarget run`: the aligned faces, in frame order, into the output video
(pasted back into the actor photo unless --crop-only), the --frames-dir PNGs and the preview.

`VideoSink` holds what the stage needs and nothing of the models, so it pickles: `open()` builds
the stage in this process (paste-back threads beside the encoder), and `retarget.sink_process`
builds the very same stage in a process of its own, where paste-back, colour conversion and x264
take no GIL time from the render loop. No torch here: a writer process starts in a
fraction of a second.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PASTE_THREADS = 2  # paste-back threads beside the encoder (the writer thread)
PASTE_AHEAD = 4  # frames pasted ahead of the encoder: up to this many full-size frames more in memory


@dataclass
class VideoSink:
    """The writer stage's settings (picklable; numpy and paths only).

    out: the video; fps: its frame rate; audio: (file, start_s, end_s) to carry over, (file,
    None, None) when the range comes later (`video.set_audio_range`), or None; frames_dir: a
    folder for every output frame as PNG, or None; actor_rgb (H, W, 3) uint8 and M (2, 3), the
    photo->crop alignment of a crop_size crop: paste back into the photo (actor_rgb None: write the
    faces as they come).
    """

    out: Path
    fps: float
    audio: tuple | None = None
    frames_dir: Path | None = None
    actor_rgb: np.ndarray | None = None
    M: np.ndarray | None = None
    crop_size: int = 512

    def writer(self):
        """The output's render.video.VideoWriter: its checks (format, folder, audio source) run
        now; it opens on the first frame."""
        from render.video import VideoWriter

        a = self.audio
        later = a is not None and a[1] is None
        return VideoWriter(self.out, self.fps, audio_from=a[0] if a else None,
                           audio_start=a[1] if a and not later else 0.0,
                           audio_end=a[2] if a and not later else None, audio_later=later)

    def open(self, preview=None, params: np.ndarray | None = None):
        """The stage: a context manager whose value is write(i, face) for the (S, S, 3) uint8
        faces i = 0..T-1 in order; its outputs are renamed into place when it exits normally
        and deleted when it exits with an error. Its `video` is the VideoWriter (the job's
        handle for `set_audio_range`). preview: (path, iterator of driving frames, FLAME model
        or None) for a side-by-side preview of `params` (T, 55), or None."""
        from render.storyboard import save_image
        from render.video import VideoWriter

        writer = self.writer()
        pwriter = VideoWriter(preview[0], self.fps) if preview else None
        frames_dir, paste_back = self.frames_dir, self.actor_rgb is not None

        @contextmanager
        def sink():
            with ExitStack() as stack:
                stack.enter_context(writer)
                if pwriter:
                    stack.enter_context(pwriter)
                pool = None
                if paste_back:  # pasting the next frames overlaps encoding this one (cv2 and numpy release the GIL)
                    pool = ThreadPoolExecutor(PASTE_THREADS, thread_name_prefix="retarget-paste")
                    stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # on errors too: no thread left
                pending: deque = deque()  # (frame index, future of its pasted frame), in frame order

                def emit(i: int, frame: np.ndarray, prepared=None) -> None:
                    writer.write(frame if prepared is None else prepared)
                    if frames_dir:
                        save_image(frames_dir / f"{i:06d}.png", frame)
                    if pwriter:
                        pwriter.write(_preview_frame(next(preview[1]), frame, params[i], preview[2]))

                def paste(face: np.ndarray):
                    # The encoder's colour conversion too, here: it was a third of the writer thread's time
                    # at 1080p, and swscale releases the GIL (bench/NOTES_run.md, 2026-12-04).
                    full = paste_into(self.actor_rgb, face, self.M, self.crop_size)
                    return full, writer.prepare(full)

                def write(i: int, face: np.ndarray) -> None:
                    if pool is None:
                        return emit(i, face)
                    pending.append((i, pool.submit(paste, face)))
                    if len(pending) > PASTE_AHEAD:
                        j, pasted = pending.popleft()
                        emit(j, *pasted.result())  # a paste-back error surfaces here, in frame order

                yield write
                while pending:  # the last frames (not reached when the job failed: the error skips this)
                    j, pasted = pending.popleft()
                    emit(j, *pasted.result())

        cm = sink()
        cm.video = writer
        return cm


def _preview_frame(driving: np.ndarray, frame: np.ndarray, params: np.ndarray, flame) -> np.ndarray:
    from render.preview import side_by_side

    panels, labels = [driving, frame], ["driving", "output"]
    if flame is not None:
        from render.mesh import params_to_mesh_image

        panels.append(params_to_mesh_image(flame, params, size=512))
        labels.append("FLAME")
    return side_by_side(panels, height=min(512, frame.shape[0]) // 2 * 2, labels=labels)


_last_paster: tuple = ()  # (actor photo, M, crop size, face size, render.paste.Paster) of the last call


def paste_into(actor_rgb: np.ndarray, face: np.ndarray, M: np.ndarray, crop_size: int) -> np.ndarray:
    """The generated aligned (S, S, 3) uint8 face pasted into the full-resolution (H, W, 3) uint8
    actor photo whose crop_size crop M (2, 3) maps to. The photo's share of the work (mask,
    region, warped mask, colour statistics) is kept for the next call with the same photo and
    alignment (render.paste.Paster: the same pixels as paste_back, 2.5x faster on a 1080p photo)."""
    global _last_paster
    from render.paste import Paster

    kept = _last_paster
    if not (kept and kept[0] is actor_rgb and np.array_equal(kept[1], M) and kept[2:4] == (crop_size, face.shape[0])):
        kept = (actor_rgb, np.array(M), crop_size, face.shape[0], Paster(actor_rgb, M, face.shape[0], crop_size=crop_size))
        _last_paster = kept  # one tuple replaced at once: safe for the writer thread and others
    return kept[4].paste(face)


def pipe_paste(actor_rgb: np.ndarray, face: np.ndarray, actor) -> np.ndarray:
    """`paste_into` for a prepared actor (retarget.pipeline's: its `M` and its `crop`)."""
    return paste_into(actor_rgb, face, actor.M, actor.crop.shape[0])
