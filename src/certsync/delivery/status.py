"""What every process reads the same from the database: the console's overview and the metrics' gauges."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from certsync.resilience.breaker import BreakerStatus, DynamicsCircuitBreaker, Transition
from certsync.store.console_queries import ConsoleQueries
from certsync.store.heartbeats import WorkerBeat, WorkerHeartbeats
from certsync.store.outbox import Outbox, OutboxDepth
from certsync.store.pool import Pool
from certsync.store.reconcile import ReconcileStore, RunSummary
from certsync.store.retry_queue import RetryQueue

__all__ = [
    "ALIVE_WITHIN",
    "BreakerStatus",
    "OutboxDepth",
    "QueueCount",
    "RunSummary",
    "SystemStatus",
    "Transition",
    "read_system_status",
]


# A worker beats every 10 s; one silent for a minute is not alive.
ALIVE_WITHIN = timedelta(seconds=60)


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
    # The last reconcile that reached a verdict (None: none yet), as every process reads it.
    last_reconcile: RunSummary | None = None
    # The last heartbeat of a running worker, and how many beat within ``ALIVE_WITHIN``.
    workers: WorkerBeat | None = None

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
        last_reconcile=await ReconcileStore(pool).last_finished(),
        workers=await WorkerHeartbeats(pool).latest(now=now, within=ALIVE_WITHIN),
    )
