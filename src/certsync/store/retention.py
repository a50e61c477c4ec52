"""Retention: the worker deletes what is finished once it is old enough (docs/listing-truth.md).

* delivered and superseded outbox events, ``CERTSYNC_OUTBOX_RETENTION_DAYS`` after they closed;
* replayed and discarded retry-queue entries, ``CERTSYNC_QUEUE_RETENTION_DAYS`` after they became final;
* access-audit records, ``CERTSYNC_AUDIT_RETENTION_DAYS`` after the read or write they record.

Each statement deletes at most ``batch_size`` rows, walking a partial index from its oldest end, and is
its own short transaction: a table of a million rows is never locked or scanned whole, and a delivery
never waits behind a long delete. One run deletes at most ``max_batches`` batches per table; a run
that stopped at that bound says so (``complete`` false) and the worker runs again on its next tick.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from certsync.store.db import fetch
from certsync.store.pool import Pool

_QUERIES = {
    "outbox": "prune_closed_events",
    "queue": "prune_final_retry_entries",
    "audit": "prune_access_audit",
}


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long each kind of finished row is kept, and how much one statement and one run delete."""

    outbox_days: float = 30.0
    queue_days: float = 90.0
    audit_days: float = 365.0
    batch_size: int = 2000
    max_batches: int = 25

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ValueError(f"batch_size ({self.batch_size}) must be between 1 and 10000")
        if self.max_batches < 1:
            raise ValueError(f"max_batches ({self.max_batches}) must be at least 1")

    def cutoffs(self, now: datetime) -> dict[str, datetime]:
        return {
            "outbox": now - timedelta(days=self.outbox_days),
            "queue": now - timedelta(days=self.queue_days),
            "audit": now - timedelta(days=self.audit_days),
        }


@dataclass(slots=True)
class RetentionReport:
    """What one run deleted: per table, the rows each statement deleted, in order."""

    batches: dict[str, list[int]] = field(default_factory=dict)
    complete: bool = True

    def deleted(self, table: str) -> int:
        return sum(self.batches.get(table, []))

    @property
    def total(self) -> int:
        return sum(sum(counts) for counts in self.batches.values())


class Retention:
    """Deletes old finished rows in batches. Raises DatabaseUnavailable like every store call."""

    def __init__(self, pool: Pool, policy: RetentionPolicy) -> None:
        self._pool = pool
        self.policy = policy

    async def run(self, now: datetime) -> RetentionReport:
        report = RetentionReport()
        for table, cutoff in self.policy.cutoffs(now).items():
            counts = report.batches.setdefault(table, [])
            while True:
                rows = await fetch(
                    self._pool, _QUERIES[table], {"before": cutoff, "limit": self.policy.batch_size}
                )
                deleted = int(rows[0]["deleted"])
                counts.append(deleted)
                if deleted < self.policy.batch_size:
                    break
                if len(counts) >= self.policy.max_batches:
                    report.complete = False
                    break
                await asyncio.sleep(0)  # let the deliveries in flight run between two batches
        return report
