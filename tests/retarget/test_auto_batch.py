"""The automatic batch: sized from the GPU memory this process may use (a per-process cap
included), and an out-of-memory error in a job with the automatic batch halves it and goes on."""

from __future__ import annotations

import torch

import retarget.run as run_mod
from retarget.run import RunOptions, auto_batch, gpu_memory_left, run

GB = 10**9


class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name is what is_oom looks for
    pass


def fake_gpu(monkeypatch, *, total: float, free: float, allocated: float, fraction: float = 1.0):
    """torch.cuda's memory queries answering for a simulated card (bytes)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free), int(total)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: int(allocated))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda *a: fraction, raising=False)


def test_a_big_card_gives_the_largest_batch(monkeypatch):
    fake_gpu(monkeypatch, total=80 * GB, free=75 * GB, allocated=4.5 * GB)
    assert gpu_memory_left() == 75 * GB
    assert auto_batch("cuda", 512) == 32


def test_a_per_process_cap_gives_a_smaller_batch(monkeypatch):
    # An 80 GB card capped to 12 GB (set_per_process_memory_fraction(0.15)) with the models' 5 GB
    # allocated: mem_get_info still says 75 GB free; 7 GB are left, 3 GB above the 4 GB margin.
    fake_gpu(monkeypatch, total=80 * GB, free=75 * GB, allocated=5 * GB, fraction=0.15)
    assert gpu_memory_left() == 7 * GB
    assert auto_batch("cuda", 512) == 12
    assert auto_batch("cuda", 1024) == 3  # a frame of 4x the pixels costs 4x
    fake_gpu(monkeypatch, total=80 * GB, free=75 * GB, allocated=11.5 * GB, fraction=0.15)
    assert gpu_memory_left() == 0.5 * GB and auto_batch("cuda", 512) == 1  # never below one frame


def test_the_card_free_memory_still_counts_under_a_loose_cap(monkeypatch):
    # A 24 GB card that another process fills: the cap (all of it) is not what limits.
    fake_gpu(monkeypatch, total=24 * GB, free=6 * GB, allocated=1 * GB, fraction=0.99)
    assert gpu_memory_left() == 6 * GB
    assert auto_batch("cuda", 512) == 8


def test_cpu_batch_is_two():
    assert auto_batch("cpu", 512) == 2


def test_out_of_memory_with_the_automatic_batch_halves_it_and_goes_on(tiny_weights, tmp_path, monkeypatch,
                                                                      random_track_inputs):
    """A whole job (batch 0: automatic) on a simulated 12 GB-capped card whose automatic batch is 4:
    every pipeline call of more than 2 frames runs out of memory; the job still renders every frame."""
    from render.video import open_video
    from retarget.pipeline import RetargetPipeline

    frames, fps = 10, 25.0
    drive, actor, track = random_track_inputs(tmp_path, frames, fps, seed=0, scale=0.5)

    real_auto_batch = auto_batch
    chosen = []

    def capped_card_batch(device, image_size):  # the job runs on the CPU; its batch comes from the GPU rule
        fake_gpu(monkeypatch, total=80 * GB, free=75 * GB, allocated=0, fraction=0.0625)  # 5 GB: 1 GB over the margin
        chosen.append(real_auto_batch("cuda", 512))
        return chosen[-1]

    monkeypatch.setattr(run_mod, "auto_batch", capped_card_batch)
    sizes = []
    real_call = RetargetPipeline.__call__

    def call(self, actor_, expressions, *a, **kw):
        sizes.append(len(expressions))
        if len(expressions) > 2:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, actor_, expressions, *a, **kw)

    monkeypatch.setattr(RetargetPipeline, "__call__", call)
    opts = RunOptions(steps=1, batch=0, device="cpu", track=str(track))
    summary = run(drive, actor, tmp_path / "out.mp4", opts, weights=tiny_weights, log=lambda *_: None)
    assert chosen and chosen[0] == 4
    assert summary.frames == summary.rendered == frames
    assert sum(1 for _ in open_video(tmp_path / "out.mp4")) == frames
    assert max(sizes) == 4 and sizes.count(4) == 1  # the automatic batch was tried once ...
    assert sum(s for s in sizes if s <= 2) == frames  # ... and every frame rendered in halves
    assert sizes[1:] == [2] * (frames // 2)  # later batches went straight to the size that fitted
