"""One certification's sync history, as an operator asks for it: "where is this change, and is the
portal right?" (``certsync history``, the console's History page and ``/api/history``).

Everything is derived from what certsync already records: the outbox events (status, superseded_by,
the failed calls of each claim in ``attempt_log``, the delivered close's time), the retry-queue entries
(their replays and discards in ``failure_history``), and the last finished reconcile's mismatches.
The sandbox's request log is not consulted: a history must be true against any portal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from certsync.errors import NotFound
from certsync.store.history import CertificationRow, EventRow, HistoryStore, QueueEntryRow, VerdictRow
from certsync.store.reconcile import MismatchRecord, ReconcileStore, RunSummary

__all__ = [
    "STATES",
    "Attempt",
    "CertificationHistory",
    "Change",
    "HistoryService",
    "LastReconcile",
    "QueueEntryHistory",
    "ReconcileVerdict",
]

State = Literal["waiting", "in_flight", "delivered", "superseded", "queued", "deleted"]
STATES: tuple[State, ...] = ("waiting", "in_flight", "delivered", "superseded", "queued", "deleted")
NEVER_RECONCILED = "never reconciled"
AGREED = "agreed"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One call to the portal for a change, or one replay of its queue entry.

    ``kind``: ``delivery`` (the worker's call; ``claim`` and ``attempt`` number it) or ``replay``.
    ``outcome``: ``delivered``, ``not_sent`` (outside the portal's organisation: no request),
    ``transient``, ``rate_limited``, ``unauthorised``, ``refused``; a replay's is the entry's status
    after it (``replayed``, ``pending``, ``requires_investigation``). ``status``: the HTTP status, when
    the portal answered and certsync kept it (a failed call's; a success is any 2xx). ``targets``: a
    bulk call's (UpsertMultiple) number of certifications; a bulk call is refused or fails as a whole.
    """

    kind: Literal["delivery", "replay"]
    at: datetime | str
    outcome: str
    status: int | None = None
    reason: str | None = None
    claim: int | None = None
    attempt: int | None = None
    by: str | None = None
    targets: int | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "at": self.at.isoformat() if isinstance(self.at, datetime) else self.at,
            "outcome": self.outcome,
            "status": self.status,
            "reason": self.reason,
            "claim": self.claim,
            "attempt": self.attempt,
            "by": self.by,
            "targets": self.targets,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """One captured change (outbox event) and where it is now."""

    event_id: UUID
    version: int
    operation_type: str
    captured_at: datetime
    state: State
    status: str  # the outbox's own status (``state`` says ``deleted`` for a gone certification's)
    claims: int
    closed_at: datetime | None
    superseded_by: UUID | None
    superseded_by_version: int | None
    queue_entry_id: int | None
    queue_status: str | None
    detail: str | None
    attempts: tuple[Attempt, ...]

    @property
    def where(self) -> str:
        """Where it is now, in words."""
        if self.status == "superseded" and self.superseded_by is not None:
            return f"superseded by version {self.superseded_by_version} ({self.superseded_by})"
        if self.status == "queued" and self.queue_entry_id is not None:
            return f"queued: entry {self.queue_entry_id} ({self.queue_status})"
        if self.state == "deleted":
            return f"deleted (the certification is gone; this event {self.status})"
        return self.state.replace("_", " ")

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "event_id": str(self.event_id),
            "version": self.version,
            "operation_type": self.operation_type,
            "captured_at": self.captured_at.isoformat(),
            "state": self.state,
            "status": self.status,
            "where": self.where,
            "claims": self.claims,
            "closed_at": self.closed_at.isoformat() if self.closed_at else None,
            "superseded_by": str(self.superseded_by) if self.superseded_by else None,
            "superseded_by_version": self.superseded_by_version,
            "queue_entry_id": self.queue_entry_id,
            "queue_status": self.queue_status,
            "detail": self.detail,
            "attempts": [a.to_json_dict() for a in self.attempts],
        }


@dataclass(frozen=True, slots=True)
class QueueEntryHistory:
    """A retry-queue entry of the certification: its replays (and who made them) and any discard."""

    id: int
    event_id: UUID | None
    operation_type: str
    status: str
    failure_reason: str | None
    attempt_count: int
    replay_count: int
    last_replayed_by: str | None
    discarded_by: str | None
    discarded_reason: str | None
    created_at: datetime
    history: tuple[dict[str, Any], ...]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_id": str(self.event_id) if self.event_id else None,
            "operation_type": self.operation_type,
            "status": self.status,
            "failure_reason": self.failure_reason,
            "attempt_count": self.attempt_count,
            "replay_count": self.replay_count,
            "last_replayed_by": self.last_replayed_by,
            "discarded_by": self.discarded_by,
            "discarded_reason": self.discarded_reason,
            "created_at": self.created_at.isoformat(),
            "history": list(self.history),
        }


@dataclass(frozen=True, slots=True)
class ReconcileVerdict:
    """The last finished reconcile's word on this certification: a mismatch kind, ``agreed``, or
    ``never reconciled`` (no run has finished, or the certification was created after the last one
    started)."""

    verdict: str
    run_id: UUID | None = None
    finished_at: datetime | None = None
    portal_version: int | None = None
    database_version: int | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "run_id": str(self.run_id) if self.run_id else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "portal_version": self.portal_version,
            "database_version": self.database_version,
        }


@dataclass(frozen=True, slots=True)
class CertificationHistory:
    certification_id: UUID
    exists: bool
    peer_mentor_id: UUID | None
    current_version: int | None
    current_status: str | None
    changes: tuple[Change, ...]
    queue_entries: tuple[QueueEntryHistory, ...]
    reconcile: ReconcileVerdict
    counts: dict[str, int] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "certification_id": str(self.certification_id),
            "exists": self.exists,
            "peer_mentor_id": str(self.peer_mentor_id) if self.peer_mentor_id else None,
            "current_version": self.current_version,
            "current_status": self.current_status,
            "changes": [c.to_json_dict() for c in self.changes],
            "queue_entries": [q.to_json_dict() for q in self.queue_entries],
            "reconcile": self.reconcile.to_json_dict(),
            "counts": dict(self.counts),
        }


@dataclass(frozen=True, slots=True)
class LastReconcile:
    """The last finished reconcile that reached a verdict, and (at most ``limit``) of its mismatches."""

    run: RunSummary
    mismatches: tuple[MismatchRecord, ...]
    total: int

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "run_id": str(self.run.run_id),
            "started_at": self.run.started_at.isoformat(),
            "finished_at": self.run.finished_at.isoformat(),
            "outcome": self.run.outcome,
            "counts": dict(self.run.counts),
            "in_transit": self.run.in_transit,
            "repaired": self.run.repaired,
            "total": self.total,
            "mismatches": [
                {
                    "certification_id": str(m.certification_id),
                    "kind": m.kind,
                    "portal_version": m.portal_version,
                    "database_version": m.database_version,
                }
                for m in self.mismatches
            ],
        }


class HistoryService:
    """Builds histories from ``HistoryStore``; an unknown id is ``NotFound`` (exit 2, 404)."""

    def __init__(self, store: HistoryStore, runs: ReconcileStore) -> None:
        self._store = store
        self._runs = runs

    async def last_reconcile(self, *, limit: int = 500) -> LastReconcile | None:
        """None: no reconcile has finished with a verdict yet."""
        run = await self._runs.last_finished()
        if run is None:
            return None
        mismatches = await self._runs.run_mismatches(run.run_id, limit=limit)
        return LastReconcile(run, tuple(mismatches), sum(run.counts.values()))

    async def certification(self, certification_id: UUID) -> CertificationHistory:
        current = await self._store.certification(certification_id)
        events = await self._store.events(certification_id)
        if current is None and not events:
            raise NotFound(f"no certification {certification_id} and no captured change for it")
        entries = await self._store.queue_entries(certification_id)
        verdict = await self._store.verdict(certification_id)
        return assemble(certification_id, current, events, entries, verdict)

    async def mentor(self, peer_mentor_id: UUID) -> list[CertificationHistory]:
        """The histories of a peer mentor's certifications (those the database holds now; a deleted
        one no longer names its mentor and is found by its own id)."""
        ids = await self._store.mentor_certifications(peer_mentor_id)
        if not ids:
            raise NotFound(f"no certification of peer mentor {peer_mentor_id}")
        return [await self.certification(cid) for cid in ids]


def assemble(
    certification_id: UUID,
    current: CertificationRow | None,
    events: list[EventRow],
    entries: list[QueueEntryRow],
    verdict: VerdictRow | None,
) -> CertificationHistory:
    by_event = {e.event_id: e for e in entries if e.event_id is not None}
    changes = tuple(_change(event, current is None, by_event.get(event.id)) for event in events)
    counts: dict[str, int] = {}
    for change in changes:
        counts[change.state] = counts.get(change.state, 0) + 1
    return CertificationHistory(
        certification_id=certification_id,
        exists=current is not None,
        peer_mentor_id=current.peer_mentor_id if current else None,
        current_version=current.version if current else None,
        current_status=current.status if current else None,
        changes=changes,
        queue_entries=tuple(_entry(e) for e in entries),
        reconcile=_verdict(verdict, events),
        counts=counts,
    )


def _state(event: EventRow, gone: bool) -> State:
    status = event.status
    if gone and status in ("delivered", "superseded"):
        return "deleted"
    if status in ("waiting", "in_flight", "delivered", "superseded", "queued"):
        return status  # type: ignore[return-value]  # the outbox's check constraint holds these
    raise ValueError(f"unknown outbox status {status!r}")


def _change(event: EventRow, gone: bool, entry: QueueEntryRow | None) -> Change:
    attempts = [
        Attempt(
            kind="delivery",
            at=_moment(a.get("at")),
            outcome=str(a.get("outcome", "failed")),
            status=a.get("status"),
            reason=a.get("reason"),
            claim=a.get("claim"),
            attempt=a.get("attempt"),
            targets=a.get("targets"),
        )
        for a in event.attempt_log
    ]
    if event.status == "delivered" and event.closed_at is not None:
        before = sum(1 for a in event.attempt_log if a.get("claim") == event.attempts)
        attempts.append(
            Attempt(
                kind="delivery",
                at=event.closed_at,
                outcome="not_sent" if event.detail else "delivered",
                reason=event.detail,
                claim=event.attempts,
                attempt=None if event.detail else before + 1,
            )
        )
    if entry is not None:
        attempts.extend(
            Attempt(
                kind="replay",
                at=_moment(h.get("at")),
                outcome=str(h.get("status")),
                reason=h.get("reason"),
                by=h.get("replayed_by"),
            )
            for h in entry.failure_history
            if h.get("replayed_by") is not None
        )
    return Change(
        event_id=event.id,
        version=event.certification_version,
        operation_type=event.operation_type,
        captured_at=event.occurred_at,
        state=_state(event, gone),
        status=event.status,
        claims=event.attempts,
        closed_at=event.closed_at,
        superseded_by=event.superseded_by,
        superseded_by_version=event.superseded_by_version,
        queue_entry_id=entry.id if entry is not None else None,
        queue_status=entry.status if entry is not None else None,
        detail=event.detail,
        attempts=tuple(attempts),
    )


def _moment(value: object) -> datetime | str:
    """A recorded time (an ISO string in jsonb) as a datetime; kept as text if it is not one."""
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)


def _entry(row: QueueEntryRow) -> QueueEntryHistory:
    return QueueEntryHistory(
        id=row.id,
        event_id=row.event_id,
        operation_type=row.operation_type,
        status=row.status,
        failure_reason=row.failure_reason,
        attempt_count=row.attempt_count,
        replay_count=row.replay_count,
        last_replayed_by=row.last_replayed_by,
        discarded_by=row.discarded_by,
        discarded_reason=row.discarded_reason,
        created_at=row.created_at,
        history=tuple(row.failure_history),
    )


def _verdict(row: VerdictRow | None, events: list[EventRow]) -> ReconcileVerdict:
    if row is None:
        return ReconcileVerdict(NEVER_RECONCILED)
    if row.kind is None:
        created = [e.occurred_at for e in events if e.operation_type == "certification.created"]
        if created and min(created) > row.started_at:
            return ReconcileVerdict(NEVER_RECONCILED, row.run_id, row.finished_at)
        return ReconcileVerdict(AGREED, row.run_id, row.finished_at)
    return ReconcileVerdict(row.kind, row.run_id, row.finished_at, row.portal_version, row.database_version)
