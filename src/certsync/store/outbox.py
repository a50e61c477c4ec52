"""The certification outbox: events written by the capture trigger, claimed and closed by workers.

Every close is fenced by the claim's ``claim_token``: a worker whose lease expired (and whose event was
rescued and claimed again) cannot overwrite the newer claim's result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
import structlog
from psycopg.types.json import Jsonb

from certsync.store.current_state import GONE, CurrentState
from certsync.store.db import fetch, transaction
from certsync.store.errors import first_line
from certsync.store.pool import Pool
from certsync.store.queries import query
from certsync.store.retry_queue import NewRetryEntry, insert_entry

NOTIFY_CHANNEL = "certsync_outbox"

# A claim of at least twice this many events runs as several statements at once (``Outbox.claim``), at
# most CLAIM_PARTS: two took a 20,000-event bulk drain from 2.55–2.77 s to 1.85–1.97 s on two cores.
CLAIM_PART_MIN_EVENTS = 400
CLAIM_PARTS = 2

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """One claimed outbox event: the newest of its certification's, ours until the lease ends.

    ``current`` is what the database holds now, read in the claim's snapshot, and is what is sent
    (what the event captured stays in the outbox, for the history: a claim does not read it back).
    ``may_unlist``: this event or one it superseded may have taken the certification off the portal
    (a delete, a membership change, a repair).
    """

    id: UUID
    certification_id: UUID
    certification_version: int
    operation_type: str
    occurred_at: datetime
    attempts: int
    claim_token: UUID
    current: CurrentState = GONE
    may_unlist: bool = False


@dataclass(frozen=True, slots=True)
class DeliveredClose:
    """One delivered event to close: its claim, the claim's failed calls before the success (history),
    and a detail (why no request was needed, for one outside the portal's organisation)."""

    event: ClaimedEvent
    attempt_log: Sequence[Mapping[str, Any]] = ()
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    events: tuple[ClaimedEvent, ...]
    superseded: int


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    waiting: int
    in_flight: int
    oldest_open_at: datetime | None
    next_due_at: datetime | None


class Outbox:
    """Claims and closes outbox events for one worker (``worker_id`` is recorded on each claim)."""

    def __init__(self, pool: Pool, worker_id: str, *, organisation_id: UUID | None = None) -> None:
        self._pool = pool
        self.worker_id = worker_id
        self.organisation_id = organisation_id

    async def rescue_expired(self, now: datetime) -> int:
        rows = await fetch(self._pool, "rescue_expired_claims", {"now": now})
        return len(rows)

    async def claim(self, now: datetime, *, limit: int, lease_seconds: float) -> Claim:
        """Claim up to ``limit`` certifications' newest due events, oldest first.

        A large claim (a bulk worker's, hundreds of events) runs as up to ``CLAIM_PARTS`` statements at
        once, on their own connections: a claim's cost is per event (an update and its index entries),
        so one statement puts all of it on one database core while the worker's deliveries wait for it.
        The statements cannot take the same certification (each takes its advisory lock, and every
        waiting event under SKIP LOCKED). A part that fails leaves the others' claims valid: they are
        returned, and the failure is raised only when no part succeeded.
        """
        parts = max(1, min(CLAIM_PARTS, limit // CLAIM_PART_MIN_EVENTS))
        if parts == 1:
            return await self._claim_part(now, limit, lease_seconds)
        shares = [limit // parts + (1 if i < limit % parts else 0) for i in range(parts)]
        results = await asyncio.gather(
            *(self._claim_part(now, share, lease_seconds) for share in shares), return_exceptions=True
        )
        claims = [r for r in results if isinstance(r, Claim)]
        failures = [r for r in results if not isinstance(r, Claim)]
        for failure in failures:
            if not claims or not isinstance(failure, Exception):
                raise failure  # nothing claimed, or not a part's failure (a cancellation)
        if failures:
            log.warning("claim_part_failed", error=first_line(failures[0]), parts=parts, failed=len(failures))
        events = sorted((e for c in claims for e in c.events), key=lambda e: (e.occurred_at, e.id))
        return Claim(events=tuple(events), superseded=sum(c.superseded for c in claims))

    async def _claim_part(self, now: datetime, limit: int, lease_seconds: float) -> Claim:
        rows = await fetch(
            self._pool,
            "claim_due_events",
            {
                "now": now,
                "limit": limit,
                "worker": self.worker_id,
                "lease_seconds": lease_seconds,
                "organisation_id": self.organisation_id,
            },
        )
        events = tuple(
            ClaimedEvent(
                id=r["id"],
                certification_id=r["certification_id"],
                certification_version=r["certification_version"],
                operation_type=r["operation_type"],
                occurred_at=r["occurred_at"],
                attempts=r["attempts"],
                claim_token=r["claim_token"],
                current=CurrentState(r["current_state"], bool(r["in_scope"])),
                may_unlist=bool(r["may_unlist"]),
            )
            for r in rows
        )
        superseded = int(rows[0]["superseded_count"]) if rows else 0
        return Claim(events=events, superseded=superseded)

    async def mark_delivered_many(self, closes: Iterable[DeliveredClose], now: datetime) -> set[UUID]:
        """Close several events as delivered in one statement; the ids whose claim was still ours."""
        closing = list(closes)
        rows = await self._fenced(
            "mark_delivered_many",
            [c.event for c in closing],
            details=[c.detail for c in closing],
            # None for a claim with no failed calls (most): no JSON to encode for it.
            attempt_logs=[_log(c.attempt_log) if c.attempt_log else None for c in closing],
            now=now,
        )
        return {r["id"] for r in rows}

    async def mark_queued(
        self,
        event: ClaimedEvent,
        now: datetime,
        entry: NewRetryEntry,
        *,
        attempt_log: Sequence[Mapping[str, Any]] = (),
    ) -> int | None:
        """Close the event and write its retry-queue row in ONE transaction, so it is always in exactly
        one place. Returns the queue entry id, or None when the claim was lost (nothing written)."""
        async with transaction(self._pool, "queueing an event") as conn:
            cur = await conn.execute(
                query("mark_queued"),
                {
                    "id": event.id,
                    "claim_token": event.claim_token,
                    "now": now,
                    "detail": entry.failure_reason,
                    "attempt_log": _log(attempt_log),
                },
            )
            if await cur.fetchone() is None:
                return None
            return await insert_entry(conn, entry, now)

    async def release(
        self,
        event: ClaimedEvent,
        *,
        available_at: datetime,
        detail: str | None = None,
        attempt_log: Sequence[Mapping[str, Any]] = (),
    ) -> bool:
        rows = await fetch(
            self._pool,
            "release_claim",
            {
                "id": event.id,
                "claim_token": event.claim_token,
                "available_at": available_at,
                "detail": detail,
                "attempt_log": _log(attempt_log),
            },
        )
        return bool(rows)

    async def release_many(
        self, events: Iterable[ClaimedEvent], *, available_at: datetime, detail: str | None = None
    ) -> int:
        """Hand back several claims never attempted (a stopping worker's work kept ready) in one
        statement, as ``release`` does one; returns how many were still ours."""
        rows = await self._fenced("release_claims", list(events), available_at=available_at, detail=detail)
        return len(rows)

    async def extend_leases(self, events: Iterable[ClaimedEvent], lease_until: datetime) -> int:
        """Heartbeat for every claim still held; returns how many were extended."""
        rows = await self._fenced("extend_leases", list(events), lease_until=lease_until)
        return len(rows)

    async def _fenced(
        self, name: str, claims: Sequence[ClaimedEvent], **params: object
    ) -> list[dict[str, Any]]:
        """A statement over several claims, each fenced by its own token (``ids`` and ``tokens``, in
        step); no round trip for none."""
        if not claims:
            return []
        ids = [c.id for c in claims]
        tokens = [c.claim_token for c in claims]
        return await fetch(self._pool, name, {"ids": ids, "tokens": tokens, **params})

    async def depth(self) -> OutboxDepth:
        rows = await fetch(self._pool, "outbox_depth", {})
        r = rows[0]
        return OutboxDepth(
            waiting=int(r["waiting"]),
            in_flight=int(r["in_flight"]),
            oldest_open_at=r["oldest_open_at"],
            next_due_at=r["next_due_at"],
        )


def _log(attempt_log: Sequence[Mapping[str, Any]]) -> Jsonb:
    """A claim's failed calls as the jsonb array the close appends to ``attempt_log`` (history)."""
    return Jsonb([dict(entry) for entry in attempt_log])


class DeliveredCloser:
    """Group commit for the worker's delivered closes: a close asked for while a statement runs joins
    the next one, so N deliveries finishing together cost one round trip, not N (at a high delivery rate
    the per-event close was the worker's largest database cost). Nothing waits on a timer: a lone close
    goes at once. Each caller gets its own fenced answer (True: closed; False: the claim was lost), and
    a statement that fails raises in every caller whose close it carried (their events stay in flight
    until the lease ends, as with a single close)."""

    def __init__(self, outbox: Outbox, *, max_batch: int = 500) -> None:
        self._outbox = outbox
        self._max_batch = max_batch
        self._queued: list[tuple[DeliveredClose, datetime, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def close(
        self,
        event: ClaimedEvent,
        now: datetime,
        *,
        detail: str | None = None,
        attempt_log: Sequence[Mapping[str, Any]] = (),
    ) -> bool:
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queued.append((DeliveredClose(event, tuple(attempt_log), detail), now, answer))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="outbox-delivered-closes")
        return await answer

    async def _flush(self) -> None:
        batch: list[tuple[DeliveredClose, datetime, asyncio.Future[bool]]] = []
        try:
            while self._queued:
                batch = self._queued[: self._max_batch]
                del self._queued[: self._max_batch]
                try:
                    closed = await self._outbox.mark_delivered_many(
                        [close for close, _, _ in batch], max(now for _, now, _ in batch)
                    )
                except Exception as exc:
                    for _, _, answer in batch:
                        if not answer.done():
                            answer.set_exception(exc)
                    continue
                for close, _, answer in batch:
                    if not answer.done():  # its delivery was cancelled meanwhile
                        answer.set_result(close.event.id in closed)
        finally:
            self._flusher = None
            # Left unanswered only when this task itself is cancelled (the event loop shutting down).
            for _, _, answer in [*batch, *self._queued]:
                if not answer.done():
                    answer.cancel()
            self._queued.clear()


class OutboxListener:
    """Wakes the worker on ``pg_notify`` from the capture trigger, on a connection of its own.

    A connection pooler in transaction mode (Supabase's port 6543) does not pass notifications, and a
    connection can drop: the worker polls anyway, so a missing notification only costs latency; a
    lost connection is reported and reopened with back-off.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn

    async def run(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        """Set ``wake`` on every notification until ``stop`` is set (or the task is cancelled)."""
        backoff, lost = 0.5, False
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(f"listen {NOTIFY_CHANNEL}")
                    if backoff > 0.5 or lost:
                        log.info("outbox_listener_reconnected")
                    backoff, lost = 0.5, False
                    while not stop.is_set():
                        async for _ in conn.notifies(timeout=1.0):
                            wake.set()
            except psycopg.Error as exc:
                lost = True
                log.warning("outbox_listener_lost", error=first_line(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
