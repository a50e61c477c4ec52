"""``certsync backfill``: queue the current state of chosen certifications for delivery.

For go-live, a restored portal or a new organisation: one outbox event per certification, merged
with any that already waits (idempotent), in keyset batches, with a progress bar on a terminal.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

import typer

from certsync import app as composition
from certsync.cli._common import cli, err, fail, load_settings, out, progress_bar, run
from certsync.delivery.backfill import BackfillReport, selection_of


def _uuids(values: list[str]) -> list[UUID]:
    parsed: list[UUID] = []
    for value in values:
        try:
            parsed.append(UUID(value))
        except ValueError:
            fail(2, f"--certification: {value!r} is not a certification id (a UUID)")
    return parsed


def _plural(count: int) -> str:
    return f"{count} certification{'' if count == 1 else 's'}"


@cli.command()
def backfill(
    ids: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="ID", help="More certification ids, after --certification.", show_default=False
        ),
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every certification.")] = False,
    certification: Annotated[
        list[str] | None,
        typer.Option(
            "--certification", metavar="ID", help="These certifications (repeatable, or ids after it)."
        ),
    ] = None,
    organisation: Annotated[
        UUID | None,
        typer.Option(
            "--organisation",
            metavar="ID",
            help="The certifications of peer mentors with a peer_mentor membership in its chapters.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be queued; queue nothing.")
    ] = False,
) -> None:
    """Queue the current state of the chosen certifications for delivery (exactly one of --all,
    --certification ID..., --organisation ID). Idempotent: one that already waits gets no second event."""
    if ids and not certification:
        fail(2, "certification ids given without --certification")
    chosen = _uuids([*(certification or []), *(ids or [])])
    try:
        selection = selection_of(
            everything=everything, certification_ids=chosen, organisation_id=organisation
        )
    except ValueError as exc:
        fail(2, str(exc))
    settings = load_settings()

    async def work() -> BackfillReport:
        async with composition.open_runtime(settings, max_pool_size=2) as rt:
            service = rt.backfill()
            total = await service.check(selection)
            with progress_bar(err) as progress:
                task = progress.add_task("Counting" if dry_run else "Queuing", total=total)
                return await service.run(
                    selection,
                    dry_run=dry_run,
                    on_batch=lambda chosen: progress.advance(task, chosen),
                    selected=total,
                )

    report = run(work)
    merged = f"; {_plural(report.already_waiting)} already waiting" if report.already_waiting else ""
    if dry_run:
        out.print(f"Would queue {_plural(report.queued)} of {report.selected} selected{merged} (dry run).")
    else:
        out.print(f"Queued {_plural(report.queued)} of {report.selected} selected for delivery{merged}.")
