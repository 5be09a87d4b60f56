"""Shared fixtures: a real face photo and a tiny weight set in the release layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    """scikit-image's astronaut.png (public domain, NASA): 512x512x3 uint8 RGB, one face."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A complete tiny random weight set written once per test session (release layout)."""
    from retarget.tiny import write_tiny_weights

    root = tmp_path_factory.mktemp("tiny_weights")
    write_tiny_weights(root)
    return root


@pytest.fixture(scope="session", autouse=True)
def _no_local_sd15(tmp_path_factory):
    """Tests never see this machine's Hugging Face cache or $RETARGET_SD15: a folder that lacks
    the SD 1.5 parts must read as missing whatever the developer has downloaded."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
    mp.delenv("RETARGET_SD15", raising=False)
    yield
    mp.undo()
