"""Read models for the operator console and the metrics: filtered retry-queue pages and counts, and
delivery figures (``store/sql/console.sql``). Changes to the queue stay in ``RetryQueue``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from certsync.resilience.breaker import BreakerStatus, DynamicsCircuitBreaker
from certsync.store.db import fetch
from certsync.store.outbox import Outbox, OutboxDepth
from certsync.store.pool import Pool
from certsync.store.retry_queue import RetryQueue


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


@dataclass(frozen=True, slots=True)
class DeliveryFigures:
    delivered_since: int
    last_delivered_at: datetime | None


class ConsoleQueries:
    """The console's reads. ``actionable_only`` narrows to what replay and discard may change."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def page(
        self,
        filters: QueueFilters,
        *,
        after: QueueCursor | None = None,
        limit: int = 50,
        actionable_only: bool = False,
    ) -> list[dict[str, Any]]:
        return await fetch(
            self._pool,
            "console_retry_entries_page",
            {
                **filters.params(actionable_only=actionable_only),
                "before_created_at": after.created_at if after else None,
                "before_id": after.id if after else None,
                "limit": limit,
            },
        )

    async def count(self, filters: QueueFilters, *, actionable_only: bool = False) -> int:
        rows = await fetch(
            self._pool, "console_count_retry_entries", filters.params(actionable_only=actionable_only)
        )
        return int(rows[0]["entries"])

    async def operation_types(self) -> list[str]:
        return [str(r["operation_type"]) for r in await fetch(self._pool, "console_operation_types", {})]

    async def delivery_figures(self, since: datetime) -> DeliveryFigures:
        [row] = await fetch(self._pool, "console_delivery_figures", {"since": since})
        return DeliveryFigures(int(row["delivered_since"]), row["last_delivered_at"])


@dataclass(frozen=True, slots=True)
class QueueCount:
    entries: int
    oldest_at: datetime | None


@dataclass(frozen=True, slots=True)
class SystemStatus:
    """What every process reads the same from the database: the overview page and the metrics' gauges."""

    read_at: datetime
    breaker: BreakerStatus
    outbox: OutboxDepth
    queue: dict[str, QueueCount]
    delivered_last_hour: int
    last_delivered_at: datetime | None

    def queue_count(self, status: str) -> QueueCount:
        return self.queue.get(status, QueueCount(0, None))

    @property
    def oldest_outbox_age(self) -> timedelta | None:
        oldest = self.outbox.oldest_open_at
        return None if oldest is None else max(self.read_at - oldest, timedelta(0))

    @property
    def oldest_pending_age(self) -> timedelta | None:
        oldest = self.queue_count("pending").oldest_at
        return None if oldest is None else max(self.read_at - oldest, timedelta(0))


async def read_system_status(pool: Pool, breaker: DynamicsCircuitBreaker, now: datetime) -> SystemStatus:
    """Read the shared state at ``now`` (the breaker reads its own clock, which clamps a skewed one)."""
    breaker_status = await breaker.status()
    counts = await RetryQueue(pool).counts()
    figures = await ConsoleQueries(pool).delivery_figures(now - timedelta(hours=1))
    return SystemStatus(
        read_at=now,
        breaker=breaker_status,
        # The depth query does not use the worker id; a reader claims nothing.
        outbox=await Outbox(pool, worker_id="status-reader").depth(),
        queue={status: QueueCount(entries, oldest) for status, (entries, oldest) in counts.items()},
        delivered_last_hour=figures.delivered_since,
        last_delivered_at=figures.last_delivered_at,
    )
