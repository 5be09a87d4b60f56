"""`retarget preset add|list|show|remove`: the preset library from the command line.

The work is in plain functions (`add_preset`, `preset_table`, `preset_numbers`, `plot_preset`)
that the app calls too; the `cmd_*` handlers only unpack argparse.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from retarget.presets import Preset, PresetLibrary, check_name
from retarget.weights import layout_from_args


def add_preset(name: str, source, *, note: str = "", weights=None, device: str = "auto",
               library: PresetLibrary | None = None, log=print) -> tuple[Preset, bool]:
    """Resolve `source` (any expression source, retarget.sources) and save it as user preset
    `name`. Returns (preset, replaced). The name is checked before any picture is tracked."""
    from retarget.sources import check_sources, parse_source, resolve_sources
    from retarget.weights import WeightsLayout

    library = library or PresetLibrary()
    check_name(name)
    if name in library.builtins:
        raise RetargetError(f"preset {name!r} is built in and cannot be replaced; choose another name")
    src = parse_source(source, where="preset add")
    check_sources([src], presets=library)
    layout = None
    weights_id = ""
    if src.needs_tracker:
        layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
        from tracking.smirk import weights_identity

        weights_id = weights_identity(layout.require("smirk_ckpt"))
    params = resolve_sources([src], layout=layout, device=device, presets=library, log=log)[0]
    return library.add(name, params, note=note, source=describe_origin(src), weights_id=weights_id)


def describe_origin(src) -> str:
    """Where a source's numbers come from, for the preset file: absolute paths for files (with
    the moment: `/clips/a.mp4@1.25`), the text as written otherwise."""
    if src.path is None:
        return src.text
    moment = "" if src.kind == "photo" else (f"#{src.frame}" if src.frame is not None else f"@{src.time_s:g}")
    return f"{src.path.resolve()}{moment}"


def preset_table(library: PresetLibrary) -> str:
    """One line per preset: name, built in / user, jaw and eyelid summary, note, where it came from."""
    rows = []
    for p in library.all():
        rows.append((p.name, "built in" if p.builtin else "user", p.summary(),
                     p.note if not p.builtin else "", p.source if not p.builtin else ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'name':<{width}}  {'kind':<8}  summary"]
    for name, kind, summary, note, source in rows:
        extra = "".join([f"  note: {note}" if note else "", f"  from: {source}" if source else ""])
        lines.append(f"{name:<{width}}  {kind:<8}  {summary}{extra}")
    lines.append(f"(user presets in {library.folder})")
    return "\n".join(lines)


def preset_numbers(preset: Preset) -> str:
    """The 55 numbers, labelled: expression 0-49 ten a row, eyelids, jaw."""
    p = np.asarray(preset.params, np.float64)
    lines = [f"{preset.name} ({'built in' if preset.builtin else preset.path})"]
    if preset.note and not preset.builtin:
        lines.append(f"note: {preset.note}")
    if preset.source and not preset.builtin:
        lines.append(f"from: {preset.source}" + (f" ({preset.weights_id})" if preset.weights_id else ""))
    for s in range(0, 50, 10):
        lines.append(f"expression {s:2d}-{s + 9:2d}: " + " ".join(f"{v:+.3f}" for v in p[s:s + 10]))
    lines.append(f"eyelids (0 open, 1 closed): {p[50]:.3f} {p[51]:.3f}")
    lines.append(f"jaw (open, side, forward; radians): {p[52]:.3f} {p[53]:+.3f} {p[54]:+.3f}")
    return "\n".join(lines)


def plot_preset(preset: Preset, path: str | os.PathLike) -> Path:
    """A bar chart of the 55 numbers (expression, eyelids, jaw in three colours), PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from render.files import atomic_open

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise RetargetError(f"--plot {path}: use a .png name")
    p = np.asarray(preset.params, np.float64)
    fig, ax = plt.subplots(figsize=(11, 3.2), dpi=100)
    x = np.arange(55)
    for sl, colour, label in ((slice(0, 50), "#4c72b0", "expression 0-49"), (slice(50, 52), "#55a868", "eyelids"),
                              (slice(52, 55), "#c44e52", "jaw (rad)")):
        ax.bar(x[sl], p[sl], color=colour, label=label)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks([0, 10, 20, 30, 40, 50.5, 53])
    ax.set_xticklabels(["0", "10", "20", "30", "40", "lids", "jaw"])
    ax.set_xlim(-1, 55)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_title(f"preset {preset.name}" + (f": {preset.note}" if preset.note and not preset.builtin else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


# --------------------------------------------------------------------------- CLI handlers

def _library(args) -> PresetLibrary:
    return PresetLibrary(args.presets_dir)


def cmd_preset_add(args) -> int:
    library = _library(args)
    preset, replaced = add_preset(args.name, args.source, note=args.note or "", weights=layout_from_args(args),
                                  device=args.device, library=library)
    print(preset_numbers(preset).splitlines()[0].split(" (")[0] + ": " + preset.summary())
    print(("replaced the user preset " if replaced else "saved ") + f"{preset.name!r} in {preset.path}")
    return 0


def cmd_preset_list(args) -> int:
    print(preset_table(_library(args)))
    return 0


def cmd_preset_show(args) -> int:
    preset = _library(args).get(args.name)
    print(preset_numbers(preset))
    if args.plot is not None:
        out = plot_preset(preset, args.plot or f"{preset.name}.png")
        print(f"wrote {out}")
    return 0


def cmd_preset_remove(args) -> int:
    path = _library(args).remove(args.name)
    print(f"removed {args.name!r} ({path})")
    return 0


def register(sub, formatter, examples, add_weights_arg) -> None:
    """Add `retarget preset ...` to the subparsers `sub`."""
    from retarget.sources import HELP

    pp = sub.add_parser(
        "preset", help="named expressions from pictures: add, list, show, remove", formatter_class=formatter,
        description="A library of named 55-d expressions: built-in ones plus your own, saved from any "
                    f"expression source: {HELP}. User presets live in $RETARGET_PRESETS (default: the "
                    "platform's user config folder), one JSON file each.",
        epilog=examples("""
            retarget preset add smirk smile.jpg --note "left corner up"
            retarget preset add gasp clip.mp4@1.25
            retarget preset add squint drive.track.npz#40
            retarget preset list
            retarget preset show smirk --plot smirk.png
            retarget preset remove smirk
        """))
    psub = pp.add_subparsers(dest="preset_command", metavar="ACTION")
    psub.required = True

    def common(p):
        p.add_argument("--presets-dir", default=None, metavar="DIR",
                       help="preset folder (default: $RETARGET_PRESETS, else the user config folder)")

    p = psub.add_parser("add", help="save an expression source as a named preset", formatter_class=formatter,
                        epilog=examples("""
                            retarget preset add smirk smile.jpg --note "left corner up"
                            retarget preset add wide_jaw '{"jaw": 0.35, "eyelids": 0.2}'
                        """))
    p.add_argument("name", help="preset name: letters, digits, _ and - (built-in names are refused)")
    p.add_argument("source", help="photo, CLIP@SECONDS, CLIP#FRAME, TRACK.npz#FRAME, preset, or JSON numbers")
    p.add_argument("--note", default="", help="a short description shown by `preset list`")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where SMIRK runs")
    add_weights_arg(p)
    common(p)
    p.set_defaults(func=cmd_preset_add)
    p = psub.add_parser("list", help="every preset: name, kind, jaw/eyelid summary, note, source",
                        formatter_class=formatter, epilog=examples("retarget preset list"))
    common(p)
    p.set_defaults(func=cmd_preset_list)
    p = psub.add_parser("show", help="the 55 numbers of a preset (optionally a bar chart PNG)",
                        formatter_class=formatter, epilog=examples("retarget preset show jaw_open --plot jaw.png"))
    p.add_argument("name")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="also write a bar chart (default name: NAME.png)")
    common(p)
    p.set_defaults(func=cmd_preset_show)
    p = psub.add_parser("remove", help="delete a user preset (built-in ones cannot be removed)",
                        formatter_class=formatter, epilog=examples("retarget preset remove smirk"))
    p.add_argument("name")
    common(p)
    p.set_defaults(func=cmd_preset_remove)
