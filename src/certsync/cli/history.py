"""``certsync history ID [--json]`` / ``certsync history --mentor ID``: where a certification's changes
are now, each call to the portal and its answer, its queue entries and the last reconcile's verdict.

Everything comes from what certsync recorded in the database (``delivery/history.py``); an id the
database has never heard of is exit 2.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated
from uuid import UUID

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from certsync import app as composition
from certsync.cli._common import cli, fail, load_settings, out, run
from certsync.delivery.history import Attempt, CertificationHistory, Change

PIPE_WIDTH = 1000

_STATE_COLOURS = {
    "waiting": "yellow",
    "in_flight": "cyan",
    "delivered": "green",
    "superseded": "dim",
    "queued": "red",
    "deleted": "magenta",
}


def _uuid(value: str, what: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        fail(2, f"{value!r} is not a {what} id (a UUID)")


@cli.command()
def history(
    certification_id: Annotated[
        str | None, typer.Argument(help="The certification's id.", show_default=False)
    ] = None,
    mentor: Annotated[
        str | None,
        typer.Option(
            "--mentor",
            metavar="ID",
            help="A peer mentor's id: the histories of their certifications.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """One certification's sync history: every captured change and where it is now, each attempt with
    its time and the portal's answer, its queue entries, and the last reconcile's verdict."""
    if (certification_id is None) == (mentor is None):
        fail(2, "give a certification ID or --mentor ID (one of them)")
    settings = load_settings()
    wanted = _uuid(certification_id, "certification") if certification_id is not None else None
    mentor_id = _uuid(mentor, "peer mentor") if mentor is not None else None

    async def work() -> list[CertificationHistory]:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            if wanted is not None:
                return [await rt.history().certification(wanted)]
            assert mentor_id is not None
            return await rt.history().mentor(mentor_id)

    histories = run(work)
    if as_json:
        if wanted is not None:
            document = histories[0].to_json_dict()
        else:
            document = {
                "peer_mentor_id": str(mentor_id),
                "certifications": [h.to_json_dict() for h in histories],
            }
        sys.stdout.write(json.dumps(document) + "\n")
        return
    # On a pipe a line stays one line (grep, logs); on a terminal the tree fits its width.
    console = out if out.is_terminal else Console(file=out.file, width=PIPE_WIDTH, soft_wrap=True)
    for one in histories:
        console.print(_tree(one))


def _tree(one: CertificationHistory) -> Tree:
    if one.exists:
        now = f"version {one.current_version}, {one.current_status}; peer mentor {one.peer_mentor_id}"
    else:
        now = "[magenta]deleted[/]: the database no longer has it"
    verdict = one.reconcile.verdict
    colour = "green" if verdict == "agreed" else ("dim" if verdict == "never reconciled" else "red")
    finished = one.reconcile.finished_at
    when = f" (run finished {finished:%Y-%m-%d %H:%M:%S %Z})" if finished else ""
    tree = Tree(
        f"[bold]Certification {one.certification_id}[/] — {now}\n"
        f"Last reconcile: [{colour}]{escape(verdict)}[/]{when}"
    )
    changes = tree.add(f"[bold]{len(one.changes)} captured change(s)[/]")
    for change in one.changes:
        node = changes.add(_change_line(change))
        for attempt in change.attempts:
            node.add(_attempt_line(attempt))
    if one.queue_entries:
        count = len(one.queue_entries)
        entries = tree.add(f"[bold]{count} queue entr{'y' if count == 1 else 'ies'}[/]")
        for entry in one.queue_entries:
            line = (
                f"entry {entry.id} [bold]{entry.status}[/] {escape(entry.operation_type)},"
                f" {entry.attempt_count} attempt(s), {entry.replay_count} replay(s)"
            )
            if entry.last_replayed_by:
                line += f", last by {escape(entry.last_replayed_by)}"
            if entry.discarded_by:
                line += f"; discarded by {escape(entry.discarded_by)}: {escape(entry.discarded_reason or '')}"
            node = entries.add(line)
            for item in entry.history:
                who = item.get("replayed_by") or item.get("by") or "worker"
                status, reason = escape(str(item.get("status"))), escape(str(item.get("reason") or ""))
                node.add(f"{_when(item.get('at'))} {status} — {reason} ({escape(str(who))})")
    return tree


def _change_line(change: Change) -> str:
    colour = _STATE_COLOURS.get(change.state, "white")
    return (
        f"v{change.version} {escape(change.operation_type)}"
        f" captured {change.captured_at:%Y-%m-%d %H:%M:%S %Z}"
        f" → [{colour}]{escape(change.where)}[/] [dim](event {change.event_id})[/]"
    )


def _when(moment: object) -> str:
    """A recorded time to the millisecond (a jsonb ISO string or a datetime); as given if neither."""
    if not isinstance(moment, datetime):
        try:
            moment = datetime.fromisoformat(str(moment))
        except ValueError:
            return str(moment)
    return f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d} {moment:%Z}"


def _attempt_line(attempt: Attempt) -> str:
    at = _when(attempt.at)
    if attempt.kind == "replay":
        head = f"replay by {escape(attempt.by or '?')}"
    elif attempt.attempt is not None:
        head = f"claim {attempt.claim} attempt {attempt.attempt}"
    else:
        head = f"claim {attempt.claim}"
    if attempt.targets is not None:
        head += f" (bulk of {attempt.targets})"
    answer = attempt.outcome + (f" {attempt.status}" if attempt.status is not None else "")
    reason = f" — {escape(attempt.reason)}" if attempt.reason else ""
    return f"{at} {head}: [bold]{escape(answer)}[/]{reason}"
