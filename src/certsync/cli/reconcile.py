"""``certsync reconcile [--repair] [--json]``: does the portal's listing equal the database's?

One line per mismatch (certification id and kind), then a count per kind; ``--json`` prints the pinned
object. Exit 0 they agree, 3 mismatches found (with ``--repair``: found and queued for correction), 1
the portal or the database unreachable (one line on stderr). Progress goes to stderr on a terminal.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from certsync import app as composition
from certsync.cli._common import cli, err, load_settings, out, run
from certsync.delivery.reconcile import KINDS, ReconcileReport

MISMATCHES_FOUND = 3


def _progress() -> Progress:
    """On a terminal only, on stderr (stdout stays the report), gone when done."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:,} certifications compared"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


@cli.command()
def reconcile(
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Queue an outbox event for every mismatch, so the worker corrects it."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare what the portal holds with what the database says it should hold (exit 3: mismatches)."""
    settings = load_settings()

    async def work() -> ReconcileReport:
        async with composition.open_runtime(settings, max_pool_size=2) as rt:
            with _progress() as progress:
                task = progress.add_task("Reading the portal and the database", total=None)
                return await rt.reconciler().reconcile(
                    repair=repair,
                    started_by=f"cli {composition.worker_id()}",
                    on_progress=lambda seen: progress.update(task, completed=seen),
                )

    report = run(work)
    if as_json:
        sys.stdout.write(json.dumps(report.to_json_dict()) + "\n")
    else:
        for mismatch in report.mismatches:
            out.print(f"{mismatch.certification_id} {mismatch.kind}", highlight=False)
        counts = report.counts
        out.print("  ".join(f"{kind}: [bold]{counts[str(kind)]}[/]" for kind in KINDS))
        held, expected = f"{report.portal_held:,}", f"{report.database_expected:,}"
        summary = (
            f"{held} held by the portal, {expected} expected by the database in scope,"
            f" {report.in_transit:,} in transit (an outbox event still open)."
        )
        out.print(summary, highlight=False)
        if report.agreed:
            out.print("[green]The portal and the database agree.[/]")
        elif repair:
            out.print(f"Queued {report.repaired:,} repair event(s): the worker corrects the portal.")
        else:
            out.print("Run `certsync reconcile --repair` to queue the corrections.")
    if not report.agreed:
        raise typer.Exit(MISMATCHES_FOUND)
