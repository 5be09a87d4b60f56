"""The `retarget` command line: subcommands, examples, and one-line errors.

Every subcommand's work lives in a library function; this module parses, calls, and turns
`RetargetError` (and a few well-known failures such as running out of GPU memory) into
`error: <one line>` with a non-zero exit code. Set RETARGET_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from render.errors import RetargetError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


def _add_weights_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="DIR", default=None,
                   help="weights folder (default: $RETARGET_WEIGHTS, else ~/.cache/retarget/weights)")
    p.add_argument("--sd15", metavar="DIR", default=None,
                   help="a Stable Diffusion 1.5 folder for vae/, scheduler/, tokenizer/ when the weights folder lacks "
                        "them (default: $RETARGET_SD15, else the local Hugging Face cache when it holds SD 1.5)")


# --------------------------------------------------------------------------- weights

def cmd_weights_check(args) -> int:
    from retarget.weights import check_weights, format_check_table, layout_from_args, ready_for_run

    layout = layout_from_args(args)
    rows = check_weights(layout)
    print(format_check_table(rows, layout.root))
    ok = ready_for_run(rows)
    print("\nready for `retarget run`" if ok else "\nnot ready for `retarget run`: see MISSING/BAD lines above")
    return 0 if ok else EXIT_ERROR


def cmd_weights_download(args) -> int:
    from retarget.weights import download_weights, layout_from_args

    layout = layout_from_args(args)
    gated = download_weights(layout, include_fast=not args.no_lcm)
    if gated:
        print("\nThese files are gated or hosted elsewhere; fetch them by hand:")
        for line in gated:
            print("  - " + line)
    print(f"\nthen check with: retarget weights check --weights {layout.root}")
    return 0


def cmd_weights_tiny(args) -> int:
    from retarget.tiny import write_tiny_weights

    root = write_tiny_weights(args.dir, exp_projection=args.exp_projection)
    print(f"wrote a tiny random weight set to {root}")
    print("It loads through the same code as the released weights but gives meaningless pixels.")
    print(f"check it with: retarget weights check --weights {root}")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retarget", formatter_class=_Formatter,
        description="Re-render an actor's face performing someone else's facial performance.",
        epilog=_examples("""
            retarget demo                                  # offline demo on tiny weights
            retarget weights check                         # what is installed, what is missing
            retarget track drive.mp4 -o drive.track.npz    # FLAME expressions from a video
            retarget run drive.mp4 actor.jpg -o out.mp4    # the main job
        """))
    from retarget import __version__

    parser.add_argument("--version", action="version", version=f"retarget {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # weights
    pw = sub.add_parser("weights", help="check, download or fake the model weights", formatter_class=_Formatter,
                        description="Manage the weights folder (the release layout of SPEC.md §1).",
                        epilog=_examples("""
                            retarget weights check --weights ~/models/retarget
                            retarget weights download --weights ~/models/retarget
                            retarget weights tiny /tmp/tiny && retarget weights check --weights /tmp/tiny
                        """))
    wsub = pw.add_subparsers(dest="weights_command", metavar="ACTION")
    wsub.required = True
    p = wsub.add_parser("check", help="table of every file: present, size, licence, source; exit 0 when ready to run",
                        formatter_class=_Formatter, epilog=_examples("retarget weights check --weights DIR"))
    _add_weights_arg(p)
    p.set_defaults(func=cmd_weights_check)
    p = wsub.add_parser("download", help="fetch the Hugging Face files; print how to get the gated ones",
                        formatter_class=_Formatter, epilog=_examples("RETARGET_WEIGHTS=~/w retarget weights download"))
    _add_weights_arg(p)
    p.add_argument("--no-lcm", action="store_true", help="skip the optional LCM-LoRA (used by --fast)")
    p.set_defaults(func=cmd_weights_download)
    p = wsub.add_parser("tiny", help="write a tiny random weight set in the release layout (tests, demo)",
                        formatter_class=_Formatter, epilog=_examples("retarget weights tiny /tmp/tiny"))
    p.add_argument("dir", help="folder to write (created if needed)")
    p.add_argument("--exp-projection", default="linear", choices=("linear", "faceid", "full"),
                   help="projection type of the tiny Expression Adapter (default: linear)")
    p.set_defaults(func=cmd_weights_tiny)

    from retarget import commands

    commands.register(sub, _Formatter, _examples, _add_weights_arg)
    return parser


def _describe_unexpected(e: BaseException) -> str | None:
    """One-line messages for failures that are the environment's, not ours."""
    name = type(e).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return "out of GPU memory: try a smaller --batch, --fast, or close other GPU programs"
    if isinstance(e, MemoryError):
        return "out of memory: try a smaller --batch or a shorter clip (--start/--end)"
    if isinstance(e, OSError) and e.errno == 28:
        return f"disk full while writing {e.filename or 'output'}: free some space and run again (--resume keeps finished frames)"
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("RETARGET_DEBUG") == "1"
    from retarget.cliargs import check_parsed

    try:  # every option value, before any video is read or model loaded
        check_parsed(args)
    except RetargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except RetargetError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a last line of defence: one line, traceback on request
        if debug:
            raise
        known = _describe_unexpected(e)
        if known:
            print(f"error: {known}", file=sys.stderr)
        else:
            print(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  "(set RETARGET_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
