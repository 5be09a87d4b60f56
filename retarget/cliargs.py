"""Build argparse options from typed dataclasses, so `--help` and defaults never drift from code.

A field becomes `--field-name`; its `metadata` may hold `help`, `choices`, `flag` (another
option string, e.g. "-o"), `metavar`, and `negative` (for a bool that defaults to True:
the name of the switch that turns it off, e.g. "--crop-only" for paste_back).

Values are checked in one place, `check_options`, which the CLI calls right after parsing
(before any video is read or model loaded; exit 2) and the library calls at the top of each job.
Rules come from the field's type (a float must be finite, a Literal one of its values) and
metadata `min` (>=), `above` (>), `max` (<=); a dataclass may add cross-field rules in a
`validate()` method that raises RetargetError.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any

from render.errors import RetargetError


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
    # main() checks every option dataclass of the chosen subcommand right after parsing.
    parser.set_defaults(option_classes=(*(parser.get_default("option_classes") or ()), cls))
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


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def check_options(obj) -> None:
    """RetargetError naming the option (`--steps: must be >= 1, got -3`) when a field of the
    dataclass instance `obj` breaks its rules (see the module docstring); then `obj.validate()`."""
    hints = typing.get_type_hints(type(obj), include_extras=False)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        name, meta = option_name(f.name), f.metadata
        tp = _base_type(hints[f.name])
        literal = next((a for a in [hints[f.name], *typing.get_args(hints[f.name])]
                        if typing.get_origin(a) is typing.Literal), None)
        choices = meta.get("choices") or (typing.get_args(literal) if literal is not None else None)
        if choices is not None and value not in choices:
            raise RetargetError(f"{name}: choose one of {', '.join(map(str, choices))}, got {value!r}")
        if tp is bool or tp not in (int, float):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RetargetError(f"{name}: expected a number, got {value!r}")
        if tp is int and not float(value).is_integer():
            raise RetargetError(f"{name}: expected a whole number, got {value!r}")
        if not math.isfinite(value):
            raise RetargetError(f"{name}: must be a finite number, got {value}")
        if "min" in meta and value < meta["min"]:
            raise RetargetError(f"{name}: must be >= {meta['min']}, got {value:g}")
        if "above" in meta and value <= meta["above"]:
            raise RetargetError(f"{name}: must be > {meta['above']}, got {value:g}")
        if "max" in meta and value > meta["max"]:
            raise RetargetError(f"{name}: must be <= {meta['max']}, got {value:g}")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def check_parsed(args: argparse.Namespace) -> None:
    """`check_options` on every option dataclass the chosen subcommand was built from."""
    for cls in getattr(args, "option_classes", ()) or ():
        check_options(dataclass_from_args(cls, args))


def number(kind: type, *, min: float | None = None, above: float | None = None):
    """An argparse `type=` for plain (non-dataclass) options: a finite `kind` within the bounds."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            whole = "whole " if kind is int else ""
            raise argparse.ArgumentTypeError(f"expected a {whole}number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if min is not None and value < min:
            raise argparse.ArgumentTypeError(f"must be >= {min}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse
