"""Side-by-side preview frames."""

from __future__ import annotations

import numpy as np
import pytest

from render.errors import RetargetError
from render.preview import side_by_side


def solid(h, w, color):
    return np.full((h, w, 3), color, np.uint8)


def test_sizes_and_placement():
    a = solid(100, 100, (255, 0, 0))   # square
    b = solid(50, 150, (0, 255, 0))    # 3:1 wide
    c = np.full((80, 41), 200, np.uint8)  # grey, odd aspect
    out = side_by_side([a, b, c], 120, gap=6)
    w_a, w_b, w_c = 120, 360, round(41 * 120 / 80)
    assert out.dtype == np.uint8
    assert out.shape[0] == 120 and out.shape[1] % 2 == 0
    assert out.shape[1] in (w_a + w_b + w_c + 12, w_a + w_b + w_c + 13)
    np.testing.assert_array_equal(out[60, 60], (255, 0, 0))
    np.testing.assert_array_equal(out[60, w_a + 3], (0, 0, 0))  # the gap
    np.testing.assert_array_equal(out[60, w_a + 6 + 180], (0, 255, 0))
    np.testing.assert_array_equal(out[60, w_a + w_b + 12 + w_c // 2], (200, 200, 200))
    np.testing.assert_array_equal(out[:, w_a + w_b + w_c + 12:], 0)  # only padding after the last panel


def test_resize_keeps_content_position():
    # A bright dot in a panel's right-lower quarter stays there after resizing.
    p = np.zeros((200, 300, 3), np.uint8)
    p[140:160, 220:240] = 255
    out = side_by_side([p], 100)
    assert out.shape == (100, 150, 3)
    ys, xs = np.nonzero(out[..., 0] > 128)
    assert 70 <= ys.mean() <= 80 and 110 <= xs.mean() <= 120


def test_labels_drawn_over_panel_top():
    panels = [solid(64, 64, (90, 90, 90)), solid(64, 64, (90, 90, 90))]
    plain = side_by_side(panels, 128)
    labelled = side_by_side(panels, 128, ["driver", "result"])
    assert labelled.shape == plain.shape
    changed = (labelled != plain).any(-1)
    top = 12  # the label strip: max(height // 14, 12) rows
    assert changed[:top, :128].sum() > 50 and changed[:top, 136:].sum() > 50
    assert not changed[top:].any()  # below the strip the panels are untouched


def test_rgba_accepted_and_bad_input_rejected():
    rgba = np.zeros((10, 10, 4), np.uint8)
    assert side_by_side([rgba], 10).shape == (10, 10, 3)
    with pytest.raises(RetargetError, match="even"):
        side_by_side([rgba], 11)
    with pytest.raises(RetargetError, match="labels"):
        side_by_side([rgba], 10, ["a", "b"])
    with pytest.raises(RetargetError, match="uint8"):
        side_by_side([np.zeros((10, 10, 3), np.float32)], 10)
    with pytest.raises(RetargetError, match="panel"):
        side_by_side([], 10)
