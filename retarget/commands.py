"""Subcommands beyond `weights`: track, run, storyboard, transition, demo (registered into the CLI)."""

from __future__ import annotations

import os
from pathlib import Path

from render.errors import RetargetError
from retarget.cliargs import add_dataclass_options, dataclass_from_args


# --------------------------------------------------------------------------- run

def cmd_run(args) -> int:
    from retarget.run import RunOptions, run

    opts = dataclass_from_args(RunOptions, args)
    summary = run(args.drive, args.actor, args.output, opts, weights=args.weights)
    print(summary.line())
    return 0


# --------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from retarget.run import RunOptions, run
    from retarget.samples import sample_actor, write_sample_drive
    from render.storyboard import save_image
    from retarget.tiny import is_tiny, write_tiny_weights

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    p.add_argument("actor", help="photo of the actor (the largest face is used)")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mov or .mkv)")
    add_weights_arg(p)
    add_dataclass_options(p, RunOptions)
    p.set_defaults(func=cmd_run)

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
    p.add_argument("--seconds", type=float, default=2.0, help="length of the sample driving clip (default: 2)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default: 4, enough for tiny weights)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.set_defaults(func=cmd_demo)
