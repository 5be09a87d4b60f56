"""FLAME loading without chumpy, linear blend skinning, and the CPU mesh renderer.

The real FLAME 2020 file is registration-gated, so the tests write a small model in the same
pickle layout: protocol 2, chumpy `Ch` objects (as chumpy pickles them: the instance dict with
the array under `x`) for the dense arrays, a scipy CSC matrix for the joint regressor.
"""

from __future__ import annotations

import pickle
import sys
import types

import cv2
import numpy as np
import pytest
import scipy.sparse

from render.errors import RetargetError
from render.mesh import load_flame, params_to_mesh_image, render_mesh, rodrigues

N_GRID = 24
N_EXP = 100  # as in FLAME 2020


def _grid_face():
    """A bulging square 'face' (0.2 m wide) facing +z: vertices (N*N, 3), triangles."""
    s = np.linspace(-0.1, 0.1, N_GRID)
    x, y = np.meshgrid(s, s[::-1])  # row 0 at the top (y = +0.1)
    r2 = (x**2 + y**2) / 0.02
    z = 0.05 * np.sqrt(np.clip(1.0 - r2 / 2.0, 0.0, None))
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    idx = np.arange(N_GRID * N_GRID).reshape(N_GRID, N_GRID)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    return verts, faces


def _synthetic_model(rng):
    verts, faces = _grid_face()
    V = len(verts)
    jaw = verts[:, 1] < -0.03
    weights = np.zeros((V, 5))
    weights[jaw, 2] = 1.0
    weights[~jaw, 1] = 1.0
    reg = np.zeros((5, V))
    reg[0] = reg[1] = 1.0 / V
    pivot = np.argsort(np.abs(verts[:, 1]) + np.abs(verts[:, 0]))[:4]  # jaw pivot near the middle
    reg[2, pivot] = 0.25
    reg[3, np.argmin(np.hypot(verts[:, 0] + 0.04, verts[:, 1] - 0.03))] = 1.0
    reg[4, np.argmin(np.hypot(verts[:, 0] - 0.04, verts[:, 1] - 0.03))] = 1.0
    shapedirs = rng.normal(0, 1e-3, (V, 3, 300 + N_EXP))
    posedirs = rng.normal(0, 1e-3, (V, 3, 36))
    posedirs[~jaw] = 0.0  # so that a jaw rotation leaves the upper face exactly in place
    return {
        "v_template": verts,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": scipy.sparse.csc_matrix(reg),
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.uint32),
        "f": faces.astype(np.uint32),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }, jaw


class _CallsGetcwd:
    """Unpickles by calling os.getcwd: harmless, but a loader must not call anything."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


class _FakeCh:
    """Stand-in for chumpy.ch.Ch at pickling time: pickles like chumpy (dict with 'x')."""

    def __init__(self, x):
        self.x = np.asarray(x, np.float64)

    def __getstate__(self):
        return {"x": self.x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {},
                "_make_dense": False, "_make_sparse": False}


class _FakeOp:
    """Stand-in for a chumpy expression (no stored value), like FLAME's pickled 'J'."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __getstate__(self):
        return {"a": self.a, "b": self.b, "_dirty_vars": set()}


def _write_chumpy_pickle(path, model):
    ch_mod = types.ModuleType("chumpy.ch")
    ops_mod = types.ModuleType("chumpy.ch_ops")
    _FakeCh.__module__, _FakeCh.__name__, _FakeCh.__qualname__ = "chumpy.ch", "Ch", "Ch"
    _FakeOp.__module__, _FakeOp.__name__, _FakeOp.__qualname__ = "chumpy.ch_ops", "dot", "dot"
    ch_mod.Ch, ops_mod.dot = _FakeCh, _FakeOp
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch", "chumpy.ch_ops")}
    sys.modules.update({"chumpy": types.ModuleType("chumpy"), "chumpy.ch": ch_mod, "chumpy.ch_ops": ops_mod})
    try:
        data = dict(model)
        for key in ("v_template", "shapedirs", "posedirs", "weights"):
            data[key] = _FakeCh(model[key])
        data["J"] = _FakeOp(_FakeCh(np.eye(2)), _FakeCh(np.ones(2)))
        raw = pickle.dumps(data, protocol=2)
        # Module names as a 2017-era Python 2 pickle has them (GLOBAL opcodes are text lines).
        raw = raw.replace(b"scipy.sparse._csc\n", b"scipy.sparse.csc\n")
        raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        path.write_bytes(raw)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture(scope="module")
def flame_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    model, jaw = _synthetic_model(rng)
    path = tmp_path_factory.mktemp("flame") / "generic_model.pkl"
    _write_chumpy_pickle(path, model)
    return path, model, jaw


def test_pickle_needs_our_unpickler(flame_file):
    path, _, _ = flame_file
    raw = path.read_bytes()
    assert b"chumpy.ch\nCh" in raw and b"scipy.sparse.csc\n" in raw and b"numpy.core.multiarray\n" in raw
    assert b"__builtin__\nset" in raw
    with pytest.raises(ModuleNotFoundError):
        with open(path, "rb") as fh:
            pickle.load(fh, encoding="latin1")


def test_load_fields(flame_file):
    path, model, _ = flame_file
    flame = load_flame(path)
    np.testing.assert_array_equal(flame.v_template, model["v_template"])
    np.testing.assert_array_equal(flame.shapedirs, model["shapedirs"])
    np.testing.assert_array_equal(flame.J_regressor, model["J_regressor"].toarray())
    np.testing.assert_array_equal(flame.parents, [-1, 0, 1, 1, 1])
    assert flame.faces.dtype == np.int32 and flame.n_expression == N_EXP
    assert flame.eyelids is None


def test_zero_params_give_template(flame_file):
    flame = load_flame(flame_file[0])
    np.testing.assert_allclose(flame.vertices(np.zeros(N_EXP), np.zeros(3)), flame.v_template, atol=1e-12)


def test_expression_coefficient_adds_its_blendshape(flame_file):
    path, model, _ = flame_file
    flame = load_flame(path)
    for k in (0, 7, N_EXP - 1):
        exp = np.zeros(N_EXP)
        exp[k] = 1.5
        got = flame.vertices(exp, np.zeros(3)) - flame.v_template
        np.testing.assert_allclose(got, 1.5 * model["shapedirs"][:, :, 300 + k], atol=1e-12)


def test_jaw_rotation_moves_only_jaw_vertices(flame_file):
    path, model, jaw = flame_file
    flame = load_flame(path)
    aa = np.array([0.3, 0.05, -0.02])
    got = flame.vertices(np.zeros(N_EXP), aa)
    np.testing.assert_allclose(got[~jaw], model["v_template"][~jaw], atol=1e-12)
    # Independent skinning of a vertex fully weighted to the jaw: rotate about the jaw joint
    # after adding the pose blend shape of (R_jaw - I).
    R = cv2.Rodrigues(aa)[0]
    feature = np.zeros((4, 3, 3))
    feature[1] = R - np.eye(3)  # joints 1..4; the jaw is the second of them
    offsets = model["posedirs"] @ feature.ravel()
    J2 = model["J_regressor"].toarray()[2] @ model["v_template"]
    expected = (model["v_template"][jaw] + offsets[jaw] - J2) @ R.T + J2
    np.testing.assert_allclose(got[jaw], expected, atol=1e-12)
    assert np.abs(got[jaw] - model["v_template"][jaw]).max() > 0.005


def test_rodrigues_matches_opencv():
    aa = np.random.default_rng(1).normal(0, 1, (6, 3))
    aa[0] = 0.0
    for a, R in zip(aa, rodrigues(aa)):
        np.testing.assert_allclose(R, cv2.Rodrigues(a)[0], atol=1e-12)


def test_eyelid_blendshapes_used_when_given(flame_file, tmp_path):
    path, model, _ = flame_file
    V = len(model["v_template"])
    rng = np.random.default_rng(2)
    left, right = rng.normal(0, 1e-3, (V, 3)), rng.normal(0, 1e-3, (V, 3))
    no_lids = load_flame(path)
    np.testing.assert_array_equal(
        no_lids.vertices(np.zeros(N_EXP), np.zeros(3), eyelids=[1.0, 0.5]), no_lids.v_template)
    with_lids = load_flame(path, eyelids=(left, right))
    got = with_lids.vertices(np.zeros(N_EXP), np.zeros(3), eyelids=[1.0, 0.5])
    np.testing.assert_allclose(got, model["v_template"] + left + 0.5 * right, atol=1e-12)
    np.save(tmp_path / "l_eyelid.npy", left)
    np.save(tmp_path / "r_eyelid.npy", right)
    from_dir = load_flame(path, eyelids=tmp_path)
    np.testing.assert_array_equal(from_dir.eyelids[0], left)
    with pytest.raises(RetargetError, match="eyelid"):
        load_flame(path, eyelids=tmp_path / "nowhere")


def test_bad_files_raise_retarget_error_naming_file(tmp_path, flame_file):
    missing = tmp_path / "generic_model.pkl"
    with pytest.raises(RetargetError, match="flame.is.tue.mpg.de") as err:
        load_flame(missing)
    assert str(missing) in str(err.value)

    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00garbage")
    with pytest.raises(RetargetError, match="flame.is.tue.mpg.de") as err:
        load_flame(corrupt)
    assert str(corrupt) in str(err.value)

    # A pickle that would run code is refused, not executed.
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"f": _CallsGetcwd()}, protocol=2))
    with pytest.raises(RetargetError, match="evil.pkl"):
        load_flame(evil)

    wrong = tmp_path / "wrong.pkl"
    _, model, _ = flame_file
    partial = {k: v for k, v in model.items() if k != "posedirs"}
    wrong.write_bytes(pickle.dumps(partial, protocol=2))
    with pytest.raises(RetargetError, match="posedirs"):
        load_flame(wrong)


def test_render_background_and_shading(flame_file):
    flame = load_flame(flame_file[0])
    bg = (10, 20, 30)
    img = render_mesh(flame.v_template, flame.faces, 128, background=bg, color=(200, 200, 200))
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    # The square face fills the frame minus the margin; the corners are background.
    np.testing.assert_array_equal(img[2, 2], bg)
    np.testing.assert_array_equal(img[125, 125], bg)
    inside = img[20:108, 20:108].reshape(-1, 3)
    assert not (inside == bg).all(-1).any()
    # Lambert: the bulge's centre faces the light more than its rim, so brightness varies.
    grey = inside[:, 0].astype(int)
    assert grey.max() - grey.min() > 20 and grey.max() <= 200
    turned = render_mesh(flame.v_template, flame.faces, 128, background=bg, yaw=40.0)
    assert (turned != img).any(-1).sum() > 500


def test_painter_draws_nearer_triangle_on_top():
    # Same footprint, different depth and tilt (so different shades): whatever the order of
    # the face list, the picture is the near triangle's.
    verts = np.array([
        [-1, -1, 0.0], [1, -1, 0.0], [0, 1, -1.0],     # far, tilted
        [-1, -1, 1.0], [1, -1, 1.0], [0, 1, 1.0],      # near, facing the viewer
    ])
    far_alone = render_mesh(verts, np.array([[0, 1, 2]]), 64, fit_to=verts)
    near_alone = render_mesh(verts, np.array([[3, 4, 5]]), 64, fit_to=verts)
    assert (far_alone != near_alone).any()  # the check below can fail
    for faces in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]):
        np.testing.assert_array_equal(render_mesh(verts, np.array(faces), 64), near_alone)


def test_params_to_mesh_image(flame_file):
    flame = load_flame(flame_file[0])
    neutral = params_to_mesh_image(flame, np.zeros(55), 96)
    params = np.zeros(55)
    params[52] = 0.4
    opened = params_to_mesh_image(flame, params, 96)
    assert neutral.shape == opened.shape == (96, 96, 3)
    diff = (neutral != opened).any(-1)
    # The jaw moves: the lower part of the image changes, the top rows do not.
    assert diff[60:].sum() > 50 and diff[:35].sum() == 0
    with pytest.raises(RetargetError, match="55"):
        params_to_mesh_image(flame, np.zeros(54), 96)
