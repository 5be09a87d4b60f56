"""Render, save and write at the same time, in bounded memory: the GPU renders batch k+1 while
one thread saves batch k's PNGs into the work folder and another pastes back and encodes the
finished frames in frame order.

    main thread    renders batches (any order)  --Channel(queue_batches)-->
    saver thread   writes each frame's PNG (the work folder: --resume; a batch's PNGs in SAVE_THREADS
                   threads at once)  --ReorderBuffer(buffer_frames)-->
    writer thread  frames 0..T-1 in order: from the buffer, or read back from the work folder's PNG
                   (frames of an earlier run, frames that came too early for the buffer); `sink`
                   pastes back, encodes, writes the preview and --frames-dir

Frames held in memory at once never exceed `held_bound(batch, queue_batches, buffer_frames)`:
the batch the renderer just made, `queue_batches` queued batches, the batch the saver holds, the
reorder buffer and the writer's frame. When the writer falls behind, the saver waits for room, the
queue fills and rendering blocks. A batch that arrives early (Ray workers finish in any order) and
finds the buffer full while the writer waits for an earlier frame is dropped from memory after
its PNG is saved, and the writer reads it back: no deadlock, the same bound.

Errors: the first error of any thread is raised in the caller's thread, the other threads stop
(the renderer after its current batch; the saver still saves the batches already rendered, so
--resume keeps them), and `sink`'s `with` block ends with the error (VideoWriter then deletes
its temporary file). Threads: cv2's PNG codec, PyAV's encoder and PyTorch release the GIL.
This module imports nothing from retarget: the job passes callables.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from typing import Callable, Iterable

import numpy as np


# Threads that save one batch's PNGs at once: PNG encoding (cv2, GIL released) was the saver's whole
# time and capped a compiled fast-mode job at ~40 frames/s on the H200 host with one thread
# (bench/results/run_NVIDIA_H200_24GB_2026-12-04_writer.json: save_s ~25 ms a frame).
SAVE_THREADS = max(1, min(4, os.cpu_count() or 1))


class Stopped(Exception):
    """Raised inside a stage when another one failed or the job was abandoned: it ends quietly."""


class Crew:
    """The threads of one job and the one condition they all wait on: the first error of any
    thread is kept and wakes every waiter, so no thread waits for a dead one."""

    def __init__(self):
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.threads: list[threading.Thread] = []

    def start(self, name: str, fn: Callable[[], None]) -> threading.Thread:
        t = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def _run(self, fn) -> None:
        try:
            fn()
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self.fail(e)

    def fail(self, e: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = e
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float | None = None) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def join(self) -> None:
        for t in self.threads:
            t.join()


class Channel:
    """A FIFO of at most `maxsize` items between two threads. `put` waits for room (not once a
    thread failed: the item is kept, so the saver can still save what was rendered); `get`
    returns None when closed and empty."""

    def __init__(self, crew: Crew, maxsize: int):
        self.crew, self.maxsize = crew, max(1, maxsize)
        self.items: deque = deque()
        self.closed = False
        self.waits = 0  # times `put` had to wait for room (tests: the back-pressure happened)

    def put(self, item) -> None:
        with self.crew.cond:
            if len(self.items) >= self.maxsize and self.crew.error is None:
                self.waits += 1
                self.crew.cond.wait_for(lambda: len(self.items) < self.maxsize or self.crew.error is not None)
            self.items.append(item)
            self.crew.cond.notify_all()

    def close(self) -> None:
        with self.crew.cond:
            self.closed = True
            self.crew.cond.notify_all()

    def get(self):
        with self.crew.cond:
            self.crew.cond.wait_for(lambda: self.items or self.closed)
            item = self.items.popleft() if self.items else None
            self.crew.cond.notify_all()
            return item


class ReorderBuffer:
    """Frames by index for one consumer that takes 0, 1, 2, ... in order, from a producer that
    offers whole batches in any order after saving them. Holds at most `capacity` frames.

    `offer` waits while the batch does not fit and the consumer can go on (back-pressure);
    when the consumer waits for a frame that is neither here nor saved, a batch that does not
    fit is dropped ("spilled": its frames are saved, the consumer reads them back). `take(i)`
    returns frame i's image, or None when it is to be read from where it was saved.
    """

    def __init__(self, crew: Crew, capacity: int, saved: Iterable[int] = ()):
        self.crew, self.capacity = crew, max(1, capacity)
        self.frames: dict[int, np.ndarray] = {}
        self.saved = set(saved)  # frames readable from the work folder
        self.next = 0  # the frame the consumer needs next
        self.abandoned = False
        self.spilled = 0

    def _consumer_can_go(self) -> bool:
        return self.next in self.frames or self.next in self.saved

    def offer(self, idx: list[int], images) -> bool:
        """Keep the batch for the consumer; False when it was spilled (or nobody will take it)."""
        c = self.crew.cond
        with c:
            c.wait_for(lambda: self.abandoned or self.crew.error is not None
                       or len(self.frames) + len(idx) <= self.capacity or not self._consumer_can_go())
            keep = (not self.abandoned and self.crew.error is None
                    and len(self.frames) + len(idx) <= self.capacity)
            if keep:
                self.frames.update(zip(idx, images))
            else:
                self.spilled += len(idx)
            self.saved.update(idx)
            c.notify_all()
            return keep

    def take(self, i: int) -> np.ndarray | None:
        c = self.crew.cond
        with c:
            self.next = i
            c.notify_all()  # a waiting producer may now have to spill
            c.wait_for(lambda: self.abandoned or self.crew.error is not None or self._consumer_can_go())
            if self.abandoned or self.crew.error is not None:
                raise Stopped()
            image = self.frames.pop(i, None)
            self.next = i + 1
            c.notify_all()
            return image

    def abandon(self) -> None:
        with self.crew.cond:
            self.abandoned = True
            self.crew.cond.notify_all()


def held_bound(batch: int, queue_batches: int, buffer_frames: int) -> int:
    """The most frames `render_and_write` holds in memory at once (see the module docstring)."""
    return (queue_batches + 2) * batch + buffer_frames + 1


def render_and_write(batches: Iterable[tuple[list[int], np.ndarray]] | None, n: int, *,
                     save: Callable[[int, np.ndarray], None], load: Callable[[int], np.ndarray],
                     sink: AbstractContextManager | None = None, saved: Iterable[int] = (), batch: int = 1,
                     progress=None, queue_batches: int = 2, buffer_frames: int | None = None,
                     stats: dict | None = None, written: int = 0) -> int:
    """Render, save and write `n` frames at once; returns how many frames were rendered now.

    batches: iterator of (frame indices, (B, H, W, 3) uint8 images) from the renderer, in any
    order (None: nothing to render); iterating it is the render work (timed as `gpu_busy`).
    save(i, image): frame i into the work folder (atomic). load(i): frame i back from there.
    sink: None (render and save only), or a context manager whose `__enter__` returns
    write(i, image), called for i = written..n-1 in order in the writer thread; it exits with the
    error when the job fails (its outputs must then vanish) and normally when all are written.
    written: frames the sink has already had (`EarlyWriter.continued`; they must be in `saved`).
    saved: frames already in the work folder that `batches` does not render (--resume).
    batch: the largest batch (for the default buffer and the bound). progress: a factory
    (total, desc, initial) -> tqdm-like bar, used from this thread only (never garbled): a
    "rendering" bar, then a "writing" bar from the frames written so far; None: no bars.
    buffer_frames: reorder buffer capacity (default 4 x batch, at least 8).
    stats: filled with perf_counter times `render_start`, `render_end` (last frame rendered),
    `written_end`, and `gpu_busy` (s), `batch_s` (seconds of each render call, in order), `max_held`,
    `bound`, `spilled`, `render_waits`, and the threads' seconds: `save_s`, `offer_wait_s` (the saver),
    `take_wait_s`, `load_s`, `write_s` (the writer; its `write` includes the sink's paste-back and encoding).
    """
    saved = set(saved)
    buffer_frames = buffer_frames or max(8, 4 * batch)
    stats = {} if stats is None else stats
    stats.update(gpu_busy=0.0, batch_s=[], max_held=0, bound=held_bound(batch, queue_batches, buffer_frames), spilled=0,
                 render_waits=0)
    crew = Crew()
    chan = Channel(crew, queue_batches)
    buf = ReorderBuffer(crew, buffer_frames, saved) if sink is not None else None
    count = {"held": 0, "written": written}

    def hold(k: int) -> None:
        with crew.cond:
            count["held"] += k
            stats["max_held"] = max(stats["max_held"], count["held"])

    # Where each thread's time goes (seconds; benchmarks): the saver saving and waiting for room
    # in the reorder buffer, the writer waiting for its next frame, reading frames back, writing.
    clock = dict(save_s=0.0, offer_wait_s=0.0, take_wait_s=0.0, load_s=0.0, write_s=0.0)

    savers = ThreadPoolExecutor(SAVE_THREADS, thread_name_prefix="retarget-save-png") if SAVE_THREADS > 1 else None

    def saver() -> None:
        while (item := chan.get()) is not None:
            idx, images = item
            t0 = time.perf_counter()
            if savers is None:
                for i, img in zip(idx, images):
                    save(i, img)
            else:  # the whole batch is saved before it is offered (spilled frames are read back)
                list(savers.map(save, idx, images))
            t1 = time.perf_counter()
            if buf is None or not buf.offer(idx, images):
                hold(-len(idx))
            clock["save_s"] += t1 - t0
            clock["offer_wait_s"] += time.perf_counter() - t1

    def writer() -> None:
        with sink as write:
            for i in range(written, n):
                t0 = time.perf_counter()
                image = buf.take(i)
                t1 = time.perf_counter()
                frame = load(i) if image is None else image
                t2 = time.perf_counter()
                write(i, frame)
                clock["take_wait_s"] += t1 - t0
                clock["load_s"] += t2 - t1
                clock["write_s"] += time.perf_counter() - t2
                with crew.cond:
                    count["written"] += 1
                    if image is not None:
                        count["held"] -= 1
        stats["written_end"] = time.perf_counter()

    crew.start("retarget-save", saver)
    if sink is not None:
        crew.start("retarget-write", writer)
    rendered, main_error = 0, None
    it = iter(batches) if batches is not None else None
    try:
        if it is not None:
            with (progress(n, "rendering", len(saved)) if progress else _NoBar()) as bar:
                stats["render_start"] = stats["render_end"] = time.perf_counter()
                while crew.error is None:
                    t = time.perf_counter()
                    try:
                        idx, images = next(it)
                    except StopIteration:  # not a render call: its time is not the GPU's (nor in `render_end`)
                        break
                    except BaseException:
                        stats["gpu_busy"] += time.perf_counter() - t
                        raise
                    stats["render_end"] = time.perf_counter()
                    took = stats["render_end"] - t
                    stats["gpu_busy"] += took
                    stats["batch_s"].append(took)
                    hold(len(idx))
                    chan.put((idx, images))
                    rendered += len(idx)
                    bar.update(len(idx))  # tqdm's own line (the app shows it): no postfix
        if sink is not None and crew.error is None:
            with (progress(n, "writing", count["written"]) if progress else _NoBar()) as bar:
                finished = False
                while not finished:
                    finished = crew.wait_for(lambda: crew.error is not None or count["written"] == n, timeout=0.5)
                    bar.update(count["written"] - bar.n)
    except BaseException as e:  # the renderer failed, or Ctrl-C: save what was rendered, drop the video
        main_error = e
        if buf is not None:
            buf.abandon()
    finally:
        if it is not None and hasattr(it, "close"):
            it.close()  # a generator renderer (Ray) cleans up now, not at garbage collection
        chan.close()
        crew.join()
        if savers is not None:
            savers.shutdown(wait=True)
        stats.update(spilled=buf.spilled if buf else 0, render_waits=chan.waits, **clock)
    if main_error is not None:
        raise main_error
    if crew.error is not None:
        raise crew.error
    return rendered


class EarlyWriter:
    """Frames written to the video while the job still tracks: the batches rendered ahead arrive
    in frame order from 0 (`offer`, from the rendering thread) and a thread writes them through
    the sink that `open_sink()` gives (opened at the first frame). After tracking the job either
    goes on with the same sink from frame `stop()` (`continued()` in `render_and_write`, then
    `close()`), or drops what was written (`abort()`: the sink ends with an error, its outputs vanish).

    At most `queue_batches` batches wait (`offer` blocks meanwhile: the writer is the limit then);
    the sink is used from one thread at a time (this one, then the job's writer thread).
    """

    def __init__(self, open_sink: Callable[[], AbstractContextManager], queue_batches: int = 2):
        self.open_sink = open_sink
        self.crew = Crew()
        self.chan = Channel(self.crew, queue_batches)
        self.stack = ExitStack()
        self.sink = None  # the open sink (its value is write(i, image))
        self.write: Callable[[int, np.ndarray], None] | None = None
        self.written = 0  # frames 0 .. written-1 went to the sink
        self.offered = 0  # the next frame `offer` takes
        self._stop = False

    def offer(self, idx: list[int], images) -> None:
        """A rendered batch (frame indices, (B, H, W, 3) uint8); batches out of order are not
        taken (those frames are written after tracking). Raises the writer's error, if any."""
        if self.crew.error is not None:
            raise self.crew.error
        if self._stop or not len(idx) or list(idx) != list(range(self.offered, self.offered + len(idx))):
            return
        if not self.crew.threads:
            self.crew.start("retarget-write-early", self._run)
        self.offered = idx[-1] + 1
        self.chan.put((idx, images))

    def _run(self) -> None:
        while (item := self.chan.get()) is not None:
            for i, image in zip(*item):
                if self._stop:
                    return
                if self.write is None:
                    self.sink = self.open_sink()
                    self.write = self.stack.enter_context(self.sink)
                self.write(i, image)
                with self.crew.cond:
                    self.written = i + 1
                    self.crew.cond.notify_all()  # for waiters on `written` (tests)

    def _halt(self) -> None:
        """The thread ends after the frame it is writing; queued batches are dropped."""
        with self.crew.cond:
            self._stop = True
        self.chan.close()
        self.crew.join()

    def stop(self) -> int:
        """Stop after the frame being written (queued ones are dropped: they are in the work
        folder); returns how many frames, from 0, the sink has had. Raises the writer's error."""
        self._halt()
        if self.crew.error is not None:
            raise self.crew.error
        return self.written

    def continued(self) -> AbstractContextManager:
        """The open sink for `render_and_write(..., written=stop())`: entering gives its write;
        leaving does nothing (the job calls `close` or `abort`)."""
        early = self

        class _Continued:
            def __enter__(self):
                return early.write

            def __exit__(self, *exc):
                return False

        return _Continued()

    def close(self) -> None:
        """The video is complete: the sink ends normally (its outputs are renamed into place)."""
        self.stack.close()

    def abort(self) -> None:
        """Drop what was written: the sink ends with an error (not raised here), so its outputs vanish."""
        self._halt()
        error = Stopped("the frames written while tracking were dropped")
        self.stack.__exit__(type(error), error, None)


class _NoBar:
    n = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, k: int) -> None:
        self.n += k


class Background:
    """`fn()` in a daemon thread, started now; `result()` waits and returns it (or raises its
    error). `cancel()`: nobody will ask for the result: the thread is not waited for and ends by
    itself when `fn` returns (a model load cannot be interrupted midway), dropping the result."""

    def __init__(self, fn: Callable[[], object], name: str):
        self._fn, self._value, self._error = fn, None, None
        self._cancelled = False
        self.seconds = 0.0
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t = time.perf_counter()
        self.started.set()
        try:
            self._value = self._fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._error = e
        self.seconds = time.perf_counter() - t
        if self._cancelled:
            self._value = self._error = None  # the models go with the thread

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        value, self._value = self._value, None
        return value

    @property
    def failed(self) -> bool:
        """`fn` ended with an error (result() raises it)."""
        return not self._thread.is_alive() and self._error is not None

    def wait(self, timeout: float | None = None) -> None:
        """Wait for `fn` to end (at most `timeout` s), without taking its result."""
        self._thread.join(timeout)

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class CallAfter:
    """A picklable factory: `factory()`, then (the first time, in this process only) `callback()`.
    For tracking's face-backend factory: the callback runs once the tracker has built its models."""

    def __init__(self, factory: Callable[[], object], callback: Callable[[], None] | None):
        self.factory, self.callback = factory, callback

    def __call__(self):
        value = self.factory()
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()
        return value

    def __getstate__(self):
        return {"factory": self.factory, "callback": None}  # worker processes only build backends
