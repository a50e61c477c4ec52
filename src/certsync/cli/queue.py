"""``certsync queue list|show|replay|discard``: the operator's view of the Dynamics retry queue.

Listing and bulk replay stream the queue a page at a time (keyset paging in ``RetryQueue.iterate``),
writing each row as it comes, so 100k entries are never held in memory at once.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import sys
from collections.abc import AsyncIterator
from datetime import date, datetime
from typing import Annotated, TextIO
from uuid import UUID

import typer
from rich.console import Console
from rich.json import JSON
from rich.markup import escape
from rich.table import Table

from certsync import app as composition
from certsync.cli._common import cli, err, fail, load_settings, out, progress_bar, run, sync_off_reason
from certsync.cli._help import CertsyncTyper
from certsync.delivery.queue import (
    QUEUE_STATUSES,
    ReplayResult,
    ReplaySummary,
    RetryEntry,
    RetryEntrySummary,
)
from certsync.settings import Settings

queue_cli = CertsyncTyper(
    name="queue",
    help="The Dynamics retry queue: what could not be delivered, kept for replay or investigation.",
    no_args_is_help=True,
)
cli.add_typer(queue_cli)

_STATUS_COLOURS = {
    "pending": "yellow",
    "requires_investigation": "red",
    "replayed": "green",
    "discarded": "dim",
    "skipped": "dim",
}

StatusOption = Annotated[
    str | None,
    typer.Option(
        "--status", metavar="STATUS", help=f"One of: {', '.join(QUEUE_STATUSES)}.", show_default=False
    ),
]
ByOption = Annotated[
    str | None,
    typer.Option(
        "--by",
        metavar="NAME",
        help="Who is acting, recorded on each entry (default: the OS user).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Say what would happen; send nothing and change nothing.")
]


# Input ------------------------------------------------------------------------------------------------


def checked_status(status: str | None) -> str | None:
    if status is not None and status not in QUEUE_STATUSES:
        fail(2, f"--status {status!r}: expected one of {', '.join(QUEUE_STATUSES)}")
    return status


def checked_ids(values: list[str]) -> list[int]:
    ids = []
    for value in values:
        try:
            entry_id = int(value)
        except ValueError:
            fail(2, f"{value!r} is not a retry queue entry id (a whole number)")
        if entry_id < 1:
            fail(2, f"{value!r} is not a retry queue entry id (ids start at 1)")
        ids.append(entry_id)
    return ids


def checked_certification(value: str | None) -> UUID | None:
    if value is None:
        return None
    try:
        return UUID(value)
    except ValueError:
        fail(2, f"--certification {value!r}: expected a certification id (a UUID)")


def operator(by: str | None) -> str:
    """``--by``, else the OS user: who replayed or discarded is kept on the entry."""
    if by is not None:
        if not by.strip():
            fail(2, "--by must name someone")
        return by.strip()
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no USER/LOGNAME (e.g. a bare container)
        return "unknown"


# Output -----------------------------------------------------------------------------------------------


def _json_value(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(row: object) -> str:
    return json.dumps(row, default=_json_value, ensure_ascii=False)


async def write_json_array(rows: AsyncIterator[RetryEntrySummary], stream: TextIO) -> int:
    """Write ``rows`` as one JSON array, each row as it arrives; returns how many were written."""
    count = 0
    stream.write("[")
    async for row in rows:
        stream.write(("\n" if count == 0 else ",\n") + to_json(row))
        count += 1
    stream.write("\n]\n" if count else "]\n")
    stream.flush()
    return count


def print_table(table: Table) -> None:
    """On a terminal, fit its width; piped or captured, at full width so each row stays one line."""
    if out.is_terminal:
        out.print(table)
    else:
        Console(file=out.file, width=100_000, soft_wrap=True).print(table)


def _when(value: datetime | None) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value is not None else "-"


def _status_text(status: str) -> str:
    return f"[{_STATUS_COLOURS.get(status, 'default')}]{status}[/]"


def _entries_table(title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    for name, justify in (
        ("id", "right"),
        ("created", "left"),
        ("status", "left"),
        ("operation", "left"),
        ("certification", "left"),
        ("attempts", "right"),
        ("replays", "right"),
        ("reason", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    return table


def _add_entry_row(table: Table, row: RetryEntrySummary) -> None:
    table.add_row(
        str(row.id),
        _when(row.created_at),
        _status_text(row.status),
        escape(row.operation_type),
        str(row.certification_id or "-"),
        str(row.attempt_count),
        str(row.replay_count),
        escape(row.failure_reason),
    )


def _outcome_line(result: ReplayResult) -> str:
    calls = f" ({result.attempts} call{'s' if result.attempts != 1 else ''})" if result.attempts else ""
    reason = f": {escape(result.reason)}" if result.reason else ""
    return f"#{result.entry_id} {_status_text(result.status)}{calls}{reason}"


# Commands -----------------------------------------------------------------------------------------------


@queue_cli.command("list")
def list_entries(
    status: StatusOption = None,
    operation_type: Annotated[
        str | None,
        typer.Option(
            metavar="TYPE",
            help="e.g. certification.status_changed, certification.created.",
            show_default=False,
        ),
    ] = None,
    certification: Annotated[
        str | None,
        typer.Option(metavar="ID", help="Only this certification's entries (its id).", show_default=False),
    ] = None,
    limit: Annotated[
        int, typer.Option(metavar="N", help="At most this many entries; 0 lists them all.")
    ] = 50,
    as_json: JsonOption = False,
) -> None:
    """The retry queue, newest first."""
    status = checked_status(status)
    certification_id = checked_certification(certification)
    if limit < 0:
        fail(2, f"--limit must be 0 (all) or more, not {limit}")
    settings = load_settings()

    async def work() -> int:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            rows = rt.queue_service().entries(
                status=status,
                operation_type=operation_type,
                certification_id=certification_id,
                limit=limit,
            )
            if as_json:
                return await write_json_array(rows, sys.stdout)
            table = _entries_table()
            async for row in rows:
                _add_entry_row(table, row)
            if table.row_count:
                print_table(table)
            return table.row_count

    shown = run(work)
    if not as_json and shown == 0:
        out.print("No retry queue entries match.")


@queue_cli.command()
def show(
    entry_id: Annotated[str, typer.Argument(metavar="ID", help="The entry's id.", show_default=False)],
    as_json: JsonOption = False,
) -> None:
    """One entry, with its payload and failure history."""
    [checked_id] = checked_ids([entry_id])
    settings = load_settings()

    async def work() -> RetryEntry:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            return await rt.queue_service().get(checked_id)

    entry = run(work)
    if as_json:
        sys.stdout.write(to_json(entry) + "\n")
        return
    details = Table(show_header=False, box=None, title=f"Retry queue entry #{entry.id}", title_justify="left")
    details.add_row("status", _status_text(entry.status))
    details.add_row("operation", escape(entry.operation_type))
    details.add_row("certification", str(entry.certification_id or "-"))
    details.add_row("event", str(entry.event_id or "-"))
    details.add_row("failure reason", escape(entry.failure_reason))
    details.add_row("attempts", str(entry.attempt_count))
    details.add_row("replays", str(entry.replay_count))
    details.add_row("last replayed", f"{_when(entry.last_replayed_at)} by {entry.last_replayed_by or '-'}")
    if entry.status == "pending":
        upcoming = (
            f"next {_when(entry.next_auto_replay_at)}"
            if entry.next_auto_replay_at is not None
            else "none left: waits for a person"
        )
        details.add_row("automatic replays", f"{entry.auto_replay_count} made, {upcoming}")
    if entry.status == "discarded":
        details.add_row("discarded", f"by {entry.discarded_by}: {escape(entry.discarded_reason or '')}")
    details.add_row("created", _when(entry.created_at))
    details.add_row("updated", _when(entry.updated_at))
    print_table(details)
    out.print("[bold]payload[/] (what was, or would have been, sent)")
    out.print(JSON(to_json(entry.payload_json)))
    history = Table(title="failure history", title_justify="left")
    for name in ("at", "status", "attempts", "reason", "by"):
        history.add_column(name, overflow="fold")
    for item in entry.failure_history:
        history.add_row(
            str(item.get("at", "-")),
            _status_text(str(item.get("status", "-"))),
            str(item.get("attempts", "-")),
            escape(str(item.get("reason", "-"))),
            escape(str(item.get("replayed_by") or item.get("by") or "-")),
        )
    print_table(history)


@queue_cli.command()
def replay(
    entry_ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="ID", help="Entries to replay (or --all).", show_default=False),
    ] = None,
    replay_all: Annotated[
        bool, typer.Option("--all", help="Every entry with --status (default: pending), streamed.")
    ] = False,
    status: StatusOption = None,
    by: ByOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Resend each entry's certification as it is NOW, through the same retry policy and circuit breaker."""
    if entry_ids and replay_all:
        fail(2, "pass entry IDs or --all, not both")
    if not entry_ids and not replay_all:
        fail(2, "name the entries to replay (IDs), or pass --all")
    if status is not None and not replay_all:
        fail(2, "--status selects entries for --all; it cannot be used with IDs")
    status = checked_status(status)
    ids = checked_ids(entry_ids or [])
    who = operator(by)
    settings = load_settings()
    if dry_run:
        _replay_dry_run(settings, ids, status or "pending" if replay_all else None)
        return
    if not settings.sync_enabled:
        fail(2, f"{sync_off_reason(settings)}: nothing may be sent, so nothing can be replayed")

    async def work() -> ReplaySummary:
        async with composition.open_runtime(settings) as rt:
            service = rt.queue_service()
            if replay_all:
                selected = status or "pending"
                total = await service.count(selected)
                with progress_bar() as progress:
                    task = progress.add_task(f"replaying {selected} entries", total=total)

                    def on_result(result: ReplayResult) -> None:
                        progress.console.print(_outcome_line(result), highlight=False)
                        progress.advance(task)

                    return await service.replay_all(status=selected, by=who, on_result=on_result)
            await service.require(ids)  # every id must exist before anything is sent
            summary = ReplaySummary()
            for entry_id in ids:
                result = await service.replay(entry_id, by=who)
                summary.add(result)
                out.print(_outcome_line(result), highlight=False)
            return summary

    summary = run(work)
    counted = ", ".join(f"{count} {status}" for status, count in sorted(summary.results.items()))
    if summary.stopped_because and not counted:
        out.print(
            f"[yellow]Nothing replayed: {escape(summary.stopped_because)}[/]; the entries wait, unchanged."
        )
    else:
        out.print(f"Replay by {escape(who)}: {counted or 'nothing to replay'}.")
        if summary.stopped_because:
            out.print(f"[yellow]Stopped: {escape(summary.stopped_because)}[/]; the rest wait, unchanged.")
    if summary.failed or summary.stopped_because:
        raise typer.Exit(1)


def _would_replay(entry_id: int, status: str, certification_id: UUID | None) -> None:
    out.print(f"would replay #{entry_id} ({_status_text(status)}) certification {certification_id or '-'}")


def _replay_dry_run(settings: Settings, ids: list[int], status: str | None) -> None:
    """What ``replay`` would do, sending nothing and changing nothing."""

    async def work() -> tuple[int, int]:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            service = rt.queue_service()
            would = skipped = 0
            if status is not None:
                async for row in service.entries(status=status):
                    _would_replay(row.id, row.status, row.certification_id)
                    would += 1
                return would, skipped
            for entry in await service.require(ids):
                if entry.actionable:
                    out.print(
                        f"would replay #{entry.id} ({_status_text(entry.status)}) {entry.certification_id}"
                    )
                    would += 1
                else:
                    out.print(f"would skip #{entry.id}: already {_status_text(entry.status)}")
                    skipped += 1
            return would, skipped

    would, skipped = run(work)
    noun = "entry" if would == 1 else "entries"
    out.print(
        f"Dry run: {would} {noun} would be replayed"
        + (f", {skipped} skipped" if skipped else "")
        + "; nothing was sent or changed."
    )


_DISCARD_WARNING = (
    "The portal keeps the state it last received for these certifications: a discarded entry is never"
    " sent. `certsync reconcile` finds what differs and `certsync reconcile --repair` corrects it (a"
    " running worker reconciles by itself every CERTSYNC_RECONCILE_INTERVAL_SECONDS)."
)


@queue_cli.command()
def discard(
    entry_ids: Annotated[list[str], typer.Argument(metavar="ID", help="Entries to discard.")],
    reason: Annotated[str, typer.Option("--reason", help="Why: kept on each entry.", show_default=False)],
    by: ByOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Mark entries discarded; they are kept, with the reason and who discarded them.

    The portal is not told: it keeps the state it last received until a reconcile corrects it.
    """
    ids = checked_ids(entry_ids)
    if not reason.strip():
        fail(2, "--reason must say why the entries are discarded")
    who = operator(by)
    settings = load_settings()

    async def work() -> int:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            service = rt.queue_service()
            entries = await service.require(ids)  # every id must exist before anything changes
            changed = 0
            for entry in entries:
                if dry_run:
                    if entry.actionable:
                        out.print(f"would discard #{entry.id} ({_status_text(entry.status)})")
                        changed += 1
                    else:
                        out.print(f"#{entry.id} would be left as it is: already {_status_text(entry.status)}")
                    continue
                result = await service.discard(entry.id, reason=reason.strip(), by=who)
                if result.discarded:
                    out.print(f"#{entry.id} {_status_text('discarded')}")
                    changed += 1
                else:
                    out.print(f"#{entry.id} left as it is: already {_status_text(result.status)}")
            return changed

    changed = run(work)
    if dry_run:
        noun = "entry" if changed == 1 else "entries"
        out.print(f"Dry run: {changed} {noun} would be discarded; nothing was changed.")
    if changed:
        err.print(f"[yellow]warning:[/] {escape(_DISCARD_WARNING)}", highlight=False)
