"""``certsync breaker status|reset``: the shared circuit breaker's state in PostgreSQL, and closing it."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from certsync import app as composition
from certsync.cli._common import cli, load_settings, out, run
from certsync.cli._help import CertsyncTyper

breaker_cli = CertsyncTyper(
    name="breaker", help="The circuit breaker every worker shares.", no_args_is_help=True
)
cli.add_typer(breaker_cli)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@breaker_cli.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """State (closed, open, half_open), consecutive failures, when it opened and when it may probe."""
    settings = load_settings()

    async def work() -> dict[str, Any]:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            status = await rt.breaker.status()
            snapshot = status.snapshot
            return {
                "breaker": snapshot.name,
                "state": str(snapshot.state),
                "consecutive_failures": snapshot.consecutive_failures,
                "failure_threshold": status.failure_threshold,
                "opened_at": _iso(snapshot.opened_at),
                "next_probe_at": _iso(status.next_call_at),
                "cooldown_seconds": status.cooldown.total_seconds(),
                "last_failure_reason": snapshot.last_failure_reason,
            }

    report = run(work)
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    colour = {"closed": "green", "open": "red", "half_open": "yellow"}[report["state"]]
    table = Table(show_header=False, box=None)
    table.add_row("state", f"[bold {colour}]{report['state']}[/]")
    table.add_row(
        "consecutive failures", f"{report['consecutive_failures']} of {report['failure_threshold']}"
    )
    table.add_row("opened at", report["opened_at"] or "-")
    table.add_row("next probe", _next_probe(report["state"], report["next_probe_at"]))
    table.add_row("last failure", report["last_failure_reason"] or "-")
    out.print(table)


def _next_probe(state: str, at: str | None) -> str:
    """When the circuit may next be tried, and what happens then, for a person reading it."""
    if state == "closed" or at is None:
        return "-"
    if datetime.fromisoformat(at) <= datetime.now(UTC):
        return (
            f"due since {at}: the next call is the probe (a running worker sends it within its poll"
            " interval, a queued change or a cheap read); success closes the circuit"
        )
    return f"{at} (until then nothing is sent; changes wait in the outbox)"


@breaker_cli.command()
def reset() -> None:
    """Close the circuit now: every worker sends again on its next claim."""
    settings = load_settings()

    async def work() -> str | None:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            transition = await rt.breaker.reset()
            return str(transition.old) if transition is not None else None

    previous = run(work)
    if previous is None:
        out.print("The circuit was already closed.")
    else:
        out.print(f"The circuit is closed (it was {previous}).")
