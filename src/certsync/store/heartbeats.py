"""Worker heartbeats in PostgreSQL: each running worker's last beat, read alike by every process."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from certsync.store.db import fetch
from certsync.store.pool import Pool

__all__ = ["WorkerBeat", "WorkerHeartbeats"]


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """The latest beat of a running worker (None: none runs, or none ever did) and how many beat lately."""

    last_beat_at: datetime | None
    alive: int


class WorkerHeartbeats:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def beat(self, worker_id: str, *, now: datetime, started_at: datetime, sending: bool) -> None:
        params = {"worker_id": worker_id, "now": now, "started_at": started_at, "sending": sending}
        await fetch(self._pool, "worker_beat", params)

    async def stopped(self, worker_id: str, *, now: datetime) -> None:
        await fetch(self._pool, "worker_stopped", {"worker_id": worker_id, "now": now})

    async def latest(self, *, now: datetime, within: timedelta) -> WorkerBeat:
        """The last beat of any running worker, and how many beat within ``within`` of ``now``."""
        rows = await fetch(self._pool, "last_worker_beat", {"since": now - within})
        return WorkerBeat(rows[0]["beat_at"], int(rows[0]["alive"]))
