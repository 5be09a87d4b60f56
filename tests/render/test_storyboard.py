"""Storyboard contact sheets and atomic image writes."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from render.errors import RetargetError
from render.storyboard import cell_layout, save_image, storyboard

WHITE = (255, 255, 255)


def test_grid_geometry_and_placement():
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    images = [np.full((40, 40, 3), c, np.uint8) for c in colors]
    cell = 64
    sheet = storyboard(images, [""] * 5, columns=3, cell=cell)
    gap, label_h, _ = cell_layout(cell)
    width = gap + 3 * (cell + gap)
    height = gap + 2 * (cell + label_h + gap)
    assert sheet.shape == (height + height % 2, width + width % 2, 3)
    assert sheet.shape[0] % 2 == 0 and sheet.shape[1] % 2 == 0
    for i, color in enumerate(colors):
        r, c = divmod(i, 3)
        x = gap + c * (cell + gap)
        y = gap + r * (cell + label_h + gap)
        np.testing.assert_array_equal(sheet[y + cell // 2, x + cell // 2], color)
        np.testing.assert_array_equal(sheet[y + 1, x + 1], color)  # square image fills the cell
    # Sixth slot is empty background.
    x, y = gap + 2 * (cell + gap), gap + (cell + label_h + gap)
    assert (sheet[y:y + cell, x:x + cell] == 255).all()


def test_aspect_kept_letterboxed():
    wide = np.full((20, 80, 3), 0, np.uint8)
    sheet = storyboard([wide], ["x"], cell=64)
    gap, _, _ = cell_layout(64)
    cell_px = sheet[gap:gap + 64, gap:gap + 64]
    dark_rows = (cell_px == 0).all(-1).all(-1)
    assert dark_rows.sum() == 16 and dark_rows[24:40].all()


def test_labels_and_title_drawn():
    images = [np.full((32, 32, 3), 128, np.uint8)] * 3
    cell = 96
    sheet = storyboard(images, ["neutral", "jaw 0.3", "blink"], columns=3, cell=cell, title="Take 1")
    gap, label_h, title_h = cell_layout(cell)
    for c in range(3):
        x = gap + c * (cell + gap)
        y = title_h + gap + cell
        strip = sheet[y:y + label_h, x:x + cell]
        assert (strip != WHITE).any(-1).sum() > 30, f"label {c} missing"
    title_bar = sheet[:title_h]
    bar_color = title_bar[1, 1]
    assert (title_bar != bar_color).any(-1).sum() > 30
    untitled = storyboard(images, ["", "", ""], columns=3, cell=cell)
    # Empty labels leave the strip blank.
    y = gap + cell
    assert (untitled[y:y + label_h] == 255).all()


def test_bad_storyboard_inputs():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(RetargetError, match="labels"):
        storyboard([img, img], ["one"])
    with pytest.raises(RetargetError, match="at least one"):
        storyboard([], [])


def test_save_png_and_jpeg_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    png = save_image(tmp_path / "a.png", img)
    back = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, img)
    smooth = np.zeros((64, 64, 3), np.uint8)
    smooth[..., 0] = 200
    jpg = save_image(tmp_path / "b.JPG", smooth)
    back = cv2.cvtColor(cv2.imread(str(jpg)), cv2.COLOR_BGR2RGB).astype(int)
    assert np.abs(back - smooth).max() <= 3  # red really in the R channel after the round trip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.JPG"]


def test_save_is_atomic_and_does_not_clobber(tmp_path, monkeypatch):
    target = tmp_path / "sheet.png"
    target.write_bytes(b"previous content")
    with pytest.raises(RetargetError):
        save_image(target, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(RetargetError, match="png"):
        save_image(tmp_path / "sheet.bmp", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(RetargetError, match="does not exist"):
        save_image(tmp_path / "nowhere" / "x.png", np.zeros((4, 4, 3), np.uint8))

    # Failure after the bytes are written (the rename): old file intact, temp file removed.
    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(RetargetError, match="sheet.png"):
        save_image(target, np.zeros((4, 4, 3), np.uint8))
    monkeypatch.undo()
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]

    save_image(target, np.zeros((4, 4, 3), np.uint8))
    assert target.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]
