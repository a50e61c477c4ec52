"""One certification's sync history as the database recorded it: its captured changes (outbox events,
with each claim's failed calls in ``attempt_log``), its retry-queue entries, and the last finished
reconcile's verdict on it. Operator-paced reads; nothing here is on the delivery path."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

from certsync.store.db import fetch
from certsync.store.pool import Pool

__all__ = ["CertificationRow", "EventRow", "HistoryStore", "QueueEntryRow", "VerdictRow"]


@dataclass(frozen=True, slots=True)
class CertificationRow:
    id: UUID
    peer_mentor_id: UUID
    status: str
    version: int
    valid_until: date
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EventRow:
    id: UUID
    certification_version: int
    operation_type: str
    status: str
    attempts: int
    superseded_by: UUID | None
    superseded_by_version: int | None
    occurred_at: datetime
    available_at: datetime
    closed_at: datetime | None
    claimed_by: str | None
    detail: str | None
    attempt_log: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class QueueEntryRow:
    id: int
    event_id: UUID | None
    operation_type: str
    status: str
    failure_reason: str | None
    attempt_count: int
    replay_count: int
    last_replayed_at: datetime | None
    last_replayed_by: str | None
    discarded_reason: str | None
    discarded_by: str | None
    failure_history: list[dict[str, Any]]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """The last finished run and its mismatch for one certification (``kind`` None: none found)."""

    run_id: UUID
    started_at: datetime
    finished_at: datetime
    kind: str | None
    portal_version: int | None
    database_version: int | None


class HistoryStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def certification(self, certification_id: UUID) -> CertificationRow | None:
        rows = await fetch(self._pool, "history_certification", {"certification_id": certification_id})
        if not rows:
            return None
        r = rows[0]
        return CertificationRow(
            r["id"], r["peer_mentor_id"], r["status"], int(r["version"]), r["valid_until"], r["updated_at"]
        )

    async def events(self, certification_id: UUID) -> list[EventRow]:
        rows = await fetch(self._pool, "history_events", {"certification_id": certification_id})
        return [
            EventRow(
                id=r["id"],
                certification_version=int(r["certification_version"]),
                operation_type=r["operation_type"],
                status=r["status"],
                attempts=int(r["attempts"]),
                superseded_by=r["superseded_by"],
                superseded_by_version=r["superseded_by_version"],
                occurred_at=r["occurred_at"],
                available_at=r["available_at"],
                closed_at=r["closed_at"],
                claimed_by=r["claimed_by"],
                detail=r["detail"],
                attempt_log=list(r["attempt_log"] or []),
            )
            for r in rows
        ]

    async def queue_entries(self, certification_id: UUID) -> list[QueueEntryRow]:
        rows = await fetch(self._pool, "history_queue_entries", {"certification_id": certification_id})
        return [
            QueueEntryRow(
                id=int(r["id"]),
                event_id=r["event_id"],
                operation_type=r["operation_type"],
                status=r["status"],
                failure_reason=r["failure_reason"],
                attempt_count=int(r["attempt_count"]),
                replay_count=int(r["replay_count"]),
                last_replayed_at=r["last_replayed_at"],
                last_replayed_by=r["last_replayed_by"],
                discarded_reason=r["discarded_reason"],
                discarded_by=r["discarded_by"],
                failure_history=list(r["failure_history"] or []),
                created_at=r["created_at"],
                updated_at=r["updated_at"],
            )
            for r in rows
        ]

    async def verdict(self, certification_id: UUID) -> VerdictRow | None:
        """None: no reconcile has finished with a verdict yet."""
        rows = await fetch(self._pool, "history_reconcile_verdict", {"certification_id": certification_id})
        if not rows:
            return None
        r = rows[0]
        return VerdictRow(
            r["run_id"],
            r["started_at"],
            r["finished_at"],
            r["kind"],
            r["portal_version"],
            r["database_version"],
        )

    async def mentor_certifications(self, peer_mentor_id: UUID) -> list[UUID]:
        rows = await fetch(self._pool, "history_mentor_certifications", {"peer_mentor_id": peer_mentor_id})
        return [r["id"] for r in rows]
