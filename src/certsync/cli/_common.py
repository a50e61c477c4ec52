"""Shared by every command: the root Typer app, settings loading and the exit-code mapping.

Exit codes: 0 done; 1 an operational failure (database or Dynamics unreachable); 2 bad input or
configuration, always as one clear line on stderr and never a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from certsync.logs import configure_logging
from certsync.settings import Settings
from certsync.store.errors import DatabaseUnavailable, MigrationError, NotFound, StoreError

T = TypeVar("T")

cli = typer.Typer(
    name="certsync",
    help="Keeps HLF peer-mentor certifications true on the Dynamics portal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def fail(code: int, message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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
    except NotFound as exc:
        fail(2, str(exc))
    except (DatabaseUnavailable, MigrationError, StoreError) as exc:
        fail(1, str(exc))
