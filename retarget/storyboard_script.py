"""Storyboard scripts: a YAML list of panels (expression source, caption, per-panel settings)
rendered onto one actor as one PNG per panel, a contact sheet and a resolved script.

Script format (YAML; every key optional except `panels`):

    title: The news                # sheet title (default: the actor's file name)
    columns: 3                     # panels per sheet row (default: --columns)
    cell: 256                      # sheet cell size in pixels (default: --cell)
    steps: 25                      # denoising steps / guidance (default: the command's options)
    guidance: 3.0
    defaults: {seed: 0, exp_scale: 1.0, ref_strength: 0.8, gain: "jaw=1.2"}
    panels:
      - source: smile.jpg          # any expression source (retarget.sources); paths relative to the script
        caption: She hears it      # under the panel on the sheet
        seed: 3                    # optional, per panel: seed, exp_scale, ref_strength,
        exp_scale: 1.2             #   gain ("jaw=1.2,eyelids=0.8" or {jaw: 1.2})
      - source: clip.mp4@1.25
      - source: {jaw: 0.3, eyelids: 1}

A panel's setting comes from the panel, else `defaults`, else the command's options. Outputs in
the folder `-o`: `panel_01.png`..., `sheet.png`, and `<script>.resolved.yaml`, the same script
with every source replaced by its 55 numbers (`source: {params: [...]}`, `from:` naming the
original) and every setting written out, so it re-renders the same PNGs anywhere without the
pictures. Panels with equal (seed, exp_scale, ref_strength) render together in batches.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from retarget.sources import Source, parse_source

SCRIPT_KEYS = ("title", "columns", "cell", "steps", "guidance", "defaults", "panels")
PANEL_SETTINGS = ("seed", "exp_scale", "ref_strength", "gain")
PANEL_KEYS = ("source", "caption", "from") + PANEL_SETTINGS
SHEET_NAME = "sheet.png"


@dataclass
class Panel:
    """One panel: number (from 1), its source, caption, and settings (None: not set here)."""

    number: int
    source: Source
    caption: str = ""
    origin: str = ""  # the `from:` of a resolved script, else the source as written
    seed: int | None = None
    exp_scale: float | None = None
    ref_strength: float | None = None
    gain: str | None = None


@dataclass
class Script:
    """A parsed storyboard script. name: how messages call it (the file name)."""

    name: str
    panels: list[Panel]
    title: str | None = None
    columns: int | None = None
    cell: int | None = None
    steps: int | None = None
    guidance: float | None = None
    defaults: dict = field(default_factory=dict)
    path: Path | None = None


@dataclass
class BoardResult:
    """What a storyboard script run wrote. params: (N, 55) the numbers rendered (after gains)."""

    panels: list[Path]
    sheet: Path
    resolved: Path
    params: np.ndarray
    seconds: float

    def line(self) -> str:
        return (f"done: {len(self.panels)} panels in {self.seconds:.1f}s; wrote {self.sheet}, "
                f"{self.resolved} and {self.panels[0].name}..{self.panels[-1].name}")


# --------------------------------------------------------------------------- parsing

def _number(value, where: str, kind=float, positive: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok or (positive and value <= 0):
        want = "an integer" if kind is int else "a number"
        raise RetargetError(f"{where} must be {want}{' > 0' if positive else ''}, got {value!r}")
    return kind(value)


def _gain_spec(value, where: str) -> str:
    """A gain as the `--gain` text ("jaw=1.2,eyelids=0.8"), from that text or a mapping; checked."""
    from retarget.motion import parse_gain

    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if not isinstance(value, str):
        raise RetargetError(f"{where}: gain must be like \"jaw=1.2,eyelids=0.8\" or {{jaw: 1.2}}, got {value!r}")
    try:
        parse_gain(value)
    except RetargetError as e:
        raise RetargetError(f"{where}: {str(e).replace('--gain: ', 'gain: ')}") from None
    return value


def _settings(entry: dict, where: str) -> dict:
    out = {}
    if entry.get("seed") is not None:
        out["seed"] = _number(entry["seed"], f"{where} seed", int)
    for key in ("exp_scale", "ref_strength"):
        if entry.get(key) is not None:
            out[key] = _number(entry[key], f"{where} {key}")
    if entry.get("gain") is not None:
        out["gain"] = _gain_spec(entry["gain"], where)
    return out


def parse_script(data, *, name: str = "script", base: str | os.PathLike | None = None) -> Script:
    """A script from its parsed YAML/JSON (a dict, or just the list of panels). name: used in
    messages ("board.yaml: panel 3: ..."); base: the folder relative paths are relative to."""
    if isinstance(data, list):
        data = {"panels": data}
    if not isinstance(data, dict):
        raise RetargetError(f"{name}: expected a mapping with `panels:` (a list of panels)")
    unknown = sorted(set(map(str, data)) - set(SCRIPT_KEYS))
    if unknown:
        raise RetargetError(f"{name}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(SCRIPT_KEYS)}")
    panels = data.get("panels")
    if not isinstance(panels, list) or not panels:
        raise RetargetError(f"{name}: `panels:` must be a non-empty list of panels")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(map(str, defaults)) - set(PANEL_SETTINGS):
        raise RetargetError(f"{name}: `defaults:` may hold {', '.join(PANEL_SETTINGS)}")
    script = Script(name=name, panels=[], defaults=_settings(defaults, f"{name}: defaults"),
                    title=None if data.get("title") is None else str(data["title"]))
    for key, kind in (("columns", int), ("cell", int), ("steps", int), ("guidance", float)):
        if data.get(key) is not None:
            setattr(script, key, _number(data[key], f"{name}: {key}", kind, positive=key != "guidance"))
    for i, entry in enumerate(panels):
        where = f"{name}: panel {i + 1}"
        if isinstance(entry, (str, int, float)) and not isinstance(entry, bool):
            entry = {"source": str(entry)}
        if not isinstance(entry, dict):
            raise RetargetError(f"{where}: expected a mapping like {{source: smile.jpg, caption: ...}}")
        extra = sorted(set(map(str, entry)) - set(PANEL_KEYS))
        if extra:
            raise RetargetError(f"{where}: unknown key(s) {', '.join(extra)}; allowed: {', '.join(PANEL_KEYS)}")
        if entry.get("source") is None:
            raise RetargetError(f"{where}: missing `source:` (a photo, clip@seconds, preset, numbers, ...)")
        src = parse_source(entry["source"], where=where, base=base)
        caption = entry.get("caption")
        script.panels.append(Panel(i + 1, src, caption="" if caption is None else str(caption),
                                   origin=str(entry.get("from") or src.text), **_settings(entry, where)))
    return script


def load_script(path: str | os.PathLike) -> Script:
    """Read a storyboard script (YAML, or JSON, which is YAML too). RetargetError naming the file
    and line for unreadable files and YAML syntax errors, and the panel for bad panels."""
    from retarget.documents import load_document

    data, _, path, _ = load_document(path, what="storyboard script")
    script = parse_script(data, name=path.name, base=path.parent)
    script.path = path
    return script


# --------------------------------------------------------------------------- outputs

def panel_name(number: int, count: int) -> str:
    return f"panel_{number:0{max(2, len(str(count)))}d}.png"


def resolved_name(script: Script) -> str:
    stem = Path(script.name).stem if script.path is not None else "board"
    return f"{stem}.resolved.yaml"


def script_outputs(script: Script, out_dir: str | os.PathLike) -> list[Path]:
    """Every file a run of `script` writes into `out_dir` (panels, sheet, resolved script)."""
    out_dir = Path(out_dir)
    n = len(script.panels)
    return [out_dir / panel_name(p.number, n) for p in script.panels] + [out_dir / SHEET_NAME,
                                                                          out_dir / resolved_name(script)]


def effective(panel: Panel, script: Script, options) -> dict:
    """The panel's seed, exp_scale, ref_strength and gain: panel, else defaults, else options."""
    out = {}
    for key in PANEL_SETTINGS:
        value = getattr(panel, key)
        if value is None:
            value = script.defaults.get(key)
        if value is None:
            value = getattr(options, key)
        out[key] = value
    return out


def resolved_document(script: Script, params: np.ndarray, options, *, columns: int, cell: int,
                      title: str | None, steps: int, guidance: float) -> dict:
    """The resolved script as a plain dict: sources as 55 numbers, every setting explicit."""
    doc: dict = {"title": title, "columns": columns, "cell": cell, "steps": int(steps), "guidance": float(guidance),
                 "panels": []}
    for panel, p in zip(script.panels, params):
        s = effective(panel, script, options)
        entry = {"caption": panel.caption, "from": panel.origin,
                 "source": {"params": _Flow(exact_floats(p))},
                 "seed": int(s["seed"]), "exp_scale": float(s["exp_scale"]), "ref_strength": float(s["ref_strength"])}
        if s["gain"]:
            entry["gain"] = s["gain"]
        doc["panels"].append(entry)
    return doc


class _Flow(list):
    """A list written on one line ([a, b, c]) in the resolved script."""


def exact_floats(values) -> list[float]:
    """float32 values as the shortest decimals that read back as the same float32 (str of
    np.float32), so a resolved script is short and re-renders bit-identically."""
    return [float(str(np.float32(v))) for v in np.asarray(values, np.float32).ravel()]


def write_yaml(path: Path, doc: dict, header: str = "") -> Path:
    import yaml

    from render.files import atomic_open

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Flow, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    text = yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=120)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(header + text)
    return path


# --------------------------------------------------------------------------- rendering

def _panel_params(raw: np.ndarray, gain: str | None) -> np.ndarray:
    from retarget.motion import apply_gain, clamp_to_valid_range, parse_gain

    if not gain:
        return np.asarray(raw, np.float32)
    return clamp_to_valid_range(apply_gain(np.asarray(raw, np.float32)[None], parse_gain(gain)))[0]


def render_script(actor_path: str | os.PathLike, script: Script, out_dir: str | os.PathLike, options=None, *,
                  weights=None, columns: int = 4, cell: int = 256, log=print) -> BoardResult:
    """Render a storyboard script onto the actor of `actor_path` into the folder `out_dir`.

    options: retarget.run.RunOptions (steps, guidance, device, batch, paste_back, ...; the script's
    steps/guidance/defaults and each panel's settings override them). columns/cell: the sheet's,
    unless the script sets them. Order of work: every source is checked, the output folder made,
    the weights checked and the pictures tracked (errors name the panel) before the diffusion
    pipeline loads. Returns a BoardResult; every file is written atomically.
    """
    from render.storyboard import save_image, storyboard
    from retarget.run import (
        RunOptions, check_writable, prepare_rendering, read_image, require_render_weights,
    )
    from retarget.video_sink import pipe_paste
    from retarget.sources import check_sources, input_paths, resolve_sources
    from retarget.weights import WeightsLayout

    t0 = time.perf_counter()
    opts = options or RunOptions()
    if script.steps is not None or script.guidance is not None:
        opts = replace(opts, steps=script.steps or opts.steps,
                       guidance=script.guidance if script.guidance is not None else opts.guidance)
    actor_path, out_dir = Path(actor_path), Path(out_dir)
    sources = [p.source for p in script.panels]
    check_sources(sources)
    actor_rgb = read_image(actor_path, "actor photo")
    outputs = script_outputs(script, out_dir)
    inputs = {p.resolve() for p in [actor_path, *input_paths(sources)] + ([script.path] if script.path else [])}
    for out in outputs:
        if out.resolve() in inputs:
            raise RetargetError(f"-o {out_dir}: {out.name} would overwrite an input ({out}); choose another folder")
    check_writable(out_dir, "output folder")
    layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
    require_render_weights(layout, opts, tracker=any(s.needs_tracker for s in sources))
    raw = resolve_sources(sources, layout=layout, device=opts.device, log=log)
    settings = [effective(p, script, opts) for p in script.panels]
    params = np.stack([_panel_params(r, s["gain"]) for r, s in zip(raw, settings)])

    r = prepare_rendering(layout, actor_path, opts, log, actor_rgb=actor_rgb)
    batch = opts.batch or 8
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(settings):
        groups.setdefault((s["seed"], s["exp_scale"], s["ref_strength"]), []).append(i)
    images: list[np.ndarray | None] = [None] * len(params)
    from retarget.run import _progress

    bar = _progress(len(params), "rendering", unit="panel")
    for (seed, exp_scale, ref_strength), members in groups.items():
        call = {**r.call, "seed": seed, "exp_scale": exp_scale, "ref_strength": ref_strength}
        for s in range(0, len(members), batch):
            idx = members[s:s + batch]
            # frame_indices = panel positions: with --per-frame-noise a panel's noise depends on it alone.
            for i, img in zip(idx, r.pipe(r.actor, params[idx], frame_indices=idx, **call)):
                images[i] = pipe_paste(r.actor_rgb, img, r.actor) if opts.paste_back else img
            bar.update(len(idx))
    bar.close()

    panel_paths = [save_image(path, img) for path, img in zip(outputs[:-2], images)]
    columns = script.columns or columns
    cell = script.cell or cell
    title = script.title if script.title is not None else actor_path.name
    labels = [f"{p.number}. {p.caption}" if p.caption else f"{p.number}" for p in script.panels]
    sheet = save_image(outputs[-2], storyboard(images, labels, columns=columns, cell=cell, title=title))
    doc = resolved_document(script, raw, opts, columns=columns, cell=cell, title=title, steps=r.call["steps"],
                            guidance=r.call["guidance"])
    header = (f"# {script.name} resolved {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: every source is "
              "its 55 numbers\n# (FLAME expression 50, eyelids 2, jaw 3); `from` names the original.\n"
              f"# Re-render: retarget storyboard ACTOR --script {outputs[-1].name} -o DIR\n")
    resolved = write_yaml(outputs[-1], doc, header)
    return BoardResult(panel_paths, sheet, resolved, params, time.perf_counter() - t0)
