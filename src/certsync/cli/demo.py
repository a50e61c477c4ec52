"""``certsync demo``: the main job, end to end, with progress and a summary."""

from __future__ import annotations

import secrets
import shlex
import shutil
import sys
from pathlib import Path

import platformdirs
from rich.panel import Panel
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from certsync.cli._common import cli, load_settings, out, run
from certsync.demo import BREAKER_COOLDOWN, RETRY_BASE_DELAY, DemoReport, run_demo, transitions_summary


@cli.command()
def demo() -> None:
    """Run the whole flow on sample data: capture, sweep, outage, circuit breaker, recovery, replay.

    Uses a fresh `certsync_demo` database on the embedded PostgreSQL (or on the server of
    CERTSYNC_DATABASE_URL; other databases are never touched) and a local Dynamics sandbox on a free
    port. Retry delays and the cool-down are compressed so that it finishes in well under a minute.
    """
    settings = load_settings()
    out.print(
        Panel.fit(
            "certsync demo — sample data through a scripted Dynamics outage.\n"
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
                return await run_demo(settings, log_dir, step)
            finally:
                if current:
                    progress.update(current[-1], completed=1, total=1)

        report = run(work)
    _summary(report)


def _summary(report: DemoReport) -> None:
    table = Table(title="What happened", show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("count", justify="right")
    table.add_row("certifications expired by the sweep", str(report.expired))
    table.add_row("delivered to Dynamics by the worker", str(report.delivered))
    table.add_row("retries (after a failed call)", str(report.retries))
    table.add_row("events that waited in the outbox while the circuit was open", str(report.waited_in_outbox))
    table.add_row("queued for replay (pending)", str(report.queued_pending))
    table.add_row("replayed from the queue", str(report.replayed))
    table.add_row("needing investigation (4xx)", str(report.requires_investigation))
    table.add_row("circuit transitions", transitions_summary(report.transitions))
    table.add_row("PUT requests the portal received", str(report.portal_requests))
    out.print(table)

    listing = Table(title="The portal's public listing", show_header=True, header_style="bold")
    listing.add_column("before the outage")
    listing.add_column("after")
    for index in range(max(len(report.listing_before), len(report.listing_after))):
        before = report.listing_before[index] if index < len(report.listing_before) else ""
        after = report.listing_after[index] if index < len(report.listing_after) else ""
        listing.add_row(before, after)
    out.print(listing)
    verdict = "[green]matches[/]" if report.listing_matches_database else "[red]does NOT match[/]"
    out.print(f"The portal's listing {verdict} the database. Finished in {report.seconds:.1f} s.")
    out.print(f"Structured logs of the run: {report.log_file}")
    out.print("\nNext, look at what the demo left behind (each line works as typed):")
    for line in next_commands(report.database_url):
        out.print(f"  {line}", highlight=False, soft_wrap=True)
    if not report.listing_matches_database:
        raise SystemExit(1)


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
