"""tracking.track: the v1 track file round-trips exactly, is written atomically, and other
versions, shapes, missing fields and non-npz files are rejected with one clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest

from render.errors import RetargetError
from tracking.track import COLUMN_NAMES, FORMAT_VERSION, Track


def make_track(T: int = 12) -> Track:
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((T, 55)).astype(np.float32)
    valid = np.ones(T, bool)
    valid[[0, 4, 5, T - 1]] = False
    raw[~valid] = np.nan
    params = np.nan_to_num(raw) * 0.5
    times = np.arange(T) / 25.0
    times[6:] += 0.013  # irregular: a real timestamp must survive as it is
    return Track(raw=raw, params=params, valid=valid, times=times, fps=25.0, source="drive.mp4",
                 source_sha256="ab" * 32, backend="dlib", weights_id="SMIRK_em1.pt:sha256:0123456789abcdef",
                 smoothing={"method": "one_euro", "min_cutoff": 0.3, "beta": 2.0, "d_cutoff": 1.0})


def _rewrite(path, **changes):
    """Copy of a saved track with fields replaced (value None: field removed)."""
    with np.load(path) as d:
        fields = {k: d[k] for k in d.files}
    for k, v in changes.items():
        if v is None:
            fields.pop(k)
        else:
            fields[k] = v
    buf = io.BytesIO()
    np.savez(buf, **fields)
    path.write_bytes(buf.getvalue())


def test_round_trip_is_exact(tmp_path):
    track = make_track()
    path = track.save(tmp_path / "drive.track")  # no .npz suffix: the name is kept as given
    assert path.name == "drive.track" and sorted(p.name for p in tmp_path.iterdir()) == ["drive.track"]
    back = Track.load(path)
    for k in ("raw", "params", "valid", "times"):
        np.testing.assert_array_equal(getattr(back, k), getattr(track, k))
        assert getattr(back, k).dtype == getattr(track, k).dtype
    assert np.isnan(back.raw[0]).all() and back.raw.dtype == np.float32 and back.times.dtype == np.float64
    for k in ("fps", "source", "source_sha256", "backend", "weights_id", "smoothing", "version"):
        assert getattr(back, k) == getattr(track, k)
    assert back.version == FORMAT_VERSION == 1
    with np.load(path, allow_pickle=False) as d:  # plain arrays, no pickles
        assert int(d["format_version"]) == 1 and d["params"].shape == (12, 55)


def test_invalid_ranges_and_columns():
    track = make_track()
    assert track.invalid_ranges() == [(0, 0), (4, 5), (11, 11)] and track.n_invalid == 4
    assert len(COLUMN_NAMES) == 55 and COLUMN_NAMES[50] == "eyelid_l" and COLUMN_NAMES[-1] == "jaw_2"


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.npz"
    path.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        make_track().save(path)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]


@pytest.mark.parametrize("case,needle", [
    ("version", "version 2"),
    ("shape", "(12, 54)"),
    ("missing", "lacks times"),
    ("not_npz", "not a track file"),
    ("other_npz", "no format_version"),
    ("absent", "not found"),
    ("times", "non-decreasing"),
    ("raw_rows", "raw has shape"),
    ("dtype", "valid has dtype"),
])
def test_load_rejects_bad_files(case, needle, tmp_path):
    path = make_track().save(tmp_path / "t.npz")
    if case == "version":
        _rewrite(path, format_version=np.int64(2))
    elif case == "shape":
        _rewrite(path, params=np.zeros((12, 54), np.float32))
    elif case == "missing":
        _rewrite(path, times=None)
    elif case == "not_npz":
        path.write_text("time,exp_0\n0,1\n")
    elif case == "other_npz":
        with path.open("wb") as f:
            np.savez(f, a=np.zeros(3))
    elif case == "absent":
        path.unlink()
    elif case == "times":
        _rewrite(path, times=np.arange(12)[::-1] / 25.0)
    elif case == "raw_rows":
        _rewrite(path, raw=np.zeros((11, 55), np.float32))
    elif case == "dtype":
        _rewrite(path, valid=np.ones(12, np.int64))
    with pytest.raises(RetargetError) as e:
        Track.load(path)
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_construction_validates():
    t = make_track()
    with pytest.raises(RetargetError, match="params has shape"):
        Track(raw=t.raw[:, :50], params=t.params[:, :50], valid=t.valid, times=t.times, fps=25)
    with pytest.raises(RetargetError, match="fps"):
        Track(raw=t.raw, params=t.params, valid=t.valid, times=t.times, fps=0)
    bad = t.params.copy()
    bad[3, 3] = np.nan
    with pytest.raises(RetargetError, match="non-finite"):
        Track(raw=t.raw, params=bad, valid=t.valid, times=t.times, fps=25)


def test_csv_export(tmp_path):
    import csv

    from tracking.export import write_csv

    track = make_track()
    rows = list(csv.reader(write_csv(track, tmp_path / "t.csv").open()))
    assert rows[0][:5] == ["time", "frame", "valid", "exp_0", "exp_1"] and rows[0][-1] == "jaw_2"
    assert len(rows) == 13 and len(rows[0]) == 58
    got = np.array([[float(c) for c in r[3:]] for r in rows[1:]])
    np.testing.assert_allclose(got, track.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(r[0]) for r in rows[1:]], track.times, atol=1e-6)
    assert [int(r[2]) for r in rows[1:]] == track.valid.astype(int).tolist()
    both = list(csv.reader(write_csv(track, tmp_path / "b.csv", which="both").open()))
    assert both[0][58] == "raw_exp_0" and len(both[0]) == 113
    assert both[1][58] == "" and float(both[2][58]) == pytest.approx(float(track.raw[1, 0]), rel=1e-5)
    with pytest.raises(RetargetError, match="does not exist"):
        write_csv(track, tmp_path / "nope" / "t.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv", "t.csv"]


def test_plot_export(tmp_path):
    from PIL import Image

    from tracking.export import plot_track

    path = plot_track(make_track(), tmp_path / "t.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 500
        rgb = np.asarray(im.convert("RGB"))
    assert (np.abs(rgb.astype(int) - 217).max(axis=2) <= 2).sum() > 1000  # the shaded invalid spans (0.85 grey)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]
