"""A shared pause for all sending: a 429 from the portal holds every request, not just the one.

Dataverse's service-protection limits apply per user across all requests, so when one request is
told to wait, every concurrent request of this process waits with it. Time is injected.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog

from certsync.resilience.clock import Clock, Sleep

log = structlog.get_logger(__name__)


class SendGate:
    """Holds callers of ``wait()`` until the latest ``pause_for`` has passed on the injected clock."""

    def __init__(self, clock: Clock, sleep: Sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._paused_until: datetime | None = None

    @property
    def paused_until(self) -> datetime | None:
        return self._paused_until

    def pause_for(self, seconds: float, reason: str) -> None:
        """Extend the pause to ``now + seconds`` (never shortens a longer pause already in force)."""
        until = self._clock.now() + timedelta(seconds=max(0.0, seconds))
        if self._paused_until is None or until > self._paused_until:
            self._paused_until = until
            log.warning("sending_paused", seconds=round(seconds, 3), reason=reason)

    def remaining(self) -> float:
        if self._paused_until is None:
            return 0.0
        return max(0.0, (self._paused_until - self._clock.now()).total_seconds())

    async def wait(self) -> None:
        """Return at once when not paused; otherwise sleep until the pause (possibly extended) ends."""
        while (left := self.remaining()) > 0:
            await self._sleep(left)
