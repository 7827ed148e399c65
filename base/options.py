"""A command's options as one pydantic model, and its argparse flags made from that model, so that each option's
name, default and help are written once and the API and the CLI refuse the same values in the same words.

A field's `description` is its flag's help (`%(default)s` in it is the field's default); a `Flag` in its annotation
names the flag when it is not `--` + the field name with dashes, and how its text is read; a bool is a switch that
sets the opposite of its default. Unknown fields are refused (a misspelt option must not do nothing), and every
mistake is one ConfigError line naming the flag.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from gqa_uptrain.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line: its flag names (one name without dashes: a positional argument,
    shown as `metavar`), and the function that reads its text (default: pydantic reads the text itself). A list
    given as several words after the flag has argparse's `nargs="+"`, one given by repeating the flag
    `action="append"`."""

    names: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    nargs: str | None = None
    action: str | None = None


class Options(BaseModel):
    """Frozen, unknown fields refused, and a ValidationError turned into one ConfigError line naming the flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError("; ".join(_describe(type(self), item) for item in error.errors())) from None

    @classmethod
    def flag(cls, field: str) -> str:
        """The longest command-line name of `field`, as messages name it."""
        return max(_flag(cls.model_fields[field]).names or (f"--{field.replace('_', '-')}",), key=len)


def _flag(field: FieldInfo) -> Flag:
    return next((item for item in field.metadata if isinstance(item, Flag)), Flag())


def add_flags(parser: argparse._ActionsContainer, options: type[Options], fields: Iterable[str] | None = None) -> None:
    """One argument per field of `options` (or of `fields` only, e.g. one --help section's, into its argument group):
    positional, required or with the field's default; a bool is a switch, a Literal a choice."""
    for name in options.model_fields if fields is None else fields:
        field = options.model_fields[name]
        flag = _flag(field)
        names = flag.names or (f"--{name.replace('_', '-')}",)
        settings: dict[str, Any] = {"help": field.description}
        if field.annotation is bool:
            settings["action"] = "store_false" if field.default is True else "store_true"
        else:
            settings.update(type=flag.parse, metavar=flag.metavar, nargs=flag.nargs, action=flag.action)
            if typing.get_origin(field.annotation) is typing.Literal:
                settings["choices"] = typing.get_args(field.annotation)
        if not names[0].startswith("-"):
            parser.add_argument(name, **{**settings, "metavar": flag.metavar or names[0]})
            continue
        if field.is_required():
            settings["required"] = True
        else:
            settings["default"] = field.get_default(call_default_factory=True)
        parser.add_argument(*names, dest=name, **settings)


def whole_number(text: str) -> int:
    """An integer as a person writes a count: 32768, 32_768 or 3.2768e4. Its range is the options model's to
    check, so that the API refuses the same values in the same words."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def _describe(options: type[Options], item: dict) -> str:
    """One pydantic error as one clause naming the flag; a check of several fields says its own words."""
    field = str(item["loc"][0]) if item["loc"] else None
    flag = options.flag(field) if field in options.model_fields else f"--{str(field).replace('_', '-')}"
    kind = item["type"]
    if kind == "extra_forbidden":
        return f"unknown option {field!r}"
    if kind == "missing":
        return f"{flag} is required"
    if kind == "value_error":
        return f"{flag} {item['ctx']['error']}" if field else str(item["ctx"]["error"])
    return f"{flag}: {item['msg']} (got {item['input']!r})"
