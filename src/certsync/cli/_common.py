"""Shared by every command: the root Typer app, settings loading and the exit-code mapping.

Exit codes: 0 done; 1 an operational failure (database or Dynamics unreachable, a replay that
failed); 2 bad input or configuration; 130 interrupted. A failure is always one clear line on
stderr and never a traceback — including Click's own usage errors, which ``_CertsyncGroup`` turns
into one line instead of a boxed panel.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from certsync.cli._help import CertsyncGroup, CertsyncTyper
from certsync.errors import CertsyncError
from certsync.logs import configure_logging
from certsync.settings import Settings

T = TypeVar("T")

INTERRUPTED = 130
"""The shell's convention for a process ended by SIGINT (128 + 2)."""

# Soft wrap: a sentence stays one line when piped or captured (grep, logs); tables still fit the width.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def one_line(message: str) -> str:
    """A message that may span lines (a driver's error) as one line, so stderr stays greppable."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip()) or "failed"


def fail(code: int, message: str) -> NoReturn:
    # Escaped: a reason may hold brackets (``accepts [2]``) that Rich would take for markup.
    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False)
    raise typer.Exit(code)


class _CertsyncGroup(CertsyncGroup):
    """The root group: a usage error (bad option value, missing argument) is one line, exit 2."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.TyperException as exc:  # Click's usage errors (Typer vendors Click)
            if type(exc).__name__ == "NoArgsIsHelpError":  # as Typer itself tells it: the help is shown
                sys.exit(exc.exit_code)
            ctx: typer.Context | None = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            err.print(f"[bold red]error:[/] {escape(one_line(exc.format_message()))}{hint}", highlight=False)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(INTERRUPTED)
        # Not standalone, Typer hands back the code of a ``typer.Exit`` instead of exiting.
        sys.exit(result if isinstance(result, int) else 0)


cli = CertsyncTyper(
    name="certsync",
    cls=_CertsyncGroup,
    help="Keeps HLF peer-mentor certifications true on the Dynamics portal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def progress_bar(console: Console | None = None) -> Progress:
    """The one progress bar of long commands: on a terminal only, gone when done (output stays clean).
    ``console``: where it is drawn (stdout by default; ``err`` keeps stdout for the result alone)."""
    console = console or out
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def load_settings() -> Settings:
    """Read the environment; an invalid value exits 2 naming the variable."""
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        variable = "CERTSYNC_" + str(first["loc"][0]).upper() if first["loc"] else "configuration"
        fail(2, f"{variable}: {first['msg']}")
    configure_logging(settings.log_format or "json", settings.log_level)
    return settings


def run(work: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine, mapping expected failures to exit codes (1 operational, 2 input)."""
    try:
        return asyncio.run(work())  # type: ignore[arg-type]
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED) from None
    except CertsyncError as exc:  # each kind carries its exit code (certsync.errors)
        fail(exc.exit_code, exc.for_operator())


def sync_off_reason(settings: Settings) -> str:
    """Why nothing is sent, naming the variable the operator actually has to set."""
    if not settings.dynamics_base_url:
        return "CERTSYNC_DYNAMICS_BASE_URL is not set, so there is no portal to send to"
    return "CERTSYNC_DYNAMICS_SYNC_ENABLED is false"
