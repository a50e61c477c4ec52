"""``certsync contract check``: does the configured portal accept the contract version we send?"""

from __future__ import annotations

import httpx
import typer

from certsync import app as composition
from certsync.cli._common import cli, fail, load_settings, out, run
from certsync.dynamics.contract import CONTRACT_VERSION
from certsync.resilience.clock import SystemClock

contract_cli = typer.Typer(
    name="contract", help="The wire contract with the Dynamics portal.", no_args_is_help=True
)
cli.add_typer(contract_cli)


@contract_cli.command()
def check() -> None:
    """Ask the portal (GET /api/v1/contract) which contract versions it accepts; exit 1 unless ours."""
    settings = load_settings()

    async def work() -> tuple[int, ...]:
        # Only the portal is asked: no database is opened (nor an embedded one started) for this.
        async with httpx.AsyncClient(timeout=settings.http_timeout) as http:
            client = composition.dynamics_client_from(settings, http, SystemClock())
            return await client.contract_versions()

    accepted = run(work)
    listed = ", ".join(f"v{version}" for version in accepted) or "none"
    if CONTRACT_VERSION not in accepted:
        fail(
            1,
            f"CONTRACT MISMATCH: {settings.dynamics_base_url} accepts {listed}, but certsync sends"
            f" v{CONTRACT_VERSION}: every delivery will be refused and queued for investigation.",
        )
    out.print(
        f"[bold green]OK[/]: {settings.dynamics_base_url} accepts contract v{CONTRACT_VERSION}"
        f" (accepted: {listed})."
    )
