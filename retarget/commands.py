"""Subcommands beyond `weights`: track, run, storyboard, transition, eval, demo (registered into the CLI)."""

from __future__ import annotations

from pathlib import Path

from render.errors import RetargetError
from render.files import check_not_input
from retarget.cliargs import add_dataclass_options, dataclass_from_args, number


# --------------------------------------------------------------------------- run

def cmd_run(args) -> int:
    from retarget.retake import RetakeOptions, is_video_actor, retake
    from retarget.run import RunOptions, run
    from retarget.scale.options import ray_options_from_args
    from retarget.weights import layout_from_args

    opts = dataclass_from_args(RunOptions, args)
    layout = layout_from_args(args)
    ray_opts = ray_options_from_args(args)
    if is_video_actor(args.actor):
        if ray_opts is not None:
            raise RetargetError("--ray: an actor video is rendered in one process for now; drop --ray")
        summary = retake(args.drive, args.actor, args.output, opts, dataclass_from_args(RetakeOptions, args),
                         weights=layout)
    else:
        import dataclasses

        video_only = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(RetakeOptions)
                      if getattr(args, f.name) != f.default]
        if video_only:
            raise RetargetError(f"{', '.join(video_only)}: for an actor video; {args.actor} is a photo")
        if ray_opts is not None:
            from retarget.scale.pool import run_on_ray

            summary = run_on_ray(args.drive, args.actor, args.output, opts, ray_opts, weights=layout)
        else:
            summary = run(args.drive, args.actor, args.output, opts, weights=layout)
    print(summary.line())
    if args.eval:
        from retarget.evaluate.cli import eval_after_run

        eval_after_run(args, opts, summary)
    return 0


# --------------------------------------------------------------------------- batch

def cmd_batch(args) -> int:
    from retarget.scale.jobs import default_status_path, format_summary, load_jobs, run_jobs
    from retarget.scale.options import ray_options_from_args

    jobs = load_jobs(args.jobs, weights=args.weights, sd15=args.sd15)
    ray_opts = ray_options_from_args(args)
    status = Path(args.status) if args.status else default_status_path(Path(args.jobs))
    results = run_jobs(jobs, status_path=status, ray_opts=ray_opts, fresh=args.fresh)
    print()
    print(format_summary(results))
    print(f"status: {status}")
    return 0 if all(r.status == "done" for r in results) else 1


# --------------------------------------------------------------------------- track

def cmd_track(args) -> int:
    from retarget.weights import layout_from_args
    from tracking.tracker import TrackOptions, summarize, track_video

    src = Path(args.input)
    out = Path(args.output) if args.output else src.with_name(src.stem + ".track.npz")
    if out.suffix != ".npz":
        raise RetargetError(f"track file {out}: use a .npz name")
    csv = (Path(args.csv) if args.csv else out.with_suffix(".csv")) if args.csv is not None else None
    plot = (Path(args.plot) if args.plot else out.with_suffix(".png")) if args.plot is not None else None
    for option, path in (("-o", out), ("--csv", csv), ("--plot", plot)):
        if path is not None:
            check_not_input(path, (src,), option=option)
    replaced = [str(p) for p in (out, csv, plot) if p is not None and p.exists()]
    layout = layout_from_args(args)
    opts = dataclass_from_args(TrackOptions, args)
    track = track_video(src, smirk_path=layout.require("smirk_ckpt"),
                        landmarker_path=layout.optional("face_landmarker"), options=opts)
    track.save(out)
    written = [str(out)]
    if csv is not None:
        from tracking.export import write_csv

        written.append(str(write_csv(track, csv, which=args.csv_columns)))
    if plot is not None:
        from tracking.export import plot_track

        written.append(str(plot_track(track, plot)))
    print(summarize(track))
    print("wrote " + ", ".join(written) + (f" (replaced the existing {', '.join(replaced)})" if replaced else ""))
    return 0


# --------------------------------------------------------------------------- storyboard, transition

# RunOptions fields that only make sense for `run` (a driving video, its audio, its track).
DRIVING_ONLY = ("track", "smooth", "start", "end", "fps", "relative", "neutral_frame", "gain", "preview")


def cmd_storyboard(args) -> int:
    from retarget.run import RunOptions
    from retarget.sheets import make_storyboard, storyboard_expressions
    from retarget.weights import layout_from_args

    if args.script:
        from retarget.storyboard_script import load_script, render_script

        if any(getattr(args, k) for k in ("presets", "keyframes", "track", "times", "frames")):
            raise RetargetError("--script lists the panels itself: leave out --presets/--keyframes/--track/--times/--frames")
        opts = dataclass_from_args(RunOptions, args, paste_back=args.paste_back)
        result = render_script(args.actor, load_script(args.script), args.output, opts, weights=layout_from_args(args),
                               columns=args.columns, cell=args.cell)
        print(result.line())
        return 0
    check_not_input(args.output, (args.actor, args.track, args.keyframes))  # before reading any of them
    cells = storyboard_expressions(track=args.track, times=args.times, frames=args.frames,
                                   keyframes=args.keyframes, presets=args.presets)
    opts = dataclass_from_args(RunOptions, args, paste_back=args.paste_back)
    replaced = Path(args.output).exists()
    path = make_storyboard(args.actor, args.output, cells, opts, weights=layout_from_args(args), columns=args.columns,
                           cell=args.cell, inputs=(args.track, args.keyframes))
    print(f"wrote {path} ({len(cells)} expressions)" + (" (replaced the existing file)" if replaced else ""))
    return 0


def cmd_transition(args) -> int:
    from retarget.run import RunOptions
    from retarget.sheets import make_transition
    from retarget.weights import layout_from_args

    opts = dataclass_from_args(RunOptions, args)
    summary = make_transition(args.actor, args.keyframes, args.output, opts, fps=args.fps, easing=args.easing,
                              weights=layout_from_args(args))
    from retarget.transitions import transition_track_path

    print(summary.line())
    print(f"wrote the interpolated track {transition_track_path(args.output)} "
          "(render it onto another actor with retarget run DRIVE ACTOR --track ...)")
    return 0


# --------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from retarget.run import RunOptions, run
    from retarget.samples import sample_actor, write_sample_drive
    from render.storyboard import save_image
    from retarget.tiny import is_tiny, write_tiny_weights

    out_dir = Path(args.out)
    marker = out_dir / ".retarget-demo"  # the demo replaces its own sample files, never a user's
    mine = ("drive.mp4", "actor.png", "out.mp4", "out.preview.mp4")
    theirs = [n for n in mine if (out_dir / n).exists()] if not marker.exists() else []
    if theirs:
        raise RetargetError(f"--out {out_dir} already holds {', '.join(theirs)} not written by the demo: "
                            "choose another folder (the demo writes its sample inputs there)")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    weights = Path(args.weights) if args.weights else out_dir / "tiny-weights"
    if not args.weights and not is_tiny(weights):
        print(f"writing tiny random weights to {weights}")
        write_tiny_weights(weights)
    drive = out_dir / "drive.mp4"
    actor = out_dir / "actor.png"
    print("making the sample driving clip (mirrored, moving astronaut.png with a tone) and actor photo")
    write_sample_drive(drive, seconds=args.seconds)
    save_image(actor, sample_actor())
    opts = RunOptions(steps=args.steps, preview="side-by-side", device=args.device)
    summary = run(drive, actor, out_dir / "out.mp4", opts, weights=weights)
    print(summary.line())
    print()
    if is_tiny(weights):
        print("NOTE: these are TINY RANDOM weights: the output shows the whole path running "
              "(tracking, identity, adapters, paste-back, audio), but its pixels are meaningless.")
        print("For real results: retarget weights download --weights DIR (then the gated files it lists), "
              "retarget weights check --weights DIR, and retarget run DRIVE ACTOR -o OUT.mp4 --weights DIR")
    print(f"inputs: {drive}, {actor}")
    print(f"outputs: {summary.output}" + (f", {summary.preview}" if summary.preview else ""))
    return 0


# --------------------------------------------------------------------------- app

def cmd_app(args) -> int:
    from retarget.app.config import AppOptions
    from retarget.run import RENDER_WEIGHTS
    from retarget.weights import layout_from_args

    cfg = dataclass_from_args(AppOptions, args)
    cfg.validate()
    layout = layout_from_args(args)
    for name in RENDER_WEIGHTS + ("smirk_ckpt",):  # fail now, not at the first click
        layout.require(name)
    from retarget.app.layout import launch

    print(f"retarget app on http://{cfg.host}:{cfg.port} (weights {layout.root}); Ctrl+C stops it")
    launch(cfg, layout)
    return 0


# --------------------------------------------------------------------------- registration

def register(sub, formatter, examples, add_weights_arg) -> None:
    """Add the subcommands to the `retarget` parser's subparsers `sub`."""
    from retarget.run import RunOptions

    p = sub.add_parser(
        "run", help="driving video + actor photo -> video of the actor performing it",
        formatter_class=formatter,
        description="Track the driving video, then render the actor making the same expressions "
                    "(identity and reference computed once), paste back into the photo, keep the audio.",
        epilog=examples("""
            retarget run drive.mp4 actor.jpg -o out.mp4
            retarget run drive.mp4 actor.jpg -o out.mp4 --fast --preview side-by-side
            retarget run drive.mp4 actor.jpg -o out.mp4 --start 2 --end 6 --fps 12
            retarget run drive.mp4 actor.jpg -o out.mp4 --relative --gain jaw=1.2,eyelids=0.8
            retarget run drive.mp4 actor.jpg -o out.mp4 --track drive.track.npz --crop-only
            retarget run drive.mp4 actor.jpg -o out.mp4 --resume     # after an interruption
        """))
    p.add_argument("drive", help="driving video (mp4/mov/webm/mkv), folder of frames, or image")
    p.add_argument("actor", help="photo of the actor (the largest face is used), or a video of the actor: "
                                 "each output frame then takes its reference from the actor frame at that time")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mov or .mkv)")
    add_weights_arg(p)
    p.add_argument("--eval", action="store_true",
                   help="after rendering, evaluate the output (identity, expression, pose, flicker) into OUT.eval/")
    add_dataclass_options(p, RunOptions)
    from retarget.retake import RetakeOptions

    add_dataclass_options(p, RetakeOptions)
    p.epilog += examples("""
        retarget run drive.mp4 take.mp4 -o retake.mp4                  # re-perform a take (relative)
        retarget run drive.mp4 take.mp4 -o retake.mp4 --driver-end loop --actor-face 640,360
    """).replace("examples:", "", 1)
    from retarget.scale.options import add_ray_options

    add_ray_options(p)
    p.set_defaults(func=cmd_run)
    register_edit(sub, formatter, examples, add_weights_arg)

    from retarget.evaluate.cli import register_eval

    register_eval(sub, formatter, examples, add_weights_arg)

    p = sub.add_parser(
        "batch", help="many run / storyboard / transition jobs from one YAML file (optionally on Ray)",
        formatter_class=formatter,
        description="Check the whole jobs file, then run each job isolated (a bad input fails only that job), "
                    "print a summary table and keep a JSON status file; run it again to skip finished jobs "
                    "and resume the others. Exit code 1 when any job failed.",
        epilog=examples("""
            retarget batch jobs.yaml
            retarget batch jobs.yaml --ray                      # jobs' frames spread over the Ray workers
            retarget batch jobs.yaml --ray head-node:6379 --status /data/jobs.status.json
            jobs.yaml:
              defaults: {weights: ~/retarget-weights, fast: true}
              jobs:
                - {name: take1, command: run, drive: take1.mp4, actor: alice.jpg, output: out/take1.mp4}
                - {command: storyboard, actor: bob.jpg, output: out/bob.png, presets: "neutral,jaw_open"}
                - {command: transition, actor: bob.jpg, keyframes: keys.json, output: out/bob.mp4}
        """))
    p.add_argument("jobs", help="jobs file (YAML or JSON): a list under 'jobs:', optional 'defaults:'")
    p.add_argument("--status", default=None, metavar="JSON",
                   help="status file (default: JOBS.status.json beside the jobs file)")
    p.add_argument("--fresh", action="store_true", help="ignore the status file and work folders: redo every job")
    add_weights_arg(p)
    add_ray_options(p)
    p.set_defaults(func=cmd_batch)

    from tracking.export import CSV_WHICH
    from tracking.keyframes import EASINGS, PRESETS
    from tracking.tracker import TrackOptions

    p = sub.add_parser(
        "track", help="FLAME expression vectors per frame of a video (or one image) -> track file",
        formatter_class=formatter,
        description="Detect and follow one face, crop it for SMIRK, encode 55-d FLAME vectors (expression 50, "
                    "eyelids 2, jaw 3), fill frames without a face, smooth, and save a track file (v1 .npz).",
        epilog=examples("""
            retarget track drive.mp4 -o drive.track.npz
            retarget track drive.mp4 --plot --csv                 # also drive.track.png and .csv
            retarget track drive.mp4 --smoothing one_euro --beta 0.5
            retarget track frames_dir/ --image-fps 30
            retarget track actor.jpg                              # one image
        """))
    p.add_argument("input", help="video (mp4/mov/webm/mkv), folder of images, or an image")
    p.add_argument("-o", "--output", default=None, help="track file (default: INPUT.track.npz)")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG",
                   help="also plot jaw/eyelid/expression curves (default name: OUTPUT.png)")
    p.add_argument("--csv", nargs="?", const="", default=None, metavar="CSV",
                   help="also export a CSV (default name: OUTPUT.csv)")
    p.add_argument("--csv-columns", default="params", choices=CSV_WHICH,
                   help="CSV values: smoothed params, raw encoder output, or both (default: params)")
    add_weights_arg(p)
    add_dataclass_options(p, TrackOptions)
    p.set_defaults(func=cmd_track)

    p = sub.add_parser(
        "storyboard", help="one actor, a sheet of chosen expressions",
        formatter_class=formatter,
        description="Render the actor with several expressions (presets, keyframes, or frames of a track) "
                    "and lay them out on one labelled sheet.",
        epilog=examples(f"""
            retarget storyboard actor.jpg -o sheet.png --presets neutral,jaw_open,eyes_closed
            retarget storyboard actor.jpg -o sheet.png --track drive.track.npz --times 0.5,1.2,3.0
            retarget storyboard actor.jpg -o sheet.png --keyframes keys.json --paste-back
            retarget storyboard actor.jpg --script board.yaml -o board/   # panels from photos, clips, presets
            presets: {", ".join(PRESETS)} (and yours: retarget preset list)
        """))
    p.add_argument("actor", help="photo of the actor")
    p.add_argument("-o", "--output", required=True, help="sheet image (.png or .jpg); with --script, a folder")
    p.add_argument("--script", default=None, metavar="YAML",
                   help="a storyboard script (panels: source, caption, seed, exp_scale, ref_strength, gain): "
                        "writes panel PNGs, sheet.png and SCRIPT.resolved.yaml into the -o folder")
    p.add_argument("--presets", default=None, help="comma-separated preset names")
    p.add_argument("--keyframes", default=None, metavar="JSON", help="a keyframe file: one cell per keyframe")
    p.add_argument("--track", default=None, metavar="NPZ", help="a track file to pick frames from")
    p.add_argument("--times", default=None, help="seconds of the track to show, e.g. 0.5,1.2")
    p.add_argument("--frames", default=None, help="frame indices of the track to show, e.g. 10,40")
    p.add_argument("--columns", type=number(int, min=1), default=4, help="cells per row (default: 4)")
    p.add_argument("--cell", type=number(int, min=16), default=256, help="cell size in pixels (default: 256)")
    p.add_argument("--paste-back", action="store_true", help="show the whole photo instead of the aligned face")
    add_weights_arg(p)
    add_dataclass_options(p, RunOptions, exclude=DRIVING_ONLY + ("paste_back", "frames_dir", "resume", "work",
                                                                 "keep_work", "compile"))  # a sheet: eager
    p.set_defaults(func=cmd_storyboard)

    p = sub.add_parser(
        "transition", help="video of smooth expression changes between keyframes",
        formatter_class=formatter,
        description="Interpolate authored keyframes (JSON or YAML: time, source, hold, expression, eyelids, jaw) "
                    "at --fps and render the actor through them; a key's source is a photo, a clip moment, a track "
                    "row, a preset or numbers. Also writes OUTPUT.track.npz, the interpolated track.",
        epilog=examples("""
            retarget transition actor.jpg keys.json -o smile.mp4
            retarget transition actor.jpg keys.yaml -o smile.mp4 --fps 30 --easing cubic --fast
            keys.json: [{"time": 0, "preset": "neutral"}, {"time": 1, "jaw": 0.3}, {"time": 2, "eyelids": 1}]
            keys.yaml: [{time: 0, source: calm.jpg, hold: 0.5}, {time: 1.5, source: clip.mp4@2.4}]
        """))
    p.add_argument("actor", help="photo of the actor")
    p.add_argument("keyframes", help="keyframe file (JSON or YAML) or JSON text")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mov or .mkv)")
    p.add_argument("--fps", type=number(float, above=0), default=25.0, help="frame rate (default: 25)")
    p.add_argument("--easing", default="smoothstep", choices=EASINGS, help="interpolation (default: smoothstep)")
    add_weights_arg(p)
    add_dataclass_options(p, RunOptions, exclude=DRIVING_ONLY)
    p.set_defaults(func=cmd_transition)

    from retarget.app.config import AppOptions

    p = sub.add_parser(
        "app", help="the web app: retarget, expression studio, storyboards and transitions in the browser",
        formatter_class=formatter,
        description="Serve a Gradio app with four tabs (Retarget, Expression studio, Storyboard, Transitions) "
                    "over the same functions as the CLI. One GPU job runs at a time; others wait in the queue. "
                    "Listens on 127.0.0.1 unless --host says otherwise.",
        epilog=examples("""
            retarget app --weights ~/retarget-weights
            retarget app --weights ~/retarget-weights --port 8080 --max-video-s 120
            retarget weights tiny /tmp/tiny && retarget app --weights /tmp/tiny --device cpu   # try it offline
        """))
    add_weights_arg(p)
    add_dataclass_options(p, AppOptions)
    p.set_defaults(func=cmd_app)

    p = sub.add_parser(
        "demo", help="offline demo: tiny weights, sample clip and actor, full pipeline",
        formatter_class=formatter,
        description="Runs the whole path offline on tiny random weights and sample inputs made from "
                    "scikit-image's public-domain astronaut photo. The pixels are meaningless; the plumbing is real.",
        epilog=examples("""
            retarget demo
            retarget demo --out /tmp/demo --seconds 1
            retarget demo --weights ~/retarget-weights --steps 25    # the sample inputs on real weights
        """))
    p.add_argument("--out", default="retarget-demo", help="folder for inputs and outputs (default: retarget-demo)")
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="use this weights folder instead of tiny random weights")
    p.add_argument("--seconds", type=number(float, above=0), default=2.0, help="length of the sample driving clip (default: 2)")
    p.add_argument("--steps", type=number(int, min=1), default=4, help="denoising steps (default: 4, enough for tiny weights)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.set_defaults(func=cmd_demo)

    from retarget import preset_cli

    preset_cli.register(sub, formatter, examples, add_weights_arg)

    from retarget.train.commands import register as register_training

    register_training(sub, formatter, examples, add_weights_arg)


# --------------------------------------------------------------------------- edit (an actor video)

def cmd_edit(args) -> int:
    from retarget.retake import EditOptions, RetakeOptions, edit
    from retarget.run import RunOptions
    from retarget.weights import layout_from_args

    if args.add is None:
        from retarget.sources import HELP

        raise RetargetError(f"edit: --add SOURCE is required: {HELP}")
    summary = edit(args.actor, args.output, dataclass_from_args(EditOptions, args),
                   dataclass_from_args(RunOptions, args, start=None, end=None, gain=None),
                   dataclass_from_args(RetakeOptions, args),
                   weights=layout_from_args(args))
    print(summary.line())
    return 0


def register_edit(sub, formatter, examples, add_weights_arg) -> None:
    """`retarget edit ACTOR.mp4 --add SOURCE`: change the expressions of real footage."""
    from retarget.retake import EditOptions, RetakeOptions
    from retarget.run import RunOptions
    from tracking.keyframes import PRESETS

    p = sub.add_parser(
        "edit", help="actor video + an expression -> the same take with that expression added",
        formatter_class=formatter,
        description="Track the take's own expressions, add the offset of an expression source from neutral "
                    "over a time range (eased in and out), and re-render each frame with that frame as its "
                    "reference: head motion, light and background stay as filmed.",
        epilog=examples(f"""
            retarget edit take.mp4 --add '{{"jaw": 0.2}}' -o edited.mp4
            retarget edit take.mp4 --add smile.jpg --gain 0.6 --start 2 --end 3.5 --ease 0.3 -o edited.mp4
            retarget edit take.mp4 --add other.mp4@1.2 --gain jaw=0,expression=0.8 -o edited.mp4
            retarget edit take.mp4 --add jaw_open --gain 0.5 --start 1 --end 1.4 -o edited.mp4
            built-in presets: {", ".join(PRESETS)} (and yours: retarget preset list)
        """))
    p.add_argument("actor", help="video of the actor (mp4/mov/webm/mkv) or a folder of frames")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mov or .mkv)")
    add_weights_arg(p)
    add_dataclass_options(p, EditOptions)
    p.set_defaults(add=None)
    # --smooth smooths the take's own expressions; --preview shows actor | output.
    add_dataclass_options(p, RunOptions, exclude=tuple(k for k in DRIVING_ONLY if k not in ("smooth", "preview"))
                          + ("compile",))  # actor videos render eagerly
    add_dataclass_options(p, RetakeOptions, exclude=("absolute", "driver_end", "drive_face"))
    p.set_defaults(func=cmd_edit)
