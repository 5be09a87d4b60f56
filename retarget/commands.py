"""Subcommands beyond `weights`: track, run, storyboard, transition, demo (registered into the CLI)."""

from __future__ import annotations


def register(sub, formatter, examples, add_weights_arg) -> None:
    """Add the subcommands to the `retarget` parser's subparsers `sub`."""
