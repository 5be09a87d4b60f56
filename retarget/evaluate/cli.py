"""`retarget eval` and `retarget run --eval`: argument parsing and printing only (the work is
`retarget.evaluate.evaluate` and `write_outputs`)."""

from __future__ import annotations

from pathlib import Path

from retarget.cliargs import add_dataclass_options, dataclass_from_args
from retarget.weights import layout_from_args


def default_report_dir(output: str | Path) -> Path:
    """Where the report goes when -o is not given: `OUT.eval/` beside the output video."""
    output = Path(output)
    return output.with_name(output.stem + ".eval")


def cmd_eval(args) -> int:
    from retarget.evaluate import EvalInputs, EvalOptions, evaluate, write_outputs
    from retarget.evaluate.core import metrics_json, summary_text

    inputs = EvalInputs(Path(args.video), Path(args.drive), Path(args.actor),
                        Path(args.track) if args.track else None)
    report = Path(args.output) if args.output else default_report_dir(args.video)
    opts = dataclass_from_args(EvalOptions, args)
    result = evaluate(inputs, opts, weights=layout_from_args(args), report_dir=report, progress=not args.json, log=None)
    paths = write_outputs(result, report)
    if args.json:
        print(metrics_json(result.metrics))
    else:
        print(summary_text(result.metrics))
        print(f"wrote {paths['report']} and {paths['metrics']}")
    return 0


def eval_after_run(args, run_opts, summary) -> Path:
    """`retarget run --eval`: judge the finished output against its inputs, with the vectors the
    run rendered as the SMIRK target, into OUT.eval/. Returns the report folder."""
    from retarget.evaluate import EvalInputs, EvalOptions, evaluate, write_outputs
    from retarget.evaluate.core import summary_text

    report = default_report_dir(summary.output)
    inputs = EvalInputs(Path(summary.output), Path(args.drive), Path(args.actor), params=summary.params)
    opts = EvalOptions(start=float(run_opts.start or 0.0), relative=run_opts.relative,
                       neutral_frame=run_opts.neutral_frame,
                       device=run_opts.device if run_opts.device in ("cpu", "cuda") else "auto")
    result = evaluate(inputs, opts, weights=layout_from_args(args), report_dir=report, log=None)
    paths = write_outputs(result, report)
    print(summary_text(result.metrics))
    print(f"wrote {paths['report']} and {paths['metrics']}")
    return report


def register_eval(sub, formatter, examples, add_weights_arg) -> None:
    """Add `retarget eval` to the CLI's subparsers."""
    from retarget.evaluate import EvalOptions

    p = sub.add_parser(
        "eval", help="judge an output video: identity, expression fidelity, head pose, flicker",
        formatter_class=formatter,
        description="Compare an output video with its driving clip (matched by timestamps) and the actor photo. "
                    "Independent judges: dlib's face descriptor (identity; same person under 0.6) and 68 landmarks "
                    "(expression geometry, LMD, head pose); SMIRK and ArcFace (the method's own models) where their "
                    "files are in the weights folder. Writes metrics.json, per_frame.csv and report.html.",
        epilog=examples("""
            retarget eval out.mp4 --drive drive.mp4 --actor actor.jpg -o report/
            retarget eval out.mp4 --drive drive.mp4 --actor actor.jpg --track drive.track.npz --every 5
            retarget eval out.mp4 --drive drive.mp4 --actor actor.jpg --start 2 --relative   # run --start 2 --relative
            retarget eval out.mp4 --drive drive.mp4 --actor actor.jpg --json > metrics.json
            retarget run drive.mp4 actor.jpg -o out.mp4 --eval                             # the same, after a run
        """))
    p.add_argument("video", help="the output video to judge (or a folder of frames)")
    p.add_argument("--drive", required=True, help="the driving video the output follows")
    p.add_argument("--actor", required=True, help="the actor photo whose identity the output should keep")
    p.add_argument("--track", default=None, metavar="NPZ",
                   help="the run's track file: its params are the SMIRK target (default: re-track the driving clip)")
    p.add_argument("-o", "--output", default=None, metavar="DIR", help="report folder (default: VIDEO.eval/)")
    p.add_argument("--json", action="store_true", help="print only the metrics as JSON (the report is still written)")
    add_weights_arg(p)
    add_dataclass_options(p, EvalOptions)
    p.set_defaults(func=cmd_eval)
