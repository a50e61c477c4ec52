"""Help pages as a person expects them, for every command at once.

Typer 0.29 labels each parameter with its Python type (``--limit <int>``, ``--json <bool>``, even
``--help <bool>``), lists an argument's type beside its name (``ID <list[str]>``) and wraps an
argument's metavar a second time on the usage line (``[[ID]...]...``). Here, as plain Click shows them:

* a flag shows no value at all: ``--json``;
* an option that takes a value shows its metavar (``--limit N``), else Click's name for its type
  (``--reason TEXT``, ``--seed INTEGER``, ``--tls-cert PATH``, ``[a|b]`` for a choice);
* an argument is named once, in capitals: ``ID`` (required), ``[ID]`` (optional), ``[ID]...`` (any
  number); its metavar, where one is declared, is that name (``metavar="ID"``, not ``"[ID]..."``).

Typer builds the parameters itself, with no hook for their class. So every command lists its
parameters (the help option included, which Click adds late) through ``get_params``, which gives each
one the matching class below: they only override how a parameter is shown and add no state.
``CertsyncTyper`` makes these the command and group classes of every app and command it declares.

In Rich markup mode Typer keeps a docstring's line breaks (in the group's command list and in every
paragraph after the first), so text wrapped for the source broke mid-sentence on the terminal. Each
command's help is kept with every paragraph on one line, which Rich wraps to the terminal's width; a
paragraph marked ``\\b`` keeps its lines, as in Click.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import PurePath
from typing import Any, get_args
from uuid import UUID

import typer
from typer._click.core import Context, Parameter
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

# Click's names for the types it converts (click.types: STRING.name is "text", and so on).
_CLICK_TYPE_NAMES: dict[object, str] = {
    str: "TEXT",
    int: "INTEGER",
    float: "FLOAT",
    bool: "BOOLEAN",
    UUID: "UUID",
}
_PATH_NAMES = {"file": "FILE", "dir": "DIRECTORY"}


def _type_name(annotation: object) -> str:
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "PATH"
    known = _CLICK_TYPE_NAMES.get(annotation)
    return known or getattr(annotation, "__name__", "VALUE").upper()


def _choice(value: object) -> str:
    return str(value.value if isinstance(value, Enum) else value)


class CertsyncOption(TyperOption):
    def display_type_rich(self, ctx: Context) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar:
            return self.metavar
        described = self.type_descriptor
        if described.choices is not None:
            label = "[" + "|".join(_choice(value) for value in described.choices) + "]"
        elif described.is_path:
            label = _PATH_NAMES.get(described.path_type, "PATH")
        elif described.is_tuple:
            label = " ".join(_type_name(part) for part in get_args(described.annotation))
        else:
            annotation = described.annotation
            label = _type_name(get_args(annotation)[0] if described.is_list else annotation)
            if described.is_ranged:
                label += " RANGE"  # the range itself follows, as Typer writes it: [1<=x<=65535]
        return label if self.nargs == 1 else f"{label}..."


class CertsyncArgument(TyperArgument):
    @property
    def display_name_raw(self) -> str:  # the name in the Arguments panel and in error messages
        name = self.metavar or (self.name or "").upper()
        return name if self.nargs == 1 else f"{name}..."

    def display_type_rich(self, ctx: Context) -> str | None:
        return None  # its name already says what it is

    def get_usage_pieces(self, ctx: Context) -> list[str]:
        name = self.metavar or (self.name or "").upper()
        if not self.required:
            name = f"[{name}]"
        return [name if self.nargs == 1 else f"{name}..."]


def _shown_as_certsync(params: list[Parameter]) -> list[Parameter]:
    for param in params:
        if isinstance(param, TyperArgument) and not isinstance(param, CertsyncArgument):
            if param.metavar is None:
                # The Arguments panel adds "..." itself to an argument without a metavar.
                param.metavar = (param.name or "").upper()
            param.__class__ = CertsyncArgument
        elif isinstance(param, TyperOption) and not isinstance(param, CertsyncOption):
            param.__class__ = CertsyncOption
    return params


def _reflowed(help_text: str | None) -> str | None:
    """Every paragraph of ``help_text`` on one line (but one marked ``\\b``); what follows ``\\f``, which
    help never shows, as it is."""
    if not help_text:
        return help_text
    shown, mark, hidden = inspect.cleandoc(help_text).partition("\f")
    paragraphs = shown.split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs) + mark + hidden


class CertsyncCommand(TyperCommand):
    def __init__(self, name: str | None, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.help = _reflowed(self.help)

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _shown_as_certsync(super().get_params(ctx))


class CertsyncGroup(TyperGroup):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.help = _reflowed(self.help)

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _shown_as_certsync(super().get_params(ctx))


class CertsyncTyper(typer.Typer):
    """A Typer app whose groups and commands show their help as this module describes."""

    def __init__(self, *, cls: type[TyperGroup] | None = CertsyncGroup, **kwargs: Any) -> None:
        super().__init__(cls=cls, **kwargs)

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = CertsyncCommand, **kwargs: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(name, cls=cls, **kwargs)
