"""Out of GPU memory: a batch is split in halves until it fits (run, retake, Ray workers share it)."""

from __future__ import annotations

import numpy as np
import pytest

from render.errors import RetargetError
from retarget.oom import split_on_oom


class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name is what is_oom looks for
    pass


def test_batches_halve_until_they_fit_and_keep_their_order():
    calls = []

    def render(idx):
        calls.append(list(idx))
        if len(idx) > 2:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [np.full((2, 2, 3), i, np.uint8) for i in idx]

    images = split_on_oom(render, [3, 4, 5, 6, 7])
    assert [int(im[0, 0, 0]) for im in images] == [3, 4, 5, 6, 7]
    assert calls == [[3, 4, 5, 6, 7], [3, 4], [5, 6, 7], [5], [6, 7]]


def test_one_frame_that_does_not_fit_is_one_clear_error():
    def render(idx):
        raise OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RetargetError, match="out of GPU memory even for one frame"):
        split_on_oom(render, [0, 1])


def test_other_errors_pass_through():
    def render(idx):
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        split_on_oom(render, [0, 1])


class _Memory:
    """A pretend GPU: `Block(n)` holds n frames' worth until it is garbage; a call that would hold
    more than `limit` raises OutOfMemoryError, as the CUDA allocator does."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def block(self, n: int):
        memory = self
        if self.held + n > self.limit:
            raise OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} frames")

        class Block:
            def __init__(self):
                memory.held += n

            def __del__(self):
                memory.held -= n

        return Block()


def test_a_failed_calls_memory_is_free_before_the_halves_are_tried():
    # The activations a failed call made are referenced from its traceback's frames: retrying while
    # that exception is still being handled keeps them, and every half then fails too (seen on the
    # H200: 32 -> 16 -> ... -> 1 frame, all out of memory, with room for 16).
    memory = _Memory(limit=10)

    def render(idx):
        activations = memory.block(len(idx) // 2)  # the first half of the call's working memory ...
        more = memory.block(len(idx) - len(idx) // 2)  # ... then the rest: a batch of 16 fails here
        del activations, more
        return [np.zeros((1, 1, 3), np.uint8) for _ in idx]

    images = split_on_oom(render, list(range(16)))
    assert len(images) == 16 and memory.held == 0


def test_after_the_fitting_size_shrinks_again_every_frame_is_rendered_once_in_order():
    # FitSize says 8; the first chunk of 8 then runs out of memory too (4 fit now). Every frame of
    # the batch must still come back, once, in order (the H200 check got 20 images for 32 frames:
    # the chunks' stride was kept while their length followed the new size).
    from retarget.oom import FitSize

    fit, calls = FitSize(frames=8), []

    def render(idx):
        calls.append(list(idx))
        if len(idx) > 4:
            raise OutOfMemoryError("CUDA out of memory")
        return [np.full((1, 1, 3), i, np.uint8) for i in idx]

    images = split_on_oom(render, list(range(64, 96)), fit)
    assert [int(im[0, 0, 0]) for im in images] == list(range(64, 96))
    assert fit.frames == 4 and calls[0] == list(range(64, 72))
