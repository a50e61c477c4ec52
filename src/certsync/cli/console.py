"""``certsync console``: the operator web console (docs/console.md) in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer

from certsync import app as composition
from certsync.cli._common import cli, fail, load_settings, out
from certsync.serving import serve


@cli.command()
def console(
    host: Annotated[str, typer.Option(metavar="HOST", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.", min=1, max=65535)] = 8080,
) -> None:
    """Run the operator web console and its JSON API (/api/docs) and /metrics."""
    settings = load_settings()
    # Imported when the command runs: FastAPI and Jinja would slow every other command's start.
    from certsync.console import ConsoleConfigurationError, create_console_app  # noqa: PLC0415

    try:
        web = create_console_app(lambda: composition.open_runtime(settings), settings, host=host)
    except ConsoleConfigurationError as exc:
        fail(2, str(exc))
    try:
        serve(
            web,
            host,
            port,
            lifespan="on",
            on_listening=lambda url: out.print(f"certsync console on [bold]{url}/[/]  (Ctrl+C to stop)"),
        )
    except OSError as exc:
        fail(1, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
