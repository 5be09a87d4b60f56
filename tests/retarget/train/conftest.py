"""Fixtures for the training tests: the sample clip, a dataset built from it (through the CLI, with a corrupt
video among the sources), and a helper that runs short trainings on the tiny weights."""

from __future__ import annotations

import numpy as np
import pytest

SAMPLE_FPS = 5.0
CLIP_SECONDS = 2.0


@pytest.fixture(scope="session")
def sample_clip(tmp_path_factory):
    from retarget.samples import write_sample_drive

    return write_sample_drive(tmp_path_factory.mktemp("clip") / "drive.mp4", seconds=CLIP_SECONDS)


@pytest.fixture(scope="session")
def built(tmp_path_factory, sample_clip, tiny_weights):
    """(dataset folder, CLI exit code, CLI stdout): the sample clip plus a corrupt .mp4, through
    `retarget dataset build` at 5 frames per second."""
    import contextlib
    import io

    from retarget.cli import main

    root = tmp_path_factory.mktemp("ds")
    broken = root / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)))
    out = root / "data"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["dataset", "build", str(sample_clip), str(broken), "-o", str(out), "--weights", str(tiny_weights),
                     "--sample-fps", str(SAMPLE_FPS), "--device", "cpu"])
    return out, code, buf.getvalue()
