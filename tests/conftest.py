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
