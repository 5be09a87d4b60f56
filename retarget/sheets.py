"""Storyboards (one actor, a sheet of chosen expressions) and keyframe transitions (a video
of smooth expression changes between authored keyframes). Both reuse `retarget.run`'s stages.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from render.errors import RetargetError
from retarget.diskspace import check_free_space, estimate_run_bytes
from retarget.run import (
    RunOptions, RunSummary, WorkFolder, check_output_name, check_outputs, check_writable, output_size,
    prepare_rendering, read_image, render_to_work, run_stages,
)
from retarget.video_sink import pipe_paste


def _parse_list(spec: str | None, kind, what: str) -> list:
    if not spec:
        return []
    try:
        return [kind(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise RetargetError(f"{what}: expected a comma-separated list of numbers, got {spec!r}") from None


def storyboard_expressions(*, track: str | None = None, times: str | None = None, frames: str | None = None,
                           keyframes: str | None = None, presets: str | None = None) -> list[tuple[str, np.ndarray]]:
    """The (label, 55-d vector) cells of a storyboard, from any mix of: track frames picked by
    time (`times`, seconds) or index (`frames`), the keyframes of a keyframe file, and named
    presets (built in or the user's, retarget.presets). Order: presets, keyframes, track picks."""
    from retarget.presets import PresetLibrary
    from tracking.keyframes import parse_keyframes

    cells: list[tuple[str, np.ndarray]] = []
    library = PresetLibrary() if presets else None
    for name in (presets.split(",") if presets else []):
        name = name.strip()
        if name not in library:
            raise RetargetError(f"--presets: unknown preset {name!r}; choose from {', '.join(library.names())}")
        cells.append((name.replace("_", " "), library.get(name).params.astype(np.float32)))
    if keyframes:
        for kf in parse_keyframes(keyframes):
            cells.append((f"{kf.time_s:g}s", np.asarray(kf.params, np.float32)))
    picks_t, picks_f = _parse_list(times, float, "--times"), _parse_list(frames, int, "--frames")
    if picks_t or picks_f:
        if not track:
            raise RetargetError("--times/--frames pick frames of a track: give --track FILE.npz")
        from tracking.track import Track

        tr = Track.load(track)
        for t in picks_t:
            i = int(np.argmin(np.abs(tr.times - t)))
            cells.append((f"{tr.times[i]:.2f}s", tr.params[i]))
        for i in picks_f:
            if not 0 <= i < len(tr):
                raise RetargetError(f"--frames: {i} is outside the track's {len(tr)} frames")
            cells.append((f"frame {i}", tr.params[i]))
    elif track:
        from tracking.track import Track

        tr = Track.load(track)
        for i in np.linspace(0, len(tr) - 1, num=min(8, len(tr))).round().astype(int):
            cells.append((f"{tr.times[i]:.2f}s", tr.params[i]))
    if not cells:
        raise RetargetError("nothing to draw: give --presets, --keyframes, or --track (with --times/--frames)")
    return cells


def render_expressions(actor_path: str | os.PathLike, params: np.ndarray, options: RunOptions | None = None, *,
                       weights=None, log=print, prepare=None) -> list[np.ndarray]:
    """The actor rendered with each row of `params` (N, 55): N HxWx3 uint8 images, the aligned
    face crops, or the whole photo with the face pasted back when `options.paste_back`.
    prepare: replaces `prepare_rendering` (as in `retarget.run.run`)."""
    from retarget.weights import WeightsLayout

    opts = options or RunOptions()
    layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
    r = (prepare or prepare_rendering)(layout, Path(actor_path), opts, log)
    params = np.asarray(params, np.float32).reshape(-1, 55)
    batch = opts.batch or 8
    images = [None] * len(params)
    for idx, ims in r.render([list(range(s, min(len(params), s + batch))) for s in range(0, len(params), batch)],
                             params):
        for i, im in zip(idx, ims):
            images[i] = im
    if opts.paste_back:
        images = [pipe_paste(r.actor_rgb, im, r.actor) for im in images]
    return images


def make_storyboard(actor_path: str | os.PathLike, out: str | os.PathLike, cells: list[tuple[str, np.ndarray]],
                    options: RunOptions | None = None, *, weights=None, columns: int = 4, cell: int = 256,
                    inputs=(), log=print, prepare=None) -> Path:
    """Render the actor with each cell's expression and save one labelled sheet (PNG/JPEG) at `out`.
    inputs: other files the cells came from (track, keyframes): `out` may not be one of them.
    prepare: replaces `prepare_rendering` (as in `retarget.run.run`)."""
    from render.files import check_not_input
    from render.storyboard import save_image, storyboard
    from retarget.cliargs import check_options

    opts = options or RunOptions()
    check_options(opts)
    out, actor_path = Path(out), Path(actor_path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise RetargetError(f"storyboard {out}: use a .png or .jpg name")
    check_not_input(out, (actor_path, *inputs))
    check_writable(out.parent, "output folder")
    images = render_expressions(actor_path, np.stack([c[1] for c in cells]), opts, weights=weights, log=log,
                                prepare=prepare)
    sheet = storyboard(images, [c[0] for c in cells], columns=columns, cell=cell, title=actor_path.name)
    return save_image(out, sheet)


def make_transition(actor_path: str | os.PathLike, keyframes: str, out: str | os.PathLike,
                    options: RunOptions | None = None, *, fps: float = 25.0, easing: str = "smoothstep",
                    weights=None, log=print, prepare=None) -> RunSummary:
    """Render a video of the actor moving smoothly through the keys of a keyframe file (JSON or
    YAML, keys from any expression source: retarget.transitions), and write the interpolated
    parameters as a track file beside it (`transition_track_path(out)`, track file v1).
    Every key is checked and every picture tracked before the diffusion pipeline loads.
    prepare: replaces `prepare_rendering` (as in `retarget.run.run`)."""
    from retarget.run import require_render_weights
    from retarget.sources import check_sources, input_paths
    from retarget.transitions import (
        describe_keys, load_keys, resolve_keys, transition_track, transition_track_path,
    )
    from render.files import check_not_input
    from retarget.cliargs import check_options
    from retarget.weights import WeightsLayout
    from tracking.keyframes import EASINGS, interpolate_keyframes

    t0 = time.perf_counter()
    opts = options or RunOptions()
    check_options(opts)
    out, actor_path = Path(out), Path(actor_path)
    check_output_name(out)
    if easing not in EASINGS:
        raise RetargetError(f"--easing {easing!r}: choose one of {', '.join(EASINGS)}")
    work = WorkFolder(Path(opts.work) if opts.work else out.parent / f".{out.name}.work")
    keyfile = load_keys(keyframes)
    sources = [k.source for k in keyfile.keys]
    check_sources(sources)
    track_path = transition_track_path(out)
    inputs = [actor_path, *input_paths(sources)] + ([keyfile.path] if keyfile.path else [])
    check_outputs(out, opts, work, inputs)
    check_not_input(track_path, inputs, option="-o (its track file)")
    replaced = out.exists()
    actor_rgb = read_image(actor_path, "actor photo")
    check_writable(out.parent, "output folder")
    layout = weights if isinstance(weights, WeightsLayout) else WeightsLayout(weights)
    require_render_weights(layout, opts, tracker=any(s.needs_tracker for s in sources))
    log(describe_keys(keyfile))
    kfs = resolve_keys(keyfile, layout=layout, device=opts.device, log=log)
    times, params = interpolate_keyframes(kfs, fps, easing=easing)
    frames_dir = Path(opts.frames_dir) if opts.frames_dir else None
    check_free_space(estimate_run_bytes(len(params), crop_size=512, out_size=output_size(actor_rgb, opts),
                                        work=work.root, out=out, frames_dir=frames_dir), str(out))
    stages = {"open": time.perf_counter() - t0}
    t = time.perf_counter()
    r = (prepare or prepare_rendering)(layout, actor_path, opts, log, actor_rgb=actor_rgb)
    stages["prepare"] = time.perf_counter() - t  # the load included (nothing to track to overlap it with)
    source = {"keyframes": keyfile.sha256[:16], "fps": fps, "easing": easing}
    stats: dict = {}
    rendered = render_to_work(r, params, work, opts, layout, actor_path, source, log, stats=stats,
                              video=dict(out=out, fps=fps))
    transition_track(times, params, fps, keyfile, easing).save(track_path)
    if not opts.keep_work:
        shutil.rmtree(work.root, ignore_errors=True)
    from retarget.compiling import summary_note

    seconds = time.perf_counter() - t0
    return RunSummary(frames=len(params), rendered=rendered, seconds=seconds, invalid_frames=0,
                      output=out, face_report=r.actor.face_report, params=params, replaced=replaced,
                      compile=summary_note(r), **run_stages(stages, stats, rendered, seconds))
