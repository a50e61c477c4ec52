"""The Dynamics retry queue (``dynamics_sync_retry_queue``): what could not be delivered, kept for
manual replay (``pending``) or investigation (``requires_investigation``), never dropped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from certsync.store.db import fetch, transaction
from certsync.store.errors import NotFound
from certsync.store.pool import Pool
from certsync.store.queries import query

QueueStatus = Literal["pending", "requires_investigation", "replayed", "discarded"]
QUEUE_STATUSES: tuple[QueueStatus, ...] = ("pending", "requires_investigation", "replayed", "discarded")


@dataclass(frozen=True, slots=True)
class NewRetryEntry:
    """A failed delivery to keep. ``payload_json`` is the full request body that was (or would be) sent."""

    operation_type: str
    certification_id: UUID | None
    event_id: UUID | None
    payload_json: dict[str, Any]
    failure_reason: str
    attempt_count: int
    status: Literal["pending", "requires_investigation"]


@dataclass(frozen=True, slots=True)
class RetryEntrySummary:
    """One retry-queue entry as lists show it."""

    id: int
    operation_type: str
    certification_id: UUID | None
    event_id: UUID | None
    failure_reason: str
    attempt_count: int
    status: QueueStatus
    replay_count: int
    last_replayed_at: datetime | None
    last_replayed_by: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def actionable(self) -> bool:
        """Replay and discard apply to it (it waits for a person)."""
        return self.status in ("pending", "requires_investigation")


@dataclass(frozen=True, slots=True)
class RetryEntry(RetryEntrySummary):
    """One entry whole: what was (or would have been) sent, and every failure, replay and discard."""

    payload_json: Any  # an object as written by certsync; a hand-edited row may hold any JSON
    failure_history: list[dict[str, Any]]
    discarded_reason: str | None
    discarded_by: str | None


def summary_of(row: dict[str, Any]) -> RetryEntrySummary:
    return RetryEntrySummary(**row)


async def insert_entry(conn: AsyncConnection[Any], entry: NewRetryEntry, now: datetime) -> int:
    """Insert on a caller's connection (so it can share the caller's transaction)."""
    cur = await conn.execute(
        query("insert_retry_entry"),
        {
            "operation_type": entry.operation_type,
            "certification_id": entry.certification_id,
            "event_id": entry.event_id,
            "payload_json": Jsonb(entry.payload_json),
            "failure_reason": entry.failure_reason,
            "attempt_count": entry.attempt_count,
            "status": entry.status,
            "now": now,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return int(dict(row)["id"])


class RetryQueue:
    """Reads and changes the retry queue. Every method raises DatabaseUnavailable, never swallows."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def add(self, entry: NewRetryEntry, now: datetime) -> int:
        async with transaction(self._pool, "writing the retry queue") as conn:
            return await insert_entry(conn, entry, now)

    async def get(self, entry_id: int) -> RetryEntry:
        rows = await fetch(self._pool, "get_retry_entry", {"id": entry_id})
        if not rows:
            raise NotFound(f"no retry queue entry with id {entry_id}")
        return RetryEntry(**rows[0])

    async def list_entries(
        self,
        *,
        status: str | None = None,
        operation_type: str | None = None,
        certification_id: UUID | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[RetryEntrySummary]:
        rows = await fetch(
            self._pool,
            "list_retry_entries",
            {
                "status": status,
                "operation_type": operation_type,
                "certification_id": certification_id,
                "before_id": before_id,
                "limit": limit,
            },
        )
        return [summary_of(row) for row in rows]

    async def iterate(
        self,
        *,
        status: str | None = None,
        operation_type: str | None = None,
        certification_id: UUID | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[RetryEntrySummary]:
        """Every matching entry, newest first, a page at a time (keyset paging: bounded memory)."""
        before: int | None = None
        while True:
            page = await self.list_entries(
                status=status,
                operation_type=operation_type,
                certification_id=certification_id,
                before_id=before,
                limit=page_size,
            )
            for row in page:
                yield row
            if len(page) < page_size:
                return
            before = page[-1].id

    async def record_replay_outcome(
        self,
        entry_id: int,
        *,
        status: QueueStatus,
        failure_reason: str | None,
        attempts: int,
        by: str,
        now: datetime,
        payload_json: dict[str, Any] | None,
    ) -> None:
        rows = await fetch(
            self._pool,
            "record_replay_outcome",
            {
                "id": entry_id,
                "status": status,
                "failure_reason": failure_reason,
                "attempts": attempts,
                "by": by,
                "now": now,
                "payload_json": Jsonb(payload_json) if payload_json is not None else None,
            },
        )
        if not rows:
            raise NotFound(f"no retry queue entry with id {entry_id}")

    async def discard(self, entry_id: int, *, reason: str, by: str, now: datetime) -> bool:
        """Mark discarded (kept, with the reason). False when it was already replayed or discarded."""
        await self.get(entry_id)  # NotFound for an id that names nothing
        rows = await fetch(
            self._pool, "discard_retry_entry", {"id": entry_id, "reason": reason, "by": by, "now": now}
        )
        return bool(rows)

    async def current_state(self, certification_id: UUID) -> dict[str, Any] | None:
        """The certification's state now, as the portal would receive it; None if it no longer exists."""
        rows = await fetch(self._pool, "current_certification_state", {"id": certification_id})
        return dict(rows[0]["state"]) if rows else None

    async def counts(self) -> dict[str, tuple[int, datetime | None]]:
        rows = await fetch(self._pool, "retry_queue_counts", {})
        return {r["status"]: (int(r["entries"]), r["oldest_at"]) for r in rows}
