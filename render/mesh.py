"""The FLAME head mesh, posed from a 55-d expression vector and drawn on the CPU for previews.

FLAME 2020 (`generic_model.pkl`) is registration-gated (flame.is.tue.mpg.de) and never
shipped with this project; it is only needed to draw the mesh. The file is a Python 2 pickle
whose arrays are partly chumpy objects. chumpy is not needed: a restricted unpickler maps its
classes to a stand-in that keeps the stored value (chumpy's `Ch.__getstate__` pickles the
instance `__dict__`, whose key `x` holds the ndarray) and lets numpy arrays and scipy sparse
matrices through; nothing else in the file can be instantiated.

Eyelids: SMIRK closes eyelids with two extra per-vertex blendshapes (`l_eyelid.npy`,
`r_eyelid.npy`, each (5023, 3), added after skinning with weights eyelids[0] and eyelids[1])
that FLAME 2020 does not ship. If they are given (or found next to the pkl) they are used;
otherwise the eyelid values are ignored and the mesh shows open eyes.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from render.errors import RetargetError

FLAME_SOURCE = "FLAME 2020 is registration-gated: download generic_model.pkl from https://flame.is.tue.mpg.de"

N_SHAPE = 300  # shapedirs columns 0..299 are identity shape, 300.. are expression
JAW_JOINT = 2  # FLAME joints: 0 global, 1 neck, 2 jaw, 3 left eye, 4 right eye


class _ChumpyStandIn:
    """Receives a pickled chumpy object's state; `value` is its array when it stored one."""

    def __setstate__(self, state):
        self.state = state

    @property
    def value(self) -> np.ndarray | None:
        state = getattr(self, "state", None)
        if isinstance(state, dict) and "x" in state:
            return np.asarray(state["x"])
        return None


class _FlameUnpickler(pickle.Unpickler):
    """Loads FLAME/SMPL-family pickles without chumpy and without executing anything else."""

    _ALLOWED = {
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("builtins", "bytearray"),
        # How protocol-2 pickles written by Python 3 store bytes (numpy's raw buffers).
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        # Python 2 names (copy_reg, __builtin__): the base class renames them only after
        # this override has been consulted, so do it here before checking the allow-list.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStandIn
        if module.startswith("numpy"):
            # Python 2 era pickles name numpy.core.*; numpy 2 moved it to numpy._core.
            if module.startswith("numpy.core"):
                module = "numpy._core" + module[len("numpy.core"):]
            if name in {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}:
                return super().find_class(module, name)
        if module.startswith("scipy.sparse") and name.endswith(("_matrix", "_array")):
            import scipy.sparse

            return getattr(scipy.sparse, name)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the pickle")


def _to_array(value, key: str, path: Path) -> np.ndarray:
    """A dense ndarray from a pickled field (ndarray, chumpy stand-in or scipy sparse)."""
    if isinstance(value, _ChumpyStandIn):
        array = value.value
        if array is None:
            raise RetargetError(f"{path}: field '{key}' is a chumpy expression, not stored values")
        return array
    if hasattr(value, "indptr") or hasattr(value, "row"):
        try:
            return np.asarray(value.toarray())
        except Exception:
            # Sparse matrices pickled by old scipy may lack attributes today's class expects;
            # the CSC/CSR triplet and the shape are all there is to it.
            d = value.__dict__
            import scipy.sparse

            shape = d.get("_shape", d.get("shape"))
            cls = scipy.sparse.csc_matrix if "csc" in type(value).__name__ else scipy.sparse.csr_matrix
            return cls((d["data"], d["indices"], d["indptr"]), shape=shape).toarray()
    return np.asarray(value)


@dataclass
class FlameModel:
    """FLAME arrays as float64/int numpy, ready for linear blend skinning.

    v_template (V, 3); shapedirs (V, 3, K) with K = 300 shape + n expression components;
    posedirs (V, 3, 9 * (J - 1)); J_regressor (J, V) dense; weights (V, J); parents (J,) with
    parents[0] = -1; faces (F, 3) int32; eyelids: optional (left, right) blendshapes (V, 3).
    Units are metres (FLAME's).
    """

    v_template: np.ndarray
    shapedirs: np.ndarray
    posedirs: np.ndarray
    J_regressor: np.ndarray
    weights: np.ndarray
    parents: np.ndarray
    faces: np.ndarray
    eyelids: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_expression(self) -> int:
        return self.shapedirs.shape[2] - N_SHAPE

    def vertices(
        self,
        expression: np.ndarray,
        jaw_pose: np.ndarray,
        shape: np.ndarray | None = None,
        eyelids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Posed vertices (V, 3) float64, metres, FLAME axes (x right, y up, z toward the viewer).

        expression: (n <= n_expression,) coefficients (SMIRK: 50). jaw_pose: (3,) axis-angle
        radians of the jaw joint. shape: optional (<= 300,) identity coefficients (default
        the mean head). eyelids: optional (2,) closure in [0, 1]; used only when the model
        has eyelid blendshapes. Global, neck and eye rotations are zero.
        """
        exp = np.asarray(expression, np.float64).ravel()
        if exp.size > self.n_expression:
            raise RetargetError(
                f"{exp.size} expression coefficients given, the FLAME model has {self.n_expression}"
            )
        jaw = np.asarray(jaw_pose, np.float64).ravel()
        if jaw.shape != (3,):
            raise RetargetError(f"jaw pose must have 3 values (axis-angle), got {jaw.size}")
        v = self.v_template + self.shapedirs[:, :, N_SHAPE:N_SHAPE + exp.size] @ exp
        if shape is not None:
            betas = np.asarray(shape, np.float64).ravel()
            if betas.size > N_SHAPE:
                raise RetargetError(f"{betas.size} shape coefficients given, FLAME has {N_SHAPE}")
            v = v + self.shapedirs[:, :, :betas.size] @ betas

        n_joints = len(self.parents)
        pose = np.zeros((n_joints, 3))
        pose[JAW_JOINT] = jaw
        rots = rodrigues(pose)
        joints = self.J_regressor @ v

        # Pose blend shapes: driven by (R - I) of every joint but the root, joint-major.
        feature = (rots[1:] - np.eye(3)).reshape(-1)
        v = v + self.posedirs @ feature

        # World transform of each joint along the kinematic tree, then remove the rest pose.
        world = np.zeros((n_joints, 4, 4))
        for j in range(n_joints):
            local = np.eye(4)
            local[:3, :3] = rots[j]
            parent = self.parents[j]
            local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0.0)
            world[j] = local if parent < 0 else world[parent] @ local
        skin = world.copy()
        skin[:, :3, 3] -= np.einsum("jab,jb->ja", world[:, :3, :3], joints)

        blend = np.einsum("vj,jab->vab", self.weights, skin[:, :3, :])
        v = np.einsum("vab,vb->va", blend[:, :, :3], v) + blend[:, :, 3]

        if eyelids is not None and self.eyelids is not None:
            lids = np.asarray(eyelids, np.float64).ravel()
            if lids.shape != (2,):
                raise RetargetError(f"eyelids must have 2 values, got {lids.size}")
            v = v + self.eyelids[0] * lids[0] + self.eyelids[1] * lids[1]
        return v


def rodrigues(axis_angle: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) from axis-angle vectors (N, 3) in radians."""
    aa = np.asarray(axis_angle, np.float64).reshape(-1, 3)
    angle = np.linalg.norm(aa, axis=1)
    axis = aa / np.maximum(angle, 1e-12)[:, None]
    x, y, z = axis.T
    zero = np.zeros_like(x)
    K = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], 1).reshape(-1, 3, 3)
    s = np.sin(angle)[:, None, None]
    c = np.cos(angle)[:, None, None]
    return np.eye(3) + s * K + (1.0 - c) * (K @ K)


_REQUIRED = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


def load_flame(path: str | Path, eyelids: tuple[np.ndarray, np.ndarray] | str | Path | None = None) -> FlameModel:
    """Read FLAME 2020 `generic_model.pkl` (no chumpy needed).

    eyelids: optional SMIRK eyelid blendshapes, either a (left, right) pair of (V, 3) arrays
    or a folder holding `l_eyelid.npy` and `r_eyelid.npy`; by default they are taken from the
    pkl's folder when both files are there. Raises RetargetError naming the file when it is
    missing, unreadable, or not a FLAME model.
    """
    path = Path(path)
    if not path.is_file():
        raise RetargetError(f"FLAME model not found: {path}. {FLAME_SOURCE}")
    try:
        with open(path, "rb") as fh:
            data = _FlameUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # any decoding failure means: not the file we expect
        raise RetargetError(
            f"{path} is not a readable FLAME 2020 model ({type(exc).__name__}: {exc}). {FLAME_SOURCE}"
        ) from None
    if not isinstance(data, dict):
        raise RetargetError(f"{path} is not a FLAME model (expected a dict of arrays). {FLAME_SOURCE}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise RetargetError(f"{path} is not a FLAME model: missing {', '.join(missing)}. {FLAME_SOURCE}")

    arr = {k: _to_array(data[k], k, path) for k in _REQUIRED}
    v_template = arr["v_template"].astype(np.float64)
    n_vertices = len(v_template)
    kintree = arr["kintree_table"].astype(np.int64)
    n_joints = kintree.shape[1] if kintree.ndim == 2 else -1
    expected = {
        "v_template": (n_vertices, 3),
        "weights": (n_vertices, n_joints),
        "J_regressor": (n_joints, n_vertices),
        "posedirs": (n_vertices, 3, 9 * (n_joints - 1)),
        "kintree_table": (2, n_joints),
    }
    for key, shape in expected.items():
        if arr[key].shape != shape:
            raise RetargetError(f"{path}: FLAME field '{key}' has shape {arr[key].shape}, expected {shape}")
    shapedirs = arr["shapedirs"].astype(np.float64)
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (n_vertices, 3) or shapedirs.shape[2] <= N_SHAPE:
        raise RetargetError(
            f"{path}: FLAME field 'shapedirs' has shape {shapedirs.shape}, "
            f"expected ({n_vertices}, 3, {N_SHAPE} shape + expression components)"
        )
    faces = arr["f"].astype(np.int64)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= n_vertices:
        raise RetargetError(f"{path}: FLAME field 'f' is not a (F, 3) triangle list of its vertices")
    if n_joints <= JAW_JOINT:
        raise RetargetError(f"{path}: FLAME model has {n_joints} joints, the jaw is joint {JAW_JOINT}")

    parents = kintree[0].copy()
    parents[0] = -1
    if any(not (-1 <= p < j) for j, p in enumerate(parents)):
        raise RetargetError(f"{path}: FLAME kinematic tree is not ordered parent-before-child")

    lids = _load_eyelids(eyelids, path.parent, n_vertices)
    return FlameModel(
        v_template=v_template,
        shapedirs=shapedirs,
        posedirs=arr["posedirs"].astype(np.float64),
        J_regressor=arr["J_regressor"].astype(np.float64),
        weights=arr["weights"].astype(np.float64),
        parents=parents,
        faces=faces.astype(np.int32),
        eyelids=lids,
    )


def _load_eyelids(eyelids, default_dir: Path, n_vertices: int):
    explicit = eyelids is not None
    if eyelids is None or isinstance(eyelids, (str, Path)):
        folder = default_dir if eyelids is None else Path(eyelids)
        files = [folder / "l_eyelid.npy", folder / "r_eyelid.npy"]
        if not all(f.is_file() for f in files):
            if explicit:
                raise RetargetError(f"eyelid blendshapes l_eyelid.npy and r_eyelid.npy not found in {folder}")
            return None
        try:
            eyelids = tuple(np.load(f, allow_pickle=False) for f in files)
        except Exception as exc:
            raise RetargetError(f"cannot read eyelid blendshapes in {folder}: {exc}") from None
    left, right = (np.asarray(e, np.float64).reshape(-1, 3) if np.size(e) == n_vertices * 3 else None for e in eyelids)
    if left is None or right is None:
        raise RetargetError(f"eyelid blendshapes must each be ({n_vertices}, 3)")
    return left, right


# --- drawing -------------------------------------------------------------------------------

_LIGHT = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])


def _yaw_matrix(yaw_deg: float) -> np.ndarray:
    a = np.deg2rad(yaw_deg)
    return np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    size: int = 512,
    *,
    yaw: float = 0.0,
    color: tuple[int, int, int] = (205, 200, 190),
    background: tuple[int, int, int] = (24, 24, 28),
    fit_to: np.ndarray | None = None,
    margin: float = 0.08,
) -> np.ndarray:
    """Draw a triangle mesh, shaded, as a (size, size, 3) uint8 RGB image.

    vertices: (V, 3) in FLAME axes (y up, z toward the viewer); faces: (F, 3) int indices.
    yaw: degrees of rotation about the vertical axis (positive turns the nose toward image-right).
    Orthographic projection scaled so that the bounds of `fit_to` (default: the vertices
    themselves; pass the template to keep the framing fixed across a video) fill the image
    minus `margin` on each side. Two-sided Lambert shading with a fixed light from the upper
    right front; triangles are painted back to front (painter's algorithm).
    """
    v = np.asarray(vertices, np.float64) @ _yaw_matrix(yaw).T
    f = np.asarray(faces, np.int64)
    ref = v if fit_to is None else np.asarray(fit_to, np.float64) @ _yaw_matrix(yaw).T
    lo, hi = ref[:, :2].min(0), ref[:, :2].max(0)
    extent = max(float((hi - lo).max()), 1e-9)
    scale = size * (1.0 - 2.0 * margin) / extent
    centre = (lo + hi) / 2.0
    # Image x to the right, image y downward: flip FLAME's y.
    px = (v[:, 0] - centre[0]) * scale + size / 2.0
    py = (centre[1] - v[:, 1]) * scale + size / 2.0

    tri = v[f]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    # Two-sided: FLAME's winding need not be trusted, and inner surfaces (mouth) still shade.
    shade = 0.25 + 0.75 * np.abs(normals @ _LIGHT)
    colors = np.clip(shade[:, None] * np.asarray(color, np.float64), 0, 255).astype(np.int64)

    order = np.argsort(tri[:, :, 2].mean(1), kind="stable")  # farthest (smallest z) first
    # 4 bits of sub-pixel precision so that neighbouring triangles meet without gaps.
    pts = np.stack([px, py], 1) * 16.0
    poly = np.rint(pts[f]).astype(np.int32)

    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    fill = cv2.fillConvexPoly
    for i in order.tolist():
        fill(image, poly[i], colors[i].tolist(), cv2.LINE_8, 4)
    return image


def params_to_mesh_image(flame: FlameModel, params55: np.ndarray, size: int = 512, *, yaw: float = 0.0) -> np.ndarray:
    """Draw the FLAME mesh for one 55-d vector (expression 50, eyelids 2, jaw 3; SPEC §3).

    Returns (size, size, 3) uint8 RGB. The framing is fixed by the template head (with room
    for an open jaw), so a sequence of frames does not zoom as the mouth opens.
    """
    p = np.asarray(params55, np.float64).ravel()
    if p.shape != (55,):
        raise RetargetError(f"expression vector must have 55 values, got {p.size}")
    v = flame.vertices(p[:50], p[52:55], eyelids=p[50:52])
    return render_mesh(v, flame.faces, size, yaw=yaw, fit_to=flame.v_template, margin=0.12)
