"""Render ahead: a job's first batches render while the rest of its clip is still being tracked.

A driving frame's params depend only on the tracked rows near it: the smoothing's reach
(`tracking.smoothing.margin_frames`), the valid rows on either side of a gap (filling), the two
rows around an output time (--fps resampling). So once the tracker is far enough past a frame,
that frame's params are known, though the clip is not tracked to its end.

`RenderAhead` gets the rows as the tracker settles them (`observe`, called in the tracking
thread), computes the job's params from them with the job's own function (`params_of`), and
renders, one batch at a time, the full batches whose frames the margin says are final (`render`,
in the job's thread), saving their frames under `folder`. When tracking has ended, `adopt`
compares the params each batch was rendered with to the job's final params, bit for bit, and
moves the batches that match into the work folder, where the render loop finds them already
rendered; a batch that does not match is dropped and rendered again there. So the video is the
one rendered after tracking, whatever the margin guessed: the margin decides only how much of
the work is kept.

Batches are the job's own, [kB, (k+1)B): the same frames in the same shapes, so the same bits
(retarget.run's --resume relies on the same). This module imports only retarget.overlap (whose
saver thread writes the frames) from retarget.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

# Batches whose params one computation gives (it smooths only the rows around them).
AHEAD_BATCHES = 4

# Rows beyond the smoothing's reach that a frame must lie behind the last valid tracked row:
# one for --fps resampling (an output time between two rows needs the later one), one spare.
EXTRA_ROWS = 2


class Cancelled(Exception):
    """Raised by `observe` in the tracking thread once the job has failed: tracking stops."""


def final_frames(at: np.ndarray, times: np.ndarray, valid: np.ndarray, reach_rows: int) -> int:
    """How many of the output frames at times `at` (seconds, increasing) have params that more
    tracked rows cannot change: those at or before the row `reach_rows + EXTRA_ROWS` rows ahead
    of the last valid row tracked so far (rows after it are held from it, not yet interpolated).
    times, valid: (T,) of the rows tracked so far."""
    found = np.flatnonzero(np.asarray(valid, bool))
    if not len(found):
        return 0
    limit = int(found[-1]) - int(reach_rows) - EXTRA_ROWS
    if limit < 0:
        return 0
    return int(np.searchsorted(np.asarray(at, np.float64), float(times[limit]) + 1e-9, side="right"))


class RenderAhead:
    """Frames rendered before the end of tracking, kept only where their params are the job's.

    folder: where the frames wait (emptied now; `adopt` or `discard` removes it);
    params_of(times (T,), rows (T of (55,) arrays), valid (T,), first=, count=) -> (params (M, 55), final) or
    None: the job's params for output frames first .. first + count of the M the rows so far reach
    (the others may be NaN), and how many frames from 0 are final;
    save(path, rgb): writes one PNG.
    """

    def __init__(self, folder: Path, params_of: Callable, save: Callable[[Path, np.ndarray], None]):
        self.folder, self.params_of, self.save = Path(folder), params_of, save
        shutil.rmtree(self.folder, ignore_errors=True)  # a killed run's frames: never checked
        self._cond = threading.Condition()
        self._rows = None  # the latest (times, rows, valid) from the tracker
        self._fresh = False
        self._done = False
        self._cancelled = False
        self.used: dict[int, tuple[list[int], np.ndarray]] = {}  # first frame -> (indices, params rows)
        self.kept: set[int] = set()  # frames that `adopt` found rendered with the final params
        self.seconds = 0.0  # spent rendering ahead
        self.batch_starts: list[float] = []  # time.perf_counter() as each batch began (benchmarks)

    # ------------------------------------------------------------------ the tracking thread
    def observe(self, times: list, rows: list, valid: list) -> None:
        """tracking.tracker.track_video's `observe`: the rows tracked so far (all settled)."""
        with self._cond:
            if self._cancelled:
                raise Cancelled()
            self._rows, self._fresh = (times, rows, valid), True
            self._cond.notify_all()

    def finish(self) -> None:
        """Tracking has ended (done or failed): `render` returns after its current batch."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def cancel(self) -> None:
        """The job failed: the next `observe` stops the tracking; `render` stops too."""
        with self._cond:
            self._cancelled = self._done = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ the job's thread
    def render(self, render: Callable[[list[list[int]], np.ndarray], Iterable[tuple[list[int], np.ndarray]]],
               batch: int, on_batch: Callable[[list[int], np.ndarray], None] | None = None) -> int:
        """Render final full batches of `batch` frames in order with `render` (Rendering.render's
        signature) until tracking has ended; returns the frames rendered. The PNGs are written by
        retarget.overlap's saver thread while the next batch renders (in bounded memory).
        on_batch(indices, images): each rendered batch, in frame order from 0 (retarget.overlap's
        EarlyWriter writes them into the video; only frames that `adopt` keeps may stay there)."""
        from retarget.overlap import render_and_write

        t0 = time.perf_counter()
        # No writer here (sink None): n and load are for the writer; the saver writes each frame.
        render_and_write(self._batches(render, batch, on_batch), 0,
                         save=lambda i, img: self.save(self._path(i), img), load=None, batch=batch)
        self.seconds = time.perf_counter() - t0
        return self.rendered

    def _batches(self, render, batch: int, on_batch=None):
        """(indices, images) of each final full batch, rendered in order, until tracking has ended."""
        start, params, final = 0, None, 0
        while True:
            with self._cond:
                while not self._done and not self._fresh and start + batch > final:
                    self._cond.wait()
                if self._done:
                    return
                # New params only when the next batch needs them: each computation still
                # converts every row's time and validity, and smooths a window of rows.
                rows = self._rows if self._fresh and start + batch > final else None
                self._fresh = self._fresh and rows is None
            if rows is not None:
                # rows stay a list of (55,) arrays: params_of stacks only the window it smooths.
                got = self.params_of(np.asarray(rows[0], np.float64), rows[1], np.asarray(rows[2], bool),
                                     first=start, count=AHEAD_BATCHES * batch)
                if got is not None:
                    params, final = got[0], int(got[1])
            if params is None or start + batch > final:
                continue
            idx = list(range(start, start + batch))
            self.folder.mkdir(parents=True, exist_ok=True)
            self.used[start] = (idx, np.array(params[idx], np.float32, copy=True))
            self.batch_starts.append(time.perf_counter())
            for got in render([idx], params):
                if on_batch is not None:
                    on_batch(*got)
                yield got
            start += batch

    def adopt(self, params: np.ndarray, dest: Callable[[int], Path]) -> int:
        """Move the frames of every batch rendered with exactly the job's final `params` (T, 55)
        rows to dest(i); drop the others. Returns the frames kept (`kept` holds them); removes the folder."""
        for idx, used in self.used.values():
            if idx[-1] < len(params) and np.array_equal(np.asarray(params[idx], np.float32), used):
                for i in idx:
                    os.replace(self._path(i), dest(i))
                self.kept.update(idx)
        self.discard()
        return len(self.kept)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def rendered(self) -> int:
        return sum(len(idx) for idx, _ in self.used.values())

    def _path(self, i: int) -> Path:
        return self.folder / f"{i:06d}.png"
