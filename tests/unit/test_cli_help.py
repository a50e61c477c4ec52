"""Every command's --help reads as a person expects: no Python type labels, no doubled brackets on the
usage line, flags without a value, and text wrapped to the terminal rather than to the source.

The commands are found by walking the Click tree Typer builds, so a command added later is checked too.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator

import pytest
import typer
import typer.main
from typer._click.core import Command
from typer.core import TyperArgument, TyperOption
from typer.testing import CliRunner

from certsync.cli import cli

WIDTHS = (80, 120)

# Typer 0.29's own labels: <bool>, <str>, <int>, <int range>, <float>, <path>, <list[str]>, ...
TYPE_LABEL = re.compile(r"<(?:bool|str|int|float|path|file|dir|uuid|datetime|list\[)[^>]*>")


def _commands() -> Iterator[tuple[tuple[str, ...], Command]]:
    def walk(command: Command, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Command]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, (*path, name))

    yield from walk(typer.main.get_command(cli), ())


COMMANDS = dict(_commands())


def _help(path: tuple[str, ...], width: int) -> str:
    result = CliRunner().invoke(cli, [*path, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_walk_finds_every_command() -> None:
    # Guards the walk itself: nested groups are reached, not only the root's direct commands.
    assert {("queue", "replay"), ("breaker", "reset"), ("renewal-events", "migrate"), ("demo",)} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda path: " ".join(path) or "certsync")
def test_help_shows_no_type_labels_and_a_clean_usage_line(path: tuple[str, ...], width: int) -> None:
    text = _help(path, width)
    assert not TYPE_LABEL.search(text), text
    assert "[[" not in text, text
    assert "]...]..." not in text, text
    assert "......" not in text, text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert usage.split("Usage:")[1].split()[:1] == ["certsync"], usage


def _row(text: str, opt: str) -> str:
    """What follows ``opt`` on its row of the options panel, up to the panel's right border."""
    # The option opens its row: `│ --json   Print...`, or `│ *  --reason  TEXT  Why...` when required.
    rows = [line for line in text.splitlines() if re.match(rf"│\s+(?:\*\s+)?{re.escape(opt)}\s", line)]
    assert rows, f"{opt} is not listed:\n{text}"
    return rows[0].split(opt, 1)[1].rstrip(" │")


def _first_word(help_text: str | None) -> str:
    return next(iter((help_text or "").split()), "")


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda path: " ".join(path) or "certsync")
def test_flags_show_no_value_and_value_options_a_metavar(path: tuple[str, ...], width: int) -> None:
    text = _help(path, width)
    command = COMMANDS[path]
    for param in command.get_params(typer.Context(command)):
        if getattr(param, "hidden", False) or isinstance(param, TyperArgument):
            continue
        assert isinstance(param, TyperOption)
        opt = max(param.opts, key=len)
        after = _row(text, opt)
        if param.is_flag:
            # Nothing between the flag and its help: `--json   Print one JSON object.`
            assert _first_word(after) == _first_word(param.help), f"{opt}: {after!r}"
        else:
            shown = _first_word(after)
            assert shown != _first_word(param.help), f"{opt} shows no value: {after!r}"
            assert not shown.startswith("<"), f"{opt}: {after!r}"


@pytest.mark.parametrize(
    ("path", "usage"),
    [
        (("queue", "replay"), "certsync queue replay [OPTIONS] [ID]..."),
        (("queue", "discard"), "certsync queue discard [OPTIONS] ID..."),
        (("queue", "show"), "certsync queue show [OPTIONS] ID"),
        (("history",), "certsync history [OPTIONS] [CERTIFICATION_ID]"),
        (("backfill",), "certsync backfill [OPTIONS] [ID]..."),
    ],
)
def test_arguments_are_named_once_on_the_usage_line(path: tuple[str, ...], usage: str) -> None:
    assert f"Usage: {usage}" in " ".join(_help(path, 120).split())


def _paragraphs(help_text: str | None) -> list[str]:
    return [" ".join(p.split()) for p in inspect.cleandoc(help_text or "").split("\n\n") if p.strip()]


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda path: " ".join(path) or "certsync")
def test_help_text_wraps_to_the_terminal_not_to_the_source(path: tuple[str, ...]) -> None:
    # Docstrings are wrapped for the source; on a terminal wide enough, each paragraph is one line (its
    # command's first paragraph too, in its group's command list), not broken where the source broke it.
    lines = [" ".join(line.strip(" │").split()) for line in _help(path, 400).splitlines()]
    command = COMMANDS[path]
    expected = _paragraphs(command.help)
    for sub in getattr(command, "commands", {}).values():
        expected += _paragraphs(sub.help)[:1]
    for paragraph in expected:
        assert any(paragraph in line for line in lines), f"{paragraph!r} is broken:\n" + "\n".join(lines)
