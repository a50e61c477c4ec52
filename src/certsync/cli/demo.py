"""``certsync demo``: the main job, end to end, with progress and a summary."""

from __future__ import annotations

import secrets
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import platformdirs
import typer
from rich.panel import Panel
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from certsync.cli._common import cli, fail, load_settings, out, run
from certsync.demo import (
    BREAKER_COOLDOWN,
    COHORT,
    RETRY_BASE_DELAY,
    DemoApi,
    DemoReport,
    bulk_calls,
    run_demo,
    transitions_summary,
)
from certsync.sandbox.state import DEFAULT_TOKEN

SANDBOX_PORT = 8765
"""Where ``certsync sandbox`` listens by default: the port the Dataverse run's next commands use."""


@cli.command()
def demo(
    api: Annotated[
        str | None,
        typer.Option(
            help="The wire: 'contract-v1' (the sandbox) or 'dataverse' (the Dataverse Web API emulator:"
            " bulk UpsertMultiple, service protection, a refused row, reconcile). Default:"
            " CERTSYNC_DYNAMICS_API, itself contract-v1 unless set."
        ),
    ] = None,
) -> None:
    """Run the whole flow on sample data: capture, sweep, outage, circuit breaker, recovery, replay.

    Uses a fresh `certsync_demo` database on the embedded PostgreSQL (or on the server of
    CERTSYNC_DATABASE_URL; other databases are never touched) and a local Dynamics sandbox on a free
    port. Retry delays and the cool-down are compressed so that it finishes in well under a minute.
    With --api dataverse the portal is the Dataverse Web API emulator instead.
    """
    settings = load_settings()
    wire: DemoApi = settings.dynamics_api
    if api is not None:
        if api not in ("contract-v1", "dataverse"):
            fail(2, f"--api {api!r}: expected 'contract-v1' or 'dataverse'")
        wire = "dataverse" if api == "dataverse" else "contract-v1"
    if wire == "dataverse":
        story = (
            f"certsync demo — sample data and a mass expiry of {COHORT} certifications into the Dataverse"
            " Web API emulator:\n"
            f"Changes go {bulk_calls(settings.dataverse_batch_size)}; service protection's 429s, a row"
            " a plug-in refuses, a DELETE, and a reconcile."
        )
    else:
        story = "certsync demo — sample data through a scripted Dynamics outage."
    out.print(
        Panel.fit(
            f"{story}\n"
            f"Delays are compressed for the demo: retries {RETRY_BASE_DELAY:g}/{2 * RETRY_BASE_DELAY:g}/"
            f"{4 * RETRY_BASE_DELAY:g} s instead of 2/4/8 s, circuit cool-down {BREAKER_COOLDOWN:g} s"
            f" instead of {settings.breaker_cooldown:g} s.",
            border_style="cyan",
        )
    )
    log_dir = Path(platformdirs.user_log_dir("certsync", appauthor=False))

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=out, transient=False
    ) as progress:
        current: list[TaskID] = []

        def step(description: str) -> None:
            if current:
                progress.update(current[-1], completed=1, total=1)
            current.append(progress.add_task(description, total=None))

        async def work() -> DemoReport:
            try:
                return await run_demo(settings, log_dir, step, api=wire)
            finally:
                if current:
                    progress.update(current[-1], completed=1, total=1)

        report = run(work)
    if report.api == "dataverse":
        _dataverse_summary(report)
    else:
        _summary(report)
    if not report.succeeded:
        raise SystemExit(1)


def _summary(report: DemoReport) -> None:
    _measures(
        "What happened",
        [
            ("certifications expired by the sweep", report.expired),
            ("delivered to Dynamics by the worker", report.delivered),
            ("retries (after a failed call)", report.retries),
            ("events that waited in the outbox while the circuit was open", report.waited_in_outbox),
            ("queued for replay (pending)", report.queued_pending),
            ("replayed from the queue", report.replayed),
            ("needing investigation (4xx)", report.requires_investigation),
            ("circuit transitions", transitions_summary(report.transitions)),
            ("PUT requests the portal received", report.portal_requests),
        ],
    )
    listing = Table(title="The portal's public listing", show_header=True, header_style="bold")
    listing.add_column("before the outage")
    listing.add_column("after")
    for index in range(max(len(report.listing_before), len(report.listing_after))):
        before = report.listing_before[index] if index < len(report.listing_before) else ""
        after = report.listing_after[index] if index < len(report.listing_after) else ""
        listing.add_row(before, after)
    out.print(listing)
    verdict = "[green]matches[/]" if report.listing_matches_database else "[red]does NOT match[/]"
    _closing(
        report,
        f"The portal's listing {verdict} the database.",
        "\nNext, look at what the demo left behind (each line works as typed):",
        next_commands(report.database_url),
    )


def _dataverse_summary(report: DemoReport) -> None:
    targets = report.bulk_targets
    _measures(
        "What happened (Dataverse Web API)",
        [
            ("certifications expired by the sweep", report.expired),
            ("delivered to Dataverse by the worker", report.delivered),
            ("Web API requests the emulator received", report.portal_requests),
            ("UpsertMultiple calls accepted", len(targets)),
            (
                "targets per accepted call",
                f"up to {max(targets)} ({sum(targets)} in {len(targets)} calls)" if targets else "none",
            ),
            ("UpsertMultiple calls refused whole (4xx), then split", report.bulk_refused),
            ("single PATCHes (one change, or a row on its own)", report.single_writes),
            ("DELETEs", report.deletes),
            ("429s from service protection (sending paused)", report.rate_limited),
            ("retries (after a failed call)", report.retries),
            ("circuit transitions", transitions_summary(report.transitions)),
            ("rows split out for investigation (4xx)", report.requires_investigation),
            ("replayed from the queue once the plug-in was fixed", report.replayed),
            ("reconcile: rows read back over OData", report.reconcile_read),
            (
                "reconcile: mismatches",
                "not run" if report.reconcile_mismatches is None else report.reconcile_mismatches,
            ),
        ],
    )
    verdict = "[green]agrees[/]" if report.succeeded else "[red]does NOT agree[/]"
    _closing(
        report,
        f"The Dataverse table {verdict} with the database.",
        "\nNext, the Dataverse wire by hand: start the emulator in a second terminal, then run the rest"
        " here, in this order (each line works as typed):",
        dataverse_next_commands(report.database_url, report.investigated),
    )


def _measures(title: str, rows: list[tuple[str, object]]) -> None:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("count", justify="right")
    for measure, value in rows:
        table.add_row(measure, str(value))
    out.print(table)


def _closing(report: DemoReport, verdict: str, next_intro: str, commands: list[str]) -> None:
    out.print(f"{verdict} Finished in {report.seconds:.1f} s.")
    out.print(f"Structured logs of the run: {report.log_file}")
    out.print(next_intro)
    for line in commands:
        out.print(f"  {line}", highlight=False, soft_wrap=True)


def certsync_command() -> str:
    """How to run certsync again from this shell: ``certsync`` when it is on the PATH, else the path
    of the script that is running (``make demo`` runs ``.venv/bin/certsync``, which is not on it)."""
    if shutil.which("certsync"):
        return "certsync"
    script = Path(sys.argv[0])
    if script.name == "certsync" and script.exists():
        return shlex.quote(str(script.resolve()))
    return f"{shlex.quote(sys.executable)} -m certsync"


def next_commands(database_url: str) -> list[str]:
    """The commands the demo suggests, complete: the database, and a console sign-in token."""
    command = certsync_command()
    database = f"CERTSYNC_DATABASE_URL={shlex.quote(database_url)}"
    token = secrets.token_urlsafe(24)
    return [
        f"{database} {command} queue list",
        f"{database} {command} breaker status",
        f"{database} CERTSYNC_CONSOLE_OPERATOR_TOKEN={token} {command} console   (sign in with that token)",
    ]


def dataverse_next_commands(database_url: str, investigated: list[str]) -> list[str]:
    """After ``demo --api dataverse``: the emulator on the sandbox's port, the table check, the demo's
    database delivered to it afresh in bulk, a reconcile that agrees, the refused row's history."""
    command = certsync_command()
    url = f"http://127.0.0.1:{SANDBOX_PORT}"
    lines = [
        f"{command} sandbox --api dataverse --port {SANDBOX_PORT}   (in the second terminal)",
        f"export CERTSYNC_DATABASE_URL={shlex.quote(database_url)} CERTSYNC_DYNAMICS_API=dataverse"
        f" CERTSYNC_DYNAMICS_BASE_URL={url} CERTSYNC_DYNAMICS_TOKEN={DEFAULT_TOKEN}",
        f"{command} contract check",
        f"{command} backfill --all",
        f"{command} worker --once",
        f"{command} reconcile",
    ]
    lines += [f"{command} history {certification_id}" for certification_id in investigated[:1]]
    return lines
