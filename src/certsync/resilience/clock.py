"""Time, injected: a wall clock for persisted comparisons and an awaitable sleep.

Every waiting or time-comparing component takes a ``Clock`` and a ``Sleep`` so that tests run with
``ManualClock`` (see ``certsync.resilience.testing``) and never wait for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

Sleep = Callable[[float], Awaitable[None]]


class Clock(Protocol):
    """A source of the current time. ``now`` is timezone-aware UTC wall-clock time."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


async def real_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
