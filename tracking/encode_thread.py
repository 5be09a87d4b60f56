"""SMIRK encoder calls on one long-lived thread, in batches of one shape.

Measured on an H200 (bench/run.py --track-probe, 2026-12-03): the first encoder call of a new
batch shape in a new thread took 1.7-3.2 s, the same call 0.06 s once that thread had made it.
PyTorch builds cuDNN's execution plans per convolution and input shape, and keeps them per
thread; `retarget run` tracks in a fresh thread each job, and a clip's last batch is shorter
than the others, so every job paid it twice (its first and its last batch), before and after
the frames could render. So, on CUDA, the tracker encodes on this module's one thread (its
plans outlive the job: the app, batch files and Ray workers pay once per process), pads a short
batch to the full batch size (one shape per process), and warms the plans with a batch of
zeros while its face-finding processes start, before the first crops exist.

Padding changes no row's value beyond float rounding: each crop is encoded alone (no batch
statistics: the encoder is in eval mode); a row differs from its unpadded value by the
convolution algorithm's rounding for another batch shape (float32, ~1e-6; tested).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def encode_pool() -> ThreadPoolExecutor:
    """The process's one encoder thread (started on first use, a daemon-like pool thread)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smirk-encode")
        return _pool


def padded(crops: np.ndarray, size: int) -> np.ndarray:
    """crops (n, H, W, 3) with n <= size -> (size, H, W, 3): the last crop repeated (a real face,
    so no special values reach the kernels); size <= n: crops unchanged."""
    n = len(crops)
    if n >= size or n == 0:
        return crops
    return np.concatenate([crops, np.repeat(crops[-1:], size - n, axis=0)])


def encode_batch(encoder, crops: np.ndarray, one_shape: int = 0) -> np.ndarray:
    """encoder.encode(crops) -> (n, 55) float32 for crops (n, 224, 224, 3) uint8. one_shape: 0,
    as they are in this thread (the CPU); else padded to that many rows (n <= one_shape) and
    encoded on the encoder thread, which the caller waits for (CUDA: one shape on one thread;
    errors, out-of-memory included, are raised here)."""
    if not one_shape:
        return encoder.encode(crops)
    return encode_pool().submit(encoder.encode, padded(crops, one_shape)).result()[:len(crops)]


def warm_up(encoder, batch: int, size: int = 224) -> Future:
    """Start encoding a batch of `batch` zero crops on the encoder thread (builds its cuDNN plans
    for that shape); returns the Future (its result is not needed: `encode_batch` calls queue
    behind it on the same thread)."""
    zeros = np.zeros((batch, size, size, 3), np.uint8)
    return encode_pool().submit(encoder.encode, zeros)
