"""The retry queue as operators use it, shared by ``certsync queue`` and the console: reading entries,
replaying and discarding them, recording who acted.

Replay goes through ``ReplayService`` (the same retry policy and circuit breaker as the worker); it is
built only when first asked for, so reading the queue needs no portal configuration.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from uuid import UUID

import structlog

from certsync.delivery.replay import ReplayResult, ReplayService, ReplaySummary
from certsync.resilience.clock import Clock
from certsync.store.console_queries import ConsoleQueries
from certsync.store.retry_queue import (
    QUEUE_STATUSES,
    QueueCursor,
    QueueFilters,
    QueueStatus,
    RetryEntry,
    RetryEntrySummary,
    RetryQueue,
)

__all__ = [
    "QUEUE_STATUSES",
    "DiscardResult",
    "QueueCursor",
    "QueueFilters",
    "QueueService",
    "QueueStatus",
    "ReplayResult",
    "ReplaySummary",
    "RetryEntry",
    "RetryEntrySummary",
]

log = structlog.get_logger(__name__)

PAGE_SIZE = 500
"""Rows fetched per round trip when streaming: about 0.5 MB of rows in memory, whatever the total."""


@dataclass(frozen=True, slots=True)
class DiscardResult:
    entry_id: int
    discarded: bool
    status: QueueStatus  # after the attempt: "discarded", or what it already was


class QueueService:
    """One face's operations on the retry queue; ``by`` is always the person acting."""

    def __init__(
        self, queue: RetryQueue, queries: ConsoleQueries, replays: Callable[[], ReplayService], clock: Clock
    ) -> None:
        self._queue = queue
        self._queries = queries
        self._replays = replays
        self._clock = clock

    async def entries(
        self,
        *,
        status: str | None = None,
        operation_type: str | None = None,
        certification_id: UUID | None = None,
        limit: int = 0,
    ) -> AsyncIterator[RetryEntrySummary]:
        """Newest first, at most ``limit`` (0: all), streamed a page at a time (bounded memory)."""
        page_size = min(limit, PAGE_SIZE) if limit else PAGE_SIZE
        rows = self._queue.iterate(
            status=status,
            operation_type=operation_type,
            certification_id=certification_id,
            page_size=page_size,
        )
        taken = 0
        async with contextlib.aclosing(rows):  # type: ignore[type-var]
            async for row in rows:
                yield row
                taken += 1
                if taken == limit:
                    return

    async def get(self, entry_id: int) -> RetryEntry:
        """One entry whole; ``NotFound`` if there is none."""
        return await self._queue.get(entry_id)

    async def require(self, entry_ids: list[int]) -> list[RetryEntry]:
        """Every named entry, or ``NotFound`` for the first that is missing: check before acting."""
        return [await self._queue.get(entry_id) for entry_id in entry_ids]

    async def count(self, status: str) -> int:
        return (await self._queue.counts()).get(status, (0, None))[0]

    async def page(
        self, filters: QueueFilters, *, after: QueueCursor | None, limit: int, actionable_only: bool = False
    ) -> list[RetryEntrySummary]:
        return await self._queue.page(filters, after=after, limit=limit, actionable_only=actionable_only)

    async def matching(self, filters: QueueFilters, *, actionable_only: bool = False) -> int:
        return await self._queries.count(filters, actionable_only=actionable_only)

    async def operation_types(self) -> list[str]:
        return await self._queries.operation_types()

    async def replay(self, entry_id: int, *, by: str) -> ReplayResult:
        return await self._replays().replay(entry_id, by=by)

    async def replay_all(
        self, *, status: str | None, by: str, on_result: Callable[[ReplayResult], None] | None = None
    ) -> ReplaySummary:
        return await self._replays().replay_all(status=status, by=by, on_result=on_result)

    async def discard(self, entry_id: int, *, reason: str, by: str) -> DiscardResult:
        """Mark one entry discarded (kept, with the reason); an entry already closed is left as it is."""
        if await self._queue.discard(entry_id, reason=reason, by=by, now=self._clock.now()):
            return DiscardResult(entry_id, True, "discarded")
        return DiscardResult(entry_id, False, (await self._queue.get(entry_id)).status)
