"""The Dynamics retry queue (``dynamics_sync_retry_queue``): what could not be delivered, kept for
replay (``pending``: automatic, then manual) or investigation (``requires_investigation``).

``next_auto_replay_at`` is an entry's automatic-replay schedule: set where entries are written
(pending: due now; anything else: null, it waits for a person), taken as a lease by
``claim_auto_replays`` and moved on by ``schedule_auto_replay`` after each automatic replay.
Replayed and discarded entries are final; retention (``store/retention.py``) deletes them in time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from certsync.store.current_state import GONE, CurrentState
from certsync.store.db import fetch, transaction
from certsync.store.errors import NotFound
from certsync.store.pool import Pool
from certsync.store.queries import query

QueueStatus = Literal["pending", "requires_investigation", "replayed", "discarded"]
QUEUE_STATUSES: tuple[QueueStatus, ...] = ("pending", "requires_investigation", "replayed", "discarded")

MAX_AUTO_REPLAYS = 5
"""Automatic replays an entry gets before it waits for a person (``delivery/auto_replay.py``)."""


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
    auto_replay_count: int
    next_auto_replay_at: datetime | None  # None: it waits for a person

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


@dataclass(frozen=True, slots=True)
class AutoReplayClaim:
    """A pending entry one worker has taken for an automatic replay (its lease is held in the row)."""

    id: int
    auto_replay_count: int  # automatic replays already made, not counting this one


@dataclass(frozen=True, slots=True)
class QueueFilters:
    """Which retry-queue entries an operator means; every field optional. ``created_to`` is exclusive."""

    status: str | None = None
    operation_type: str | None = None
    certification_id: UUID | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None

    def params(self, *, actionable_only: bool = False) -> dict[str, Any]:
        return {
            "status": self.status,
            "operation_type": self.operation_type,
            "certification_id": self.certification_id,
            "created_from": self.created_from,
            "created_to": self.created_to,
            "actionable_only": actionable_only,
        }


@dataclass(frozen=True, slots=True)
class QueueCursor:
    """The last entry of a page; the next page starts after it (newest first)."""

    created_at: datetime
    id: int


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

    async def page(
        self,
        filters: QueueFilters,
        *,
        after: QueueCursor | None = None,
        limit: int = 50,
        actionable_only: bool = False,
    ) -> list[RetryEntrySummary]:
        """One page, newest first (keyset on ``(created_at, id)``: the same cost at any depth, and rows
        added meanwhile never shift it). ``actionable_only``: what replay and discard may change."""
        rows = await fetch(
            self._pool,
            "retry_entries_page",
            {
                **filters.params(actionable_only=actionable_only),
                "before_created_at": after.created_at if after else None,
                "before_id": after.id if after else None,
                "limit": limit,
            },
        )
        return [summary_of(row) for row in rows]

    async def list_entries(
        self,
        *,
        status: str | None = None,
        operation_type: str | None = None,
        certification_id: UUID | None = None,
        limit: int = 50,
    ) -> list[RetryEntrySummary]:
        """The newest ``limit`` entries matching."""
        return await self.page(QueueFilters(status, operation_type, certification_id), limit=limit)

    async def iterate(
        self,
        *,
        status: str | None = None,
        operation_type: str | None = None,
        certification_id: UUID | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[RetryEntrySummary]:
        """Every matching entry, newest first, a page at a time (bounded memory)."""
        filters = QueueFilters(status, operation_type, certification_id)
        after: QueueCursor | None = None
        while True:
            page = await self.page(filters, after=after, limit=page_size)
            for row in page:
                yield row
            if len(page) < page_size:
                return
            after = QueueCursor(page[-1].created_at, page[-1].id)

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
                "max_auto_replays": MAX_AUTO_REPLAYS,
            },
        )
        if not rows:
            raise NotFound(f"no retry queue entry with id {entry_id}")

    async def claim_auto_replays(
        self, now: datetime, *, limit: int, lease_seconds: float
    ) -> list[AutoReplayClaim]:
        """Take up to ``limit`` pending entries due for an automatic replay (SKIP LOCKED), holding each
        for ``lease_seconds``: no other worker takes it meanwhile."""
        rows = await fetch(
            self._pool,
            "claim_due_auto_replays",
            {"now": now, "limit": limit, "lease_until": now + timedelta(seconds=lease_seconds)},
        )
        return [AutoReplayClaim(int(r["id"]), int(r["auto_replay_count"])) for r in rows]

    async def schedule_auto_replay(self, entry_id: int, *, counted: bool, next_at: datetime | None) -> None:
        """After an automatic replay: count it (``counted``) and set the next one (None: a person's).
        An entry that is no longer pending keeps no schedule. A vanished entry is no error."""
        await fetch(
            self._pool, "schedule_auto_replay", {"id": entry_id, "counted": counted, "next_at": next_at}
        )

    async def discard(self, entry_id: int, *, reason: str, by: str, now: datetime) -> bool:
        """Mark discarded (kept, with the reason). False when it was already replayed or discarded."""
        await self.get(entry_id)  # NotFound for an id that names nothing
        rows = await fetch(
            self._pool, "discard_retry_entry", {"id": entry_id, "reason": reason, "by": by, "now": now}
        )
        return bool(rows)

    async def current_state(
        self, certification_id: UUID, *, organisation_id: UUID | None = None
    ) -> CurrentState:
        """The certification now, as the portal would receive it, and whether it is in scope."""
        rows = await fetch(
            self._pool,
            "current_certification_state",
            {"id": certification_id, "organisation_id": organisation_id},
        )
        if not rows:
            return GONE
        return CurrentState(dict(rows[0]["state"]), bool(rows[0]["in_scope"]))

    async def counts(self) -> dict[str, tuple[int, datetime | None]]:
        rows = await fetch(self._pool, "retry_queue_counts", {})
        return {r["status"]: (int(r["entries"]), r["oldest_at"]) for r in rows}
