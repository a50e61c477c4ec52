"""``certsync console``: the operator web console (docs/console.md) in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn

from certsync import app as composition
from certsync.cli._common import cli, fail, load_settings, out


@cli.command()
def console(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8080,
) -> None:
    """Run the operator web console and its JSON API (/api/docs) and /metrics."""
    settings = load_settings()
    from certsync.console import ConsoleConfigurationError, create_console_app

    try:
        web = create_console_app(lambda: composition.open_runtime(settings), settings)
    except ConsoleConfigurationError as exc:
        fail(2, str(exc))
    out.print(f"certsync console on [bold]http://{host}:{port}/[/]  (Ctrl+C to stop)")
    try:
        uvicorn.run(web, host=host, port=port, access_log=False, log_config=None, log_level="warning")
    except OSError as exc:
        fail(1, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
