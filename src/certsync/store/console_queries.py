"""Read models for the operator console and the metrics: counts of a filtered selection, the filter's
choices and the delivery figures (``store/sql/console.sql``). The queue's pages and changes are
``RetryQueue``'s."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from certsync.store.db import fetch
from certsync.store.pool import Pool
from certsync.store.retry_queue import QueueCursor, QueueFilters

__all__ = ["ConsoleQueries", "DeliveryFigures", "QueueCursor", "QueueFilters"]


@dataclass(frozen=True, slots=True)
class DeliveryFigures:
    delivered_since: int
    last_delivered_at: datetime | None


class ConsoleQueries:
    """The console's reads. ``actionable_only`` narrows to what replay and discard may change."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

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
