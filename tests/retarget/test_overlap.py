"""retarget.overlap on stand-in frames (no models): frame order, the memory bound, errors and threads."""

from __future__ import annotations

import random
import threading
from contextlib import contextmanager

import numpy as np
import pytest

from render.errors import DiskFullError, RetargetError
from retarget.overlap import Background, EarlyWriter, held_bound, render_and_write


def _image(i: int) -> np.ndarray:
    return np.full((4, 4, 3), i % 251, np.uint8)


def _batches(n: int, b: int, order=None, asked=None):
    """Yield (indices, images) per batch of `b`, in `order` (batch numbers; default in order);
    `asked(k)` is called as the k-th batch (1-based) is asked for."""
    starts = list(range(0, n, b))
    for k, j in enumerate(order if order is not None else range(len(starts)), 1):
        if asked:
            asked(k)
        idx = list(range(starts[j], min(n, starts[j] + b)))
        yield idx, np.stack([_image(i) for i in idx])


class _Store:
    """The work folder: save/load by index, optionally failing on one frame."""

    def __init__(self, fail_at: int | None = None):
        self.frames: dict[int, np.ndarray] = {}
        self.fail_at = fail_at

    def save(self, i, img):
        if i == self.fail_at:
            raise DiskFullError(f"disk full while writing {i:06d}.png")
        self.frames[i] = img.copy()

    def load(self, i):
        return self.frames[i]


class _Sink:
    """The writer stage: records frames in the order written and how its `with` ended."""

    def __init__(self, fail_at: int | None = None, before=None):
        self.written: list[tuple[int, int]] = []
        self.exit = "not entered"
        self.fail_at, self.before = fail_at, before

    @contextmanager
    def open(self):
        self.exit = "open"
        try:
            yield self.write
        except BaseException as e:
            self.exit = type(e).__name__
            raise
        self.exit = "ok"

    def write(self, i, img):
        if self.before:
            self.before(i)
        if i == self.fail_at:
            raise RetargetError(f"paste-back failed on frame {i}")
        self.written.append((i, int(img[0, 0, 0])))


def _our_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("retarget-")]


@pytest.mark.parametrize("n,b", [(10, 3), (17, 4), (5, 8)])
def test_in_order_and_out_of_order_batches_write_every_frame_in_order(n, b):
    for order in (None, random.Random(n).sample(range(-(-n // b)), -(-n // b))):
        store, sink, stats = _Store(), _Sink(), {}
        rendered = render_and_write(_batches(n, b, order), n, save=store.save, load=store.load, sink=sink.open(),
                                    batch=b, buffer_frames=b, stats=stats)
        assert rendered == n and sink.exit == "ok"
        assert sink.written == [(i, i % 251) for i in range(n)]
        assert sorted(store.frames) == list(range(n))
        assert stats["max_held"] <= stats["bound"]
    assert not _our_threads()


def test_resumed_frames_are_read_back_from_the_work_folder():
    n, b = 12, 4
    store = _Store()
    for i in range(4, 8):  # the second batch was rendered by an earlier run
        store.frames[i] = _image(i)
    sink = _Sink()
    rendered = render_and_write(_batches(n, b, order=[2, 0]), n, save=store.save, load=store.load,
                                sink=sink.open(), saved=range(4, 8), batch=b)
    assert rendered == 8 and sink.written == [(i, i % 251) for i in range(n)]


def test_a_batch_too_early_for_a_full_buffer_is_read_back_not_kept():
    """The last batch arrives first, then the others in reverse: with room for one batch, the
    writer waits for frame 0 while the buffer is full: later batches spill to the work folder."""
    n, b = 16, 4
    store, sink, stats = _Store(), _Sink(), {}
    render_and_write(_batches(n, b, order=[3, 2, 1, 0]), n, save=store.save, load=store.load, sink=sink.open(),
                     batch=b, buffer_frames=b, stats=stats)
    assert sink.written == [(i, i % 251) for i in range(n)]
    assert stats["spilled"] >= b and stats["max_held"] <= stats["bound"]


def test_a_slow_writer_blocks_rendering_within_the_bound():
    """The writer stops at frame 0 until the renderer is asked for the first batch that cannot
    fit anywhere (buffer, saver, queue, its own hands): it must then be blocked, holding at most
    the bound; no timing involved."""
    n, b, q, cap = 60, 2, 2, 8
    full = threading.Event()
    asked: list[int] = []

    def on_asked(k):
        asked.append(k)
        if k == cap // b + q + 2:
            full.set()

    def before(i):
        if i == 0:
            assert full.wait(30)

    store, sink, stats = _Store(), _Sink(before=before), {}
    render_and_write(_batches(n, b, asked=on_asked), n, save=store.save, load=store.load, sink=sink.open(),
                     batch=b, queue_batches=q, buffer_frames=cap, stats=stats)
    assert stats["bound"] == held_bound(b, q, cap) == (q + 2) * b + cap + 1
    assert stats["render_waits"] >= 1  # rendering did block
    assert held_bound(b, q, cap) - b - 1 <= stats["max_held"] <= stats["bound"]
    assert sink.written == [(i, i % 251) for i in range(n)]


def test_writer_error_is_raised_once_and_everything_stops():
    n, b = 40, 4
    store, sink = _Store(), _Sink(fail_at=6)
    with pytest.raises(RetargetError, match="paste-back failed on frame 6"):
        render_and_write(_batches(n, b), n, save=store.save, load=store.load, sink=sink.open(), batch=b)
    assert sink.exit == "RetargetError"  # VideoWriter's `with` ends with the error: its temp file goes
    assert [i for i, _ in sink.written] == list(range(6))
    assert not _our_threads()
    # What was rendered is saved (--resume), in whole batches from the start.
    assert sorted(store.frames) == list(range(len(store.frames))) and len(store.frames) >= 8


def test_disk_full_in_the_saver_stops_the_writer_and_keeps_the_frames_before():
    n, b = 40, 4
    store, sink = _Store(fail_at=9), _Sink()
    with pytest.raises(DiskFullError, match="000009.png"):
        render_and_write(_batches(n, b), n, save=store.save, load=store.load, sink=sink.open(), batch=b)
    assert sink.exit == "Stopped"
    # Every frame before the failed one is kept; frame 9's batch-mates may be saved too (a batch's
    # PNGs are written in parallel), no later batch is.
    assert set(range(9)) <= set(store.frames) <= set(range(12)) and 9 not in store.frames
    assert not _our_threads()


def test_renderer_error_saves_what_was_rendered_and_drops_the_video():
    n, b = 40, 4

    def dying():
        for k, item in enumerate(_batches(n, b)):
            if k == 3:
                raise RuntimeError("CUDA error: device lost")
            yield item

    store, sink = _Store(), _Sink(before=lambda i: threading.Event().wait(0.01))
    with pytest.raises(RuntimeError, match="device lost"):
        render_and_write(dying(), n, save=store.save, load=store.load, sink=sink.open(), batch=b)
    assert sorted(store.frames) == list(range(12))  # three batches rendered, three saved
    assert sink.exit == "Stopped" and len(sink.written) < n
    assert not _our_threads()


def test_background_result_error_and_cancel():
    assert Background(lambda: 7, "retarget-test").result() == 7
    with pytest.raises(RetargetError, match="missing"):
        Background(lambda: (_ for _ in ()).throw(RetargetError("missing file")), "retarget-test").result()
    gate = threading.Event()
    bg = Background(lambda: gate.wait(30) and object(), "retarget-test")
    bg.cancel()  # returns at once: the thread ends by itself when its work returns
    assert bg.alive
    gate.set()
    bg._thread.join(30)
    assert not bg.alive and bg._value is None


def test_a_batchs_pngs_are_saved_in_parallel_before_the_batch_is_offered(monkeypatch):
    """With SAVE_THREADS > 1 the saves of one batch overlap (a barrier of 2 saves only passes when two
    run at once) and every frame is saved and written in order; with 1 thread they run one by one."""
    from retarget import overlap

    monkeypatch.setattr(overlap, "SAVE_THREADS", 2)
    barrier = threading.Barrier(2, timeout=10)
    store, sink = _Store(), _Sink()
    threads = set()

    def save(i, img):
        threads.add(threading.current_thread().name)
        if i < 2:
            barrier.wait()  # frames 0 and 1 (one batch): a serial saver would wait here forever
        store.save(i, img)

    render_and_write(_batches(8, 2), 8, save=save, load=store.load, sink=sink.open(), batch=2)
    assert sorted(store.frames) == list(range(8)) and [i for i, _ in sink.written] == list(range(8))
    assert len(threads) == 2 and all(t.startswith("retarget-save-png") for t in threads)
    assert not _our_threads()


@pytest.mark.parametrize("stop_after", [1, 5, 9])
def test_a_video_started_early_goes_on_from_the_frame_it_reached(stop_after):
    # The early writer stops wherever it is when tracking ends; the job's writer goes on from there:
    # every frame once, in order, through the one sink, which ends normally only at close().
    n, b = 14, 4
    sink, store = _Sink(), _Store()
    reached = threading.Event()
    sink.before = lambda i: reached.set() if i == stop_after - 1 else None
    early = EarlyWriter(sink.open)
    early.offer([4, 5, 6, 7], np.stack([_image(i) for i in range(4, 8)]))  # not from frame 0: not taken
    for idx, images in _batches(12, b):  # the batches rendered ahead, in order
        for i, img in zip(idx, images):
            store.save(i, img)
        early.offer(idx, images)
        if idx[-1] >= stop_after - 1:
            break
    assert reached.wait(10)
    written = early.stop()
    assert stop_after <= written <= 12 and sink.exit == "open"
    rest = _batches(n, b, order=[j for j in range(4) if j * b + b > written])  # the job renders the rest
    todo = [(idx, im) for idx, im in rest if not all(i in store.frames for i in idx)]
    render_and_write(iter(todo), n, save=store.save, load=store.load, sink=early.continued(),
                     saved=set(store.frames), batch=b, written=written)
    assert sink.exit == "open"  # the job closes it, not render_and_write
    early.close()
    assert sink.exit == "ok"
    assert sink.written == [(i, i % 251) for i in range(n)]
    assert not [t for t in _our_threads() if t.startswith("retarget-write")]


def test_an_early_video_dropped_or_broken_ends_with_an_error():
    sink = _Sink()
    early = EarlyWriter(sink.open)
    early.offer([0, 1], np.stack([_image(0), _image(1)]))
    assert early.crew.wait_for(lambda: early.written == 2, timeout=10)
    assert early.stop() == 2
    early.abort()  # its frames' params changed: the sink ends with an error (VideoWriter deletes its file)
    assert sink.exit == "Stopped" and sink.written == [(0, 0), (1, 1)]
    broken = EarlyWriter(_Sink(fail_at=1).open)
    broken.offer([0, 1, 2], np.stack([_image(i) for i in range(3)]))
    assert broken.crew.wait_for(lambda: broken.crew.error is not None, timeout=10)
    with pytest.raises(RetargetError, match="frame 1"):
        broken.stop()
    with pytest.raises(RetargetError, match="frame 1"):  # and the next batch of the renderer stops the job
        broken.offer([3], _image(3)[None])
    broken.abort()
