"""``certsync contract check``: does the configured portal accept what certsync sends?"""

from __future__ import annotations

import typer

from certsync import app as composition
from certsync.cli._common import cli, fail, load_settings, out, run

contract_cli = typer.Typer(
    name="contract", help="The wire contract with the Dynamics portal.", no_args_is_help=True
)
cli.add_typer(contract_cli)


@contract_cli.command()
def check() -> None:
    """Ask the portal whether it accepts what certsync sends (GET /api/v1/contract); exit 1 if not."""
    settings = load_settings()
    result = run(lambda: composition.check_portal_contract(settings))
    if not result.accepted:
        fail(1, f"{result.endpoint}: {result.summary}")
    out.print(f"[bold green]OK[/]: {result.endpoint} {result.summary}.")
