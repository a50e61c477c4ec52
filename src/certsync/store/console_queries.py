"""Read models for the operator console and the metrics: filtered retry-queue pages and counts, and
delivery figures (``store/sql/console.sql``). Changes to the queue stay in ``RetryQueue``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from certsync.store.db import fetch
from certsync.store.pool import Pool
from certsync.store.retry_queue import RetryEntrySummary, summary_of


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
    ) -> list[RetryEntrySummary]:
        rows = await fetch(
            self._pool,
            "console_retry_entries_page",
            {
                **filters.params(actionable_only=actionable_only),
                "before_created_at": after.created_at if after else None,
                "before_id": after.id if after else None,
                "limit": limit,
            },
        )
        return [summary_of(row) for row in rows]

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
