"""The `retarget dataset build` and `retarget train expression|reference` subcommands (registered by
retarget.commands). Parsing only: the work is `dataset_build.build_dataset` and `loop.train`."""

from __future__ import annotations

from retarget.cliargs import add_dataclass_options, dataclass_from_args
from retarget.weights import layout_from_args


def cmd_dataset_build(args) -> int:
    from retarget.train.dataset_build import DatasetOptions, build_dataset

    opts = dataclass_from_args(DatasetOptions, args)
    summary = build_dataset(args.sources, args.output, weights=layout_from_args(args), options=opts)
    print(summary.text())
    if summary.corrupt:
        print(f"{len(summary.corrupt)} source(s) could not be read and were skipped (see above)")
    return 0


def cmd_train(args) -> int:
    from retarget.train.loop import train
    from retarget.train.options import TrainOptions

    opts = dataclass_from_args(TrainOptions, args)
    result = train(args.mode, args.data, args.output, opts, weights=layout_from_args(args))
    if result.adapter is not None:  # the main process (the others of a data-parallel run stay quiet)
        print(result.line())
    return 0


def register(sub, formatter, examples, add_weights_arg) -> None:
    """Add `dataset` and `train` to the `retarget` parser's subparsers `sub`."""
    from retarget.train.dataset_build import DatasetOptions
    from retarget.train.options import TrainOptions

    p = sub.add_parser("dataset", help="build a training set of aligned faces from photos and videos",
                       formatter_class=formatter,
                       description="Training data for `retarget train` (WebDataset shards + manifest.json).",
                       epilog=examples("retarget dataset build takes/ -o data/ --weights ~/w"))
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    dsub.required = True
    p = dsub.add_parser(
        "build", help="photos, folders, videos -> FFHQ crops, ArcFace and SMIRK vectors, video pairs",
        formatter_class=formatter,
        description="For each sampled frame, the largest face (blurry and tiny faces skipped and counted): "
                    "the FFHQ-aligned crop, its ArcFace embedding, the SMIRK 55-d vector and where it came from; "
                    "plus Reference Adapter pairs (frames of one video with different expressions). "
                    "Corrupt sources are reported and skipped.",
        epilog=examples("""
            retarget dataset build actor_takes/ -o data/ --weights ~/w
            retarget dataset build take1.mp4 take2.mp4 stills/ -o data/ --sample-fps 4 --min-face 160
        """))
    p.add_argument("sources", nargs="+", help="photos, videos, or folders of them (searched recursively)")
    p.add_argument("-o", "--output", required=True, help="new dataset folder (must not exist or be empty)")
    add_weights_arg(p)
    add_dataclass_options(p, DatasetOptions)
    p.set_defaults(func=cmd_dataset_build)

    p = sub.add_parser(
        "train", help="fine-tune the Expression or Reference Adapter on a dataset",
        formatter_class=formatter,
        description="Train one adapter with the UNet and text encoder frozen (noise-prediction loss, condition "
                    "dropout for CFG), on accelerate: mixed precision, gradient accumulation and checkpointing, "
                    "data parallel over GPUs with `accelerate launch`. Writes checkpoints, a loss curve, "
                    "validation renders and the adapter in the release format (RUN/final, RUN/weights).",
        epilog=examples("""
            retarget train expression data/ --weights ~/w -o runs/exp1
            retarget train reference data/ --weights ~/w -o runs/ref1 --batch-size 4 --grad-accum 2
            retarget train expression data/ --weights ~/w -o runs/exp1 --resume --steps 4000
            accelerate launch --num_processes 4 -m retarget.cli train expression data/ --weights ~/w -o runs/exp4
            retarget run drive.mp4 actor.jpg -o out.mp4 --weights runs/exp1/weights   # use the result
        """))
    p.add_argument("mode", choices=("expression", "reference"), help="which adapter to train")
    p.add_argument("data", help="dataset folder from `retarget dataset build`")
    p.add_argument("-o", "--output", required=True, help="run folder (new, or an existing run with --resume)")
    add_weights_arg(p)
    add_dataclass_options(p, TrainOptions)
    p.set_defaults(func=cmd_train)
