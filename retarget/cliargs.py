"""Build argparse options from typed dataclasses, so `--help` and defaults never drift from code.

A field becomes `--field-name`; its `metadata` may hold `help`, `choices`, `flag` (another
option string, e.g. "-o"), `metavar`, and `negative` (for a bool that defaults to True:
the name of the switch that turns it off, e.g. "--crop-only" for paste_back).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _base_type(tp: Any) -> Any:
    """`float | None` -> float; `Literal[...]` -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0])
    return tp


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """Add one option per field of dataclass `cls` to `parser` (defaults from the dataclass)."""
    hints = typing.get_type_hints(cls, include_extras=False)
    group = parser.add_argument_group(cls.__name__.replace("Options", " options").strip().lower())
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        meta = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        names = [f"--{f.name.replace('_', '-')}"] + ([meta["flag"]] if "flag" in meta else [])
        help_text = meta.get("help", "")
        tp = _base_type(hints[f.name])
        if tp is bool:
            if "negative" in meta:
                group.add_argument(*names, dest=f.name, action="store_true", default=default,
                                   help=f"{help_text} (default)" if default else help_text)
                group.add_argument(meta["negative"], dest=f.name, action="store_false",
                                   help=meta.get("negative_help", f"opposite of {names[0]}"))
            elif not default:
                group.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            else:
                group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=default, help=help_text)
            continue
        choices = meta.get("choices")
        if choices is None and typing.get_origin(hints[f.name]) is typing.Literal:
            choices = typing.get_args(hints[f.name])
        shown = "" if default is None else f" (default: {default})"
        group.add_argument(*names, dest=f.name, type=tp, default=default, choices=choices,
                           metavar=meta.get("metavar"), help=help_text + shown)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides):
    """Instantiate `cls` from the parsed namespace (fields missing there keep their defaults)."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)
