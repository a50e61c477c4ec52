"""Test mode for retry and breaker together: a manual clock whose sleep advances time at once.

Public so that any test (ours or a deployer's) can run the delivery path without real waits::

    clock = ManualClock()
    service = HLFDynamicsSyncService(..., clock=clock, sleep=clock.sleep)
    ...
    assert clock.sleeps == [2.0, 4.0, 8.0]
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


class ManualClock:
    """A clock that only moves when told to, or when something sleeps on it."""

    def __init__(self, start: datetime = _EPOCH) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware start")
        self._now = start
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards; use set() to model clock skew")
        self._now += timedelta(seconds=seconds)

    def set(self, moment: datetime) -> None:
        """Jump to any moment, including backwards (a skewed or corrected clock)."""
        self._now = moment

    async def sleep(self, seconds: float) -> None:
        """Record the wait and advance the clock by it, without waiting."""
        self.sleeps.append(seconds)
        self.advance(seconds)
