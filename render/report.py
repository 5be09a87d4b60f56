"""The evaluation report: PNG plots of every per-frame curve, strips of frames (driving |
output) at the worst and best moments, and one self-contained HTML page embedding them.

Takes plain data (the metrics dict, per-frame arrays, frames) so that it stays free of
`retarget`; `retarget.evaluate` computes, this module draws.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from render.files import atomic_open

THRESHOLD_COLOUR = "#c0392b"
PLOT_FILES = {"identity.png", "geometry.png", "lmd.png", "smirk.png", "smirk_error.png", "pose.png", "flicker.png",
              "strip_identity.png", "strip_expression.png", "strip_no_face.png"}


def _figure(rows: int, cols: int = 1, height: float = 2.2):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(9, height * rows), squeeze=False, sharex=True)
    return plt, fig, axes.ravel()


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _line(ax, t, y, label, **kw):
    y = np.asarray(y, np.float64)
    if np.isfinite(y).any():
        ax.plot(t, y, label=label, lw=1.2, **kw)


def _shade_missing(ax, t, present):
    """Grey bands where the output had no face."""
    missing = ~np.asarray(present, bool)
    for i in np.flatnonzero(missing):
        lo = t[i - 1] if i > 0 else t[i]
        hi = t[i + 1] if i + 1 < len(t) else t[i]
        ax.axvspan((lo + t[i]) / 2, (t[i] + hi) / 2, color="0.85", lw=0)


def plot_identity(pf: dict, threshold: float) -> bytes:
    """Identity distance per output frame (dlib), the same-person threshold, and the driver's own
    distance; ArcFace cosine below it when present."""
    has_arc = np.isfinite(pf["arcface_cosine"]).any()
    plt, fig, axes = _figure(2 if has_arc else 1, height=2.6)
    t = pf["time_s"]
    ax = axes[0]
    _shade_missing(ax, t, pf["out_face"])
    _line(ax, t, pf["identity_distance"], "output vs actor (dlib distance)")
    d = pf["driver_identity_distance"]
    if np.isfinite(d).any():
        ax.plot(t, d, ".", color="0.4", label="driver vs actor")
    ax.axhline(threshold, color=THRESHOLD_COLOUR, ls="--", lw=1, label=f"same-person threshold {threshold}")
    ax.set_ylabel("distance")
    ax.legend(fontsize=7, loc="upper right")
    if has_arc:
        _line(axes[1], t, pf["arcface_cosine"], "ArcFace cosine (conditioning model)")
        axes[1].set_ylabel("cosine")
        axes[1].legend(fontsize=7)
    axes[-1].set_xlabel("output time (s)")
    return _png(plt, fig)


def plot_pairs(pf: dict, names: list[str], left: str, right: str, labels: tuple[str, str], ylabel: str) -> bytes:
    """One panel per name: pf[left + name] and pf[right + name] over output time."""
    plt, fig, axes = _figure(len(names))
    t = pf["time_s"]
    for ax, name in zip(axes, names):
        _shade_missing(ax, t, pf["out_face"])
        _line(ax, t, pf[left + name], labels[0])
        _line(ax, t, pf[right + name], labels[1])
        ax.set_ylabel(name, fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[0].set_title(ylabel, fontsize=9)
    axes[-1].set_xlabel("output time (s)")
    return _png(plt, fig)


def plot_series(pf: dict, keys: list[tuple[str, str]], ylabel: str) -> bytes:
    """Several per-frame series (key, label) on one panel."""
    plt, fig, axes = _figure(1, height=2.6)
    t = pf["time_s"]
    _shade_missing(axes[0], t, pf["out_face"])
    for key, label in keys:
        _line(axes[0], t, pf[key], label)
    axes[0].set_ylabel(ylabel)
    axes[0].set_xlabel("output time (s)")
    axes[0].legend(fontsize=7)
    return _png(plt, fig)


def strip(frames: list[tuple[str, np.ndarray | None, np.ndarray]], height: int = 128, per_row: int = 3) -> np.ndarray:
    """Moments as rows of labelled panels, each moment a driving | output pair (a grey panel where
    the driving frame is missing). frames: (label, driving RGB or None, output RGB); the label
    goes over the output panel. Returns (H, W, 3) uint8 RGB."""
    from render.preview import side_by_side

    rows = []
    for start in range(0, len(frames), per_row):
        panels, labels = [], []
        for label, drive, out in frames[start:start + per_row]:
            panels += [np.full_like(out, 96) if drive is None else drive, out]
            labels += ["driving", label]
        rows.append(side_by_side(panels, height=height, labels=labels, gap=4))
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)


def _encode_png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    return buf.tobytes()


def _table(rows: list[tuple[str, str, str]]) -> str:
    body = "".join(f"<tr><td>{html.escape(a)}</td><td class=num>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                   for a, b, c in rows)
    return f"<table><tr><th>measure</th><th>value</th><th>judge / meaning</th></tr>{body}</table>"


def _v(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _sections(m: dict) -> list[tuple[str, str]]:
    ident, g, p, t, s = m["identity"], m["geometry"], m["pose"], m["temporal"], m["smirk"]
    d = ident["distance"]
    rows = [("identity distance, mean", _v(d["mean"]), "dlib ResNet vs actor photo; lower is closer"),
            ("identity distance, p5 / p95", f"{_v(d['p5'])} / {_v(d['p95'])}", "dlib ResNet"),
            ("frames under the threshold", _v(None if ident["same_person_share"] is None else 100 * ident["same_person_share"], ".0f") + "%",
             f"dlib's documented same-person threshold {ident['threshold']}"),
            ("driver vs actor distance", _v(ident["driver_to_actor"]["mean"]), "how different the two people are")]
    if "arcface" in ident:
        rows.append(("ArcFace cosine, mean", _v(ident["arcface"]["cosine"]["mean"]), ident["arcface"]["note"]))
    out = [("Identity", _table(rows))]
    rows = [(f"{name}: corr / MAE", f"{_v(v['corr'])} / {_v(v['mae'], '.4f')}", f"dlib 68: {v['what']}")
            for name, v in g["signals"].items()]
    rows += [("LMD mouth / eyes / all", f"{_v(g['lmd']['mouth'], '.4f')} / {_v(g['lmd']['eyes'], '.4f')} / "
              f"{_v(g['lmd']['all'], '.4f')}", g["lmd"]["units"])]
    out.append((f"Expression geometry ({g['mode']})", _table(rows)))
    if s is not None:
        rows = [("AED (expression, 50)", _v(s["aed"], ".4f"), s["note"]),
                ("error 55-d", _v(s["error_55"], ".4f"), f"target: {s['target']}"),
                ("error eyelids / jaw", f"{_v(s['error_parts']['eyelids'], '.4f')} / {_v(s['error_parts']['jaw'], '.4f')}",
                 s["weights"]),
                ("correlation mean", _v(s["corr_mean"]), "exp 0-9, jaw opening, eyelids"),
                ("jitter ratio", _v(s["jitter_ratio"], ".2f"), "re-tracked output vs re-tracked driving")]
        out.append(("SMIRK re-tracking", _table(rows)))
    a, b = p["apd_vs_drive"], p["apd_vs_actor"]
    rows = [("APD vs driving", f"{_v(a['mean'], '.1f')} (yaw {_v(a['yaw'], '.1f')}, pitch {_v(a['pitch'], '.1f')}, "
             f"roll {_v(a['roll'], '.1f')})", p["judge"]),
            ("APD vs actor photo", _v(b["mean"], ".1f"), "small when the output keeps the photo's pose")]
    out.append(("Head pose (degrees)", _table(rows)))
    rows = [("flicker ratio", _v(t["flicker"]["ratio"], ".2f"), "1: as steady as the driving clip; " + t["flicker"]["units"]),
            ("landmark jitter ratio", _v(t["jitter_landmarks"]["ratio"], ".2f"), t["jitter_landmarks"]["units"])]
    out.append(("Temporal stability", _table(rows)))
    return out


def write_report(folder: str | Path, metrics: dict, per_frame: dict, frames: list, *, summary: str = "") -> dict[str, Path]:
    """Write `plots/*.png` and `report.html` (every plot embedded, and named by its file) into
    `folder`. metrics: the JSON-ready record of `retarget.evaluate`; per_frame: name -> (n,)
    arrays; frames: (label, driving RGB or None, output RGB) moments. Returns {name: path}."""
    folder = Path(folder)
    plots_dir = folder / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    pf = per_frame
    images: list[tuple[str, str, bytes]] = []  # (section, file name, png)
    images.append(("Identity", "identity.png", plot_identity(pf, metrics["identity"]["threshold"])))
    signals = list(metrics["geometry"]["signals"])
    images.append(("Expression geometry", "geometry.png",
                   plot_pairs(pf, signals, "drive_", "out_", ("driving", "output"), "landmark signals (inter-ocular distances)")))
    images.append(("Expression geometry", "lmd.png",
                   plot_series(pf, [("lmd_mouth", "LMD mouth"), ("lmd_eyes", "LMD eyes")], "inter-ocular distances")))
    if metrics.get("smirk") is not None:
        names = sorted({k[len("target_"):] for k in pf if k.startswith("target_")})
        images.append(("SMIRK re-tracking", "smirk.png",
                       plot_pairs(pf, names, "target_", "retracked_", ("target", "output re-tracked"), "SMIRK parameters")))
        images.append(("SMIRK re-tracking", "smirk_error.png",
                       plot_series(pf, [("smirk_error", "mean |error| of 55 parameters")], "error")))
    images.append(("Head pose", "pose.png",
                   plot_pairs(pf, ["yaw", "pitch", "roll"], "drive_", "out_", ("driving", "output"), "degrees")))
    images.append(("Temporal stability", "flicker.png",
                   plot_series(pf, [("flicker_output", "output"), ("flicker_drive", "driving")],
                               "aligned-face change per frame")))
    groups: dict[str, list] = {}
    for label, drive, out in frames:
        key = "no_face" if label.startswith("no face") else ("identity" if "identity" in label else "expression")
        # labels as retarget.evaluate writes them: "worst identity 0.41 @1.40s", "best LMD ...", "no face ..."
        groups.setdefault(key, []).append((label, drive, out))
    titles = {"identity": "Moments: identity", "expression": "Moments: expression (landmark distance)",
              "no_face": "Moments: output frames without a face"}
    for key in ("identity", "expression", "no_face"):
        if key in groups:
            images.append((titles[key], f"strip_{key}.png", _encode_png(strip(groups[key]))))

    paths: dict[str, Path] = {}
    for _, name, png in images:
        path = plots_dir / name
        with atomic_open(path, "wb") as f:
            f.write(png)
        paths[name] = path
    # Plots of an earlier report in this folder that this one does not have (no SMIRK now, no
    # frame without a face now) would otherwise sit beside it as if they belonged to it.
    for name in PLOT_FILES - set(paths):
        (plots_dir / name).unlink(missing_ok=True)

    by_section: dict[str, list[str]] = {}
    for section, name, png in images:
        tag = (f'<img alt="{html.escape(name)}" data-file="plots/{html.escape(name)}" '
               f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        by_section.setdefault(section, []).append(tag)
    body = []
    for title, table in _sections(metrics):
        key = title.split(" (")[0]  # "Expression geometry (relative)" holds the "Expression geometry" plots
        body.append(f"<h2>{html.escape(title)}</h2>{table}" + "".join(by_section.pop(key, [])))
    for title, tags in by_section.items():
        body.append(f"<h2>{html.escape(title)}</h2>" + "".join(tags))
    inputs = metrics["inputs"]
    head = (f"<p>output <code>{html.escape(inputs['output']['path'])}</code>, driving "
            f"<code>{html.escape(inputs['drive']['path'])}</code>, actor <code>{html.escape(inputs['actor']['path'])}</code>"
            f" &middot; {html.escape(metrics['created'])}</p>")
    if metrics["settings"].get("tiny_weights"):
        head += "<p class=warn>Tiny random weights: SMIRK and ArcFace numbers are meaningless; dlib's are real.</p>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>retarget eval: {html.escape(Path(inputs['output']['path']).name)}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
td.num{{text-align:right;font-family:monospace}}img{{max-width:100%;display:block;margin:.5em 0}}
pre{{background:#f4f4f4;padding:8px;font-size:12px}}.warn{{color:#a00}}</style></head><body>
<h1>retarget eval</h1>{head}<pre>{html.escape(summary)}</pre>
{''.join(body)}
<p>Numbers: <code>metrics.json</code> (which judge gave each one); per frame: <code>per_frame.csv</code>.</p>
</body></html>
"""
    paths["report"] = folder / "report.html"
    with atomic_open(paths["report"], "w", encoding="utf-8") as f:
        f.write(page)
    return paths
