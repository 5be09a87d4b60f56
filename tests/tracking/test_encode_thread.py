"""tracking.encode_thread: the encoder's calls on one long-lived thread in one batch shape (the
tracker's CUDA path), giving the rows of plain batches; checked on the CPU with the real encoder
architecture (random weights) and real face crops (the astronaut, tracked by dlib)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tracking.encode_thread import encode_batch, encode_pool, padded, warm_up
from tracking.tracker import _encode_subject, detect_stream

from .test_tracker import face_video, smirk_path  # noqa: F401  (module fixtures reused)

# float32 convolutions of another batch shape may pick another algorithm or blocking: rows move
# by rounding (~1e-6 relative on outputs of order 1); 1e-4 absolute leaves room for any CPU.
ATOL = 1e-4


class Recording:
    """An encoder that records each call's batch size and thread, then encodes for real."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []

    def encode(self, crops):
        self.calls.append((len(crops), threading.current_thread().name))
        return self.encoder.encode(crops)


@pytest.fixture(scope="module")
def encoder(smirk_path):  # noqa: F811
    from tracking.smirk import load_smirk_encoder

    return load_smirk_encoder(smirk_path)


def test_padded_repeats_the_last_crop():
    crops = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    out = padded(crops, 5)
    assert out.shape == (5, 2, 2, 3)
    assert np.array_equal(out[:3], crops) and np.array_equal(out[3], crops[2]) and np.array_equal(out[4], crops[2])
    assert padded(crops, 3) is crops and padded(crops, 2) is crops


def test_one_thread_for_every_call_and_warm_up_queues_on_it(encoder):
    names = [encode_pool().submit(lambda: threading.current_thread().ident).result() for _ in range(3)]
    assert len(set(names)) == 1 and names[0] != threading.current_thread().ident
    rec = Recording(encoder)
    warm_up(rec, 4).result()
    encode_batch(rec, np.zeros((2, 224, 224, 3), np.uint8), 4)
    assert rec.calls == [(4, rec.calls[0][1])] * 2 and rec.calls[0][1].startswith("smirk-encode")


def test_tracked_rows_in_one_shape_equal_plain_batches(face_video, encoder):  # noqa: F811
    """The whole tracker path: 24 frames (18 with a face) in batches of 8 (the last one short);
    one_shape pads every call to 8 on the encoder thread and gives the same rows."""
    from render.video import open_video
    from tracking.faces import make_face_backend

    backend = make_face_backend("dlib")
    frames = list(open_video(face_video).frames())
    results = {}
    for one_shape in (False, True):
        rec = Recording(encoder)
        stream = detect_stream(iter(frames), backend, redetect_every=10)
        times, rows, valid = _encode_subject(stream, rec, 8, lambda _: None, one_shape=one_shape)
        results[one_shape] = (np.stack(rows), np.array(valid), rec.calls)
    plain, fixed = results[False], results[True]
    assert np.array_equal(plain[1], fixed[1]) and plain[1].sum() >= 10
    sizes = [n for n, _ in plain[2]]
    assert sizes[-1] < 8, "the clip's last batch must be short for this test to mean something"
    assert all(n == 8 for n, _ in fixed[2]) and len(fixed[2]) == len(plain[2])
    assert all(name.startswith("smirk-encode") for _, name in fixed[2])
    assert all(not name.startswith("smirk-encode") for _, name in plain[2])
    ok = plain[1]
    np.testing.assert_allclose(fixed[0][ok], plain[0][ok], rtol=0, atol=ATOL)
    assert np.isnan(fixed[0][~ok]).all()
