"""``certsync renewal-events migrate``: the normalised renewal history (docs/renewal-history.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from certsync import app as composition
from certsync.app import renewal_events
from certsync.cli._common import cli, fail, load_settings, out, progress_bar, run
from certsync.cli._help import CertsyncTyper

renewal_events_cli = CertsyncTyper(
    name="renewal-events",
    help="The normalised renewal history: certification_renewal_events, one row per renewal entry.",
    no_args_is_help=True,
)
cli.add_typer(renewal_events_cli)


_MIGRATE_HELP = "\n\n".join(
    (
        "Create certification_renewal_events and fill it from every certification's renewal_history.",
        "Installs the table (row-level security: an entry is visible exactly when its certification is) and "
        "the trigger that copies every later append, then copies the existing entries in batches keyed by "
        "certification id, with a progress bar on a terminal.",
        "Each batch commits on its own: run again after an interruption, it carries on after the last "
        "committed batch, and no entry is ever copied twice (--restart scans everything again). It ends by "
        "checking that the table and the JSONB hold the same number of entries for every certification "
        "(exit 1 if not). The JSONB stays the read cache. Safe while coordinators work.",
    )
)


@renewal_events_cli.command(help=_MIGRATE_HELP)
def migrate(
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", metavar="N", min=1, help="Certifications per batch (one short transaction each)."
        ),
    ] = renewal_events.DEFAULT_BATCH_SIZE,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart", help="Scan every certification again instead of resuming after the last batch."
        ),
    ] = False,
) -> None:
    """Create and fill certification_renewal_events (see _MIGRATE_HELP)."""
    settings = load_settings()

    async def work() -> tuple[renewal_events.BackfillReport, renewal_events.Agreement]:
        async with composition.open_pool_for(settings, max_size=1) as pool:
            started = await renewal_events.install(pool, restart=restart)
            with progress_bar() as progress:
                task = progress.add_task(
                    "copying renewal entries", total=started.total_entries, completed=started.entries_done
                )

                def on_batch(batch: renewal_events.Batch) -> None:
                    progress.advance(task, batch.entries_read)

                report = await renewal_events.backfill(pool, batch_size=batch_size, on_batch=on_batch)
            return report, await renewal_events.agreement(pool)

    report, agreement = run(work)
    if report.started.finished:
        out.print("The backfill had already finished; the trigger keeps the table in step.")
    else:
        resumed = " (resumed after an earlier run)" if report.started.resumes else ""
        out.print(
            f"Copied {report.entries_copied} renewal entries from {report.certifications} certifications "
            f"in {report.batches} batches{resumed}."
        )
    if agreement.mismatched:
        fail(
            1,
            f"{agreement.mismatched} certifications hold another number of entries in renewal_history "
            "than in certification_renewal_events: see docs/renewal-history.md",
        )
    out.print(
        f"certification_renewal_events holds {agreement.events} entries and agrees with renewal_history."
    )
