"""Hand-authored expression keyframes and smooth transitions between them.

Instead of tracking a driving video, a user may list a few expressions at given times; this
module turns that list into one 55-d vector per output frame (the same layout as a track:
FLAME expression 50 ++ eyelids 2 ++ jaw 3, SPEC.md §3 and §5).

Keyframe file format (JSON): a list of entries, or {"keyframes": [...]}. Each entry:

    {"time": 1.5,                      # seconds, >= 0, strictly increasing; required
     "preset": "jaw_open",             # optional starting values (see PRESETS), else neutral
     "expression": {"3": 1.5},         # optional: coefficient index (0-49) -> value,
                                       #   or a list of up to 50 leading coefficients
     "eyelids": [0.0, 1.0],            # optional: closure in [0, 1], one number sets both
     "jaw": 0.3}                       # optional: opening in radians (jaw[0], >= 0),
                                       #   or all 3 values [open, a, b] with |a|, |b| <= 0.2

Fields override the preset's values. The ranges are those the SMIRK encoder produces
(eyelids clamped to [0, 1], jaw[0] a ReLU, jaw[1:3] clamped to +-0.2), i.e. what the
Expression Adapter was trained on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from render.errors import RetargetError

N_PARAMS = 55
N_EXPRESSION = 50
EYELIDS = slice(50, 52)
JAW = slice(52, 55)
EASINGS = ("smoothstep", "linear", "cubic")
JAW_SIDE_LIMIT = 0.2  # SMIRK clamps jaw[1:3] to this


def _preset(*items: tuple[int, float]) -> np.ndarray:
    """A (55,) vector, zero except the given (index, value) pairs."""
    p = np.zeros(N_PARAMS, np.float64)
    for index, value in items:
        p[index] = value
    return p


# Only presets whose meaning follows from the parameter layout itself: the FLAME expression
# coefficients are PCA components without names, so no "smile" or "frown" here.
PRESETS: dict[str, np.ndarray] = {
    "neutral": _preset(),
    "jaw_open": _preset((52, 0.25)),
    "eyes_closed": _preset((50, 1.0), (51, 1.0)),
    "jaw_open_eyes_closed": _preset((52, 0.25), (50, 1.0), (51, 1.0)),
}


@dataclass(frozen=True)
class Keyframe:
    """One authored expression: time_s (seconds, >= 0), params (55,) float32, and hold_s
    (seconds >= 0): the expression stays exactly as it is from time_s to time_s + hold_s, and
    the transition to the next keyframe starts after the hold."""

    time_s: float
    params: np.ndarray
    hold_s: float = 0.0

    def __post_init__(self):
        t = float(self.time_s)
        if not math.isfinite(t) or t < 0:
            raise RetargetError(f"keyframe time must be a finite number of seconds >= 0, got {self.time_s}")
        h = float(self.hold_s)
        if not math.isfinite(h) or h < 0:
            raise RetargetError(f"keyframe at {t:g}s: hold must be a finite number of seconds >= 0, got {self.hold_s}")
        p = np.asarray(self.params, np.float64).ravel()
        if p.shape != (N_PARAMS,) or not np.isfinite(p).all():
            raise RetargetError(f"keyframe at {t:g}s: params must be {N_PARAMS} finite values, got shape {np.shape(self.params)}")
        object.__setattr__(self, "time_s", t)
        object.__setattr__(self, "hold_s", h)
        object.__setattr__(self, "params", p.astype(np.float32))


def _sorted_knots(keyframes: list[Keyframe]) -> tuple[np.ndarray, np.ndarray]:
    """Knot times and values; a keyframe with a hold gives two knots (start and end of the hold)."""
    if not keyframes:
        raise RetargetError("at least one keyframe is needed")
    ordered = sorted(keyframes, key=lambda k: k.time_s)
    times = np.array([k.time_s for k in ordered], np.float64)
    if np.any(np.diff(times) <= 0):
        dup = times[1:][np.diff(times) <= 0][0]
        raise RetargetError(f"two keyframes at the same time {dup:g}s")
    knots, values = [], []
    for i, k in enumerate(ordered):
        if i and k.time_s <= knots[-1]:
            prev = ordered[i - 1]
            raise RetargetError(f"the keyframe at {prev.time_s:g}s holds until {prev.time_s + prev.hold_s:g}s, "
                                f"past the next keyframe at {k.time_s:g}s")
        knots.append(k.time_s)
        values.append(k.params.astype(np.float64))
        if k.hold_s > 0:
            knots.append(k.time_s + k.hold_s)
            values.append(k.params.astype(np.float64))
    return np.array(knots, np.float64), np.stack(values)


def slerp_jaw(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Jaw poses between two axis-angle rotations: (3,), (3,), weights (T,) in [0, 1] -> (T, 3).

    The FLAME jaw pose is a rotation (axis-angle, radians), so it moves along the geodesic
    (scipy.spatial.transform.Slerp), not per component. w = 0 gives `a`, w = 1 gives `b` (up to
    the axis-angle round trip, ~1e-16); equal rotations give `a` exactly."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    w = np.asarray(w, np.float64)
    if np.array_equal(a, b):
        return np.repeat(a[None], len(w), axis=0)
    from scipy.spatial.transform import Rotation, Slerp

    return Slerp([0.0, 1.0], Rotation.from_rotvec(np.stack([a, b])))(np.clip(w, 0.0, 1.0)).as_rotvec()


def evaluate_keyframes(keyframes: list[Keyframe], times: np.ndarray, *, easing: str = "smoothstep") -> np.ndarray:
    """Expression vectors at the given times: (T,) seconds -> (T, 55) float32.

    Before the first and after the last keyframe (and through every keyframe's hold) the values
    hold. Expression and eyelids move per coefficient: "linear" at constant speed;
    "smoothstep" eases in and out of every keyframe (speed zero at each one, so each
    transition starts and ends gently); "cubic" passes through the keyframes without
    stopping, C1-continuous, using monotone piecewise-cubic Hermite interpolation (PCHIP),
    which never overshoots: each value stays between those of the neighbouring keyframes, so
    eyelids stay in [0, 1]. With two keyframes "cubic" is linear. The jaw (52:55) is a
    rotation and moves along the geodesic between keyframes (`slerp_jaw`), with the segment's
    progress eased the same way ("cubic": a PCHIP through the keyframe numbers). At keyframe
    times the keyframe's own values are returned exactly.
    """
    if easing not in EASINGS:
        raise RetargetError(f"unknown easing {easing!r}; choose one of {', '.join(EASINGS)}")
    knots, values = _sorted_knots(keyframes)
    t = np.asarray(times, np.float64).ravel()
    if not np.isfinite(t).all():
        raise RetargetError("keyframe evaluation times must be finite")
    if len(knots) == 1:
        return np.repeat(values.astype(np.float32), len(t), axis=0)
    tc = np.clip(t, knots[0], knots[-1])
    if easing == "cubic":
        from scipy.interpolate import PchipInterpolator

        out = PchipInterpolator(knots, values, axis=0, extrapolate=False)(tc)
        progress = PchipInterpolator(knots, np.arange(len(knots), dtype=np.float64), extrapolate=False)(tc)
        seg = np.clip(np.floor(progress).astype(int), 0, len(knots) - 2)
        w = np.clip(progress - seg, 0.0, 1.0)
    else:
        seg = np.clip(np.searchsorted(knots, tc, side="right") - 1, 0, len(knots) - 2)
        u = (tc - knots[seg]) / (knots[seg + 1] - knots[seg])
        w = u if easing == "linear" else u * u * (3.0 - 2.0 * u)
        # (1 - w) a + w b rather than a + w (b - a): exact at both ends of each segment.
        out = (1.0 - w)[:, None] * values[seg] + w[:, None] * values[seg + 1]
    for k in np.unique(seg):
        rows = seg == k
        out[rows, JAW] = slerp_jaw(values[k, JAW], values[k + 1, JAW], w[rows])
    hit = np.searchsorted(knots, tc)
    exact = (hit < len(knots)) & (knots[np.minimum(hit, len(knots) - 1)] == tc)
    out[exact] = values[hit[exact]]
    return out.astype(np.float32)


def interpolate_keyframes(
    keyframes: list[Keyframe],
    fps: float,
    *,
    easing: str = "smoothstep",
    duration: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample keyframes at a frame rate: returns (times (T,) float64 s, params (T, 55) float32).

    Frames are at i / fps from 0 up to `duration` seconds (default: the last keyframe's time,
    plus its hold), both ends included when they fall on a frame. See `evaluate_keyframes` for the easings.
    """
    fps = float(fps)
    if not math.isfinite(fps) or fps <= 0:
        raise RetargetError(f"fps must be a positive number, got {fps}")
    knots, _ = _sorted_knots(keyframes)
    end = knots[-1] if duration is None else float(duration)
    if not math.isfinite(end) or end < 0:
        raise RetargetError(f"duration must be a finite number of seconds >= 0, got {duration}")
    # The small slack keeps a frame that lands on `end` despite rounding (e.g. 2.0 s at 30 fps).
    count = int(math.floor(end * fps + 1e-6)) + 1
    times = np.arange(count, dtype=np.float64) / fps
    # Snap frames that land on a keyframe up to rounding onto it, so its values are exact.
    near = np.abs(times[:, None] - knots[None, :]) < 1e-9
    rows, cols = np.nonzero(near)
    times[rows] = knots[cols]
    return times, evaluate_keyframes(keyframes, times, easing=easing)


# --- the keyframe file -------------------------------------------------------------------

_FIELDS = ("time", "preset", "expression", "eyelids", "jaw")


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RetargetError(f"{where} must be a finite number, got {value!r}")
    return float(value)


NUMBER_FIELDS = ("expression", "eyelids", "jaw")


def apply_numbers(base: np.ndarray, entry: dict, where: str) -> np.ndarray:
    """`base` (55,) with the number fields of `entry` ("expression", "eyelids", "jaw", in the
    keyframe file's format above) written over it; other keys are ignored. Returns a new
    float64 (55,) array; RetargetError naming `where` for malformed or out-of-range values."""
    params = np.array(base, np.float64).reshape(N_PARAMS)
    if "expression" in entry:
        exp = entry["expression"]
        if isinstance(exp, dict):
            for key, value in exp.items():
                try:
                    index = int(key)
                except (TypeError, ValueError):
                    index = -1
                if str(index) != str(key).strip() or not 0 <= index < N_EXPRESSION:
                    raise RetargetError(f"{where}: expression index {key!r} is not an integer 0-{N_EXPRESSION - 1}")
                params[index] = _number(value, f"{where} expression[{index}]")
        elif isinstance(exp, list):
            if len(exp) > N_EXPRESSION:
                raise RetargetError(f"{where}: {len(exp)} expression values given, at most {N_EXPRESSION}")
            for index, value in enumerate(exp):
                params[index] = _number(value, f"{where} expression[{index}]")
        else:
            raise RetargetError(f"{where}: expression must be {{\"index\": value}} or a list of values")

    if "eyelids" in entry:
        lids = entry["eyelids"]
        lids = [lids, lids] if not isinstance(lids, list) else lids
        if len(lids) != 2:
            raise RetargetError(f"{where}: eyelids must be one number or [left, right]")
        for i, value in enumerate(lids):
            v = _number(value, f"{where} eyelids[{i}]")
            if not 0.0 <= v <= 1.0:
                raise RetargetError(f"{where}: eyelid closure must be in [0, 1], got {v:g}")
            params[EYELIDS.start + i] = v

    if "jaw" in entry:
        jaw = entry["jaw"]
        if isinstance(jaw, list):
            if len(jaw) != 3:
                raise RetargetError(f"{where}: jaw must be one number (opening) or 3 values")
            values = [_number(v, f"{where} jaw[{i}]") for i, v in enumerate(jaw)]
        else:
            values = [_number(jaw, f"{where} jaw"), *params[JAW][1:]]
        if values[0] < 0:
            raise RetargetError(f"{where}: jaw opening must be >= 0 radians, got {values[0]:g}")
        if max(abs(values[1]), abs(values[2])) > JAW_SIDE_LIMIT:
            raise RetargetError(f"{where}: jaw[1] and jaw[2] must be within +-{JAW_SIDE_LIMIT}")
        params[JAW] = values
    return params


def _parse_entry(entry, where: str) -> Keyframe:
    if not isinstance(entry, dict):
        raise RetargetError(f"{where} must be an object like {{\"time\": 0.0, \"preset\": \"neutral\"}}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise RetargetError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    if "time" not in entry:
        raise RetargetError(f"{where}: missing \"time\" (seconds)")
    time_s = _number(entry["time"], f"{where} time")
    if time_s < 0:
        raise RetargetError(f"{where}: time must be >= 0 seconds, got {time_s:g}")

    preset = entry.get("preset", "neutral")
    if preset not in PRESETS:
        raise RetargetError(f"{where}: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    params = apply_numbers(PRESETS[preset], entry, where)
    return Keyframe(time_s, params)


def parse_keyframes(spec: str | Path) -> list[Keyframe]:
    """Read keyframes from a JSON file path, or from JSON text (a string starting with [ or {).

    Returns keyframes in time order. Raises RetargetError naming the file (or "keyframes
    text") and the entry at fault for unreadable files, bad JSON, unknown fields or presets,
    out-of-range values, and times that do not strictly increase.
    """
    if isinstance(spec, str) and spec.lstrip()[:1] in ("[", "{"):
        name, text = "keyframes text", spec
    else:
        path = Path(spec)
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RetargetError(f"keyframe file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RetargetError(f"cannot read keyframe file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RetargetError(f"{name}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if isinstance(data, dict):
        extra = sorted(set(data) - {"keyframes"})
        if extra or "keyframes" not in data:
            raise RetargetError(f"{name}: expected a list of keyframes or {{\"keyframes\": [...]}}")
        data = data["keyframes"]
    if not isinstance(data, list) or not data:
        raise RetargetError(f"{name}: expected a non-empty list of keyframes")
    keyframes = [_parse_entry(entry, f"{name}: keyframe {i}") for i, entry in enumerate(data)]
    for i in range(1, len(keyframes)):
        if keyframes[i].time_s <= keyframes[i - 1].time_s:
            raise RetargetError(
                f"{name}: keyframe {i} (time {keyframes[i].time_s:g}s) is not after keyframe {i - 1} "
                f"(time {keyframes[i - 1].time_s:g}s); times must strictly increase"
            )
    return keyframes
