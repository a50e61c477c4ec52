"""The shared circuit breaker's state in PostgreSQL (``dynamics_circuit_breakers``), one row per breaker.

``PostgresBreakerStore`` implements ``certsync.resilience.breaker.BreakerStore``: every operation is
one atomic statement from ``sql/breaker_state.sql``, so every worker process shares one breaker and
only one of them gets the half-open probe. Time comes from the caller's clock, never the database's.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from certsync.resilience.breaker import (
    ALLOWED_CLOSED,
    BreakerSnapshot,
    CircuitState,
    Now,
    Permit,
    Transition,
    denied_permit,
    failure_transition,
    probe_permit,
    reset_transition,
    success_transition,
)
from certsync.store.db import fetch
from certsync.store.pool import Pool

__all__ = ["PostgresBreakerStore", "snapshot_from_row"]


class PostgresBreakerStore:
    """Breaker state shared through PostgreSQL. Raises ``DatabaseUnavailable`` when it cannot reach it.

    ``closed_cache_seconds`` (0: off, every call asks the database) lets a process that has just seen
    the breaker closed and clean skip the two round trips a healthy delivery would otherwise cost
    (``try_acquire`` and ``record_success``), and the snapshot the worker reads before each claim, for
    that long. The price: a circuit another worker opens
    is noticed here up to that much later, and a success here does not reset another worker's fresh
    failure count during it. Any failure this process records drops the cache at once.
    """

    def __init__(self, pool: Pool, *, closed_cache_seconds: float = 0.0) -> None:
        self._pool = pool
        self._cache_for = timedelta(seconds=closed_cache_seconds)
        self._seen_clean_at: dict[str, datetime] = {}

    def _fresh(self, name: str, now: datetime) -> bool:
        seen = self._seen_clean_at.get(name)
        return seen is not None and timedelta(0) <= now - seen < self._cache_for

    async def snapshot(self, name: str, now: datetime) -> BreakerSnapshot:
        if self._fresh(name, now):
            # Seen closed and clean within the cache window: what the worker asks before each claim.
            return BreakerSnapshot(name)
        rows = await fetch(self._pool, "breaker_snapshot", {"name": name, "now": now})
        return snapshot_from_row(rows[0]) if rows else BreakerSnapshot(name)

    async def try_acquire(self, name: str, now: Now, cooldown: timedelta, probe_lease: timedelta) -> Permit:
        at = now()
        if self._fresh(name, at):
            return ALLOWED_CLOSED
        rows = await fetch(
            self._pool,
            "breaker_try_acquire",
            {"name": name, "now": at, "cooldown": cooldown, "lease_until": at + probe_lease},
        )
        if not rows:
            return ALLOWED_CLOSED
        row = rows[0]
        if row["wins"]:
            return probe_permit(CircuitState(row["old_state"]))
        return denied_permit(snapshot_from_row(row), cooldown)

    async def record_success(self, name: str, now: Now) -> Transition | None:
        at = now()
        if self._fresh(name, at):
            return None
        rows = await fetch(self._pool, "breaker_record_success", {"name": name, "now": at})
        if self._cache_for:
            # After this statement the breaker is closed and clean, whatever it was before.
            self._seen_clean_at[name] = at
        return success_transition(CircuitState(rows[0]["old_state"])) if rows else None

    async def record_failure(
        self, name: str, now: datetime, threshold: int, reason: str
    ) -> Transition | None:
        self._seen_clean_at.pop(name, None)
        rows = await fetch(
            self._pool,
            "breaker_record_failure",
            {"name": name, "now": now, "threshold": threshold, "reason": reason},
        )
        if not rows:
            return None  # open: failures are not counted
        row = rows[0]
        return failure_transition(CircuitState(row["old_state"]), snapshot_from_row(row), reason)

    async def reset(self, name: str, now: datetime) -> Transition | None:
        self._seen_clean_at.pop(name, None)
        rows = await fetch(self._pool, "breaker_reset", {"name": name})
        return reset_transition(CircuitState(rows[0]["old_state"])) if rows else None


def snapshot_from_row(row: dict[str, Any]) -> BreakerSnapshot:
    """A ``dynamics_circuit_breakers`` row (as a dict) as a snapshot, its times in UTC."""
    return BreakerSnapshot(
        name=row["name"],
        state=CircuitState(row["state"]),
        consecutive_failures=row["consecutive_failures"],
        opened_at=_utc(row["opened_at"]),
        probe_lease_until=_utc(row["probe_lease_until"]),
        last_failure_reason=row["last_failure_reason"],
    )


def _utc(moment: datetime | None) -> datetime | None:
    # The session's TimeZone decides how timestamptz comes back; snapshots always speak UTC.
    return None if moment is None else moment.astimezone(UTC)
