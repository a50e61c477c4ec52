"""The retry schedule: how long to wait before each retry of one operation, and when to stop waiting.

``RetryPolicy`` is a value: it decides delays but never sleeps. ``RetryLoop`` applies it: it calls an
attempt, and while the attempt answers ``RetryLater`` it logs the retry, awaits the policy's delay on
an injected ``Sleep`` and calls the next attempt, until one answers with a result or the loop gives
up (``GaveUp``). ``HLFDynamicsSyncService.deliver`` runs its attempts through it, so tests run the
whole schedule on a ``ManualClock`` without waiting. The success path is one call and one
``isinstance``: nothing is built or logged unless an attempt asks for a retry.

Its arguments mirror ``CERTSYNC_RETRY_MAX_RETRIES``, ``CERTSYNC_RETRY_BASE_DELAY`` and
``CERTSYNC_RETRY_MAX_RETRY_AFTER``; the composition root builds it from settings (this package reads
no configuration).
"""

from __future__ import annotations

import math
import random as _random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import structlog

from certsync.resilience.clock import Sleep
from certsync.resilience.instrumentation import Instrumentation, RetryScheduled

__all__ = ["Attempt", "GaveUp", "RetryLater", "RetryLoop", "RetryPolicy", "parse_retry_after"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# RFC 9110 delay-seconds is digits only; a fraction is tolerated because some proxies send one.
_DELAY_SECONDS = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: ``base_delay * multiplier ** (n - 1)`` before retry ``n`` (2, 4, 8 s by default).

    ``max_retries`` counts retries after the first attempt, so an operation makes at most
    ``max_attempts`` calls. A server's ``Retry-After`` replaces the schedule's delay, unless it exceeds
    ``max_retry_after``: then the caller should stop and queue the operation instead of sleeping for
    minutes. ``jitter`` (a fraction, 0 = off) spreads each scheduled delay uniformly over
    ``delay * (1 ± jitter)`` using ``random`` (any ``() -> float in [0, 1)``, injected for tests).
    """

    max_retries: int = 3
    base_delay: float = 2.0
    multiplier: float = 2.0
    max_retry_after: float = 60.0
    jitter: float = 0.0
    random: Callable[[], float] = field(default=_random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, not {self.max_retries}")
        _require_seconds("base_delay", self.base_delay)
        _require_seconds("max_retry_after", self.max_retry_after)
        # A multiplier below 1 would shrink the waits: that is not backoff, so it is a mistake.
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1.0):
            raise ValueError(f"multiplier must be a finite number of at least 1, not {self.multiplier}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be a fraction between 0 and 1, not {self.jitter}")

    @property
    def max_attempts(self) -> int:
        """Calls made for one operation at most: the first attempt plus every retry."""
        return self.max_retries + 1

    def delays(self) -> tuple[float, ...]:
        """The nominal schedule, one delay per retry, before jitter: ``(2.0, 4.0, 8.0)`` by default."""
        return tuple(self.base_delay * self.multiplier**n for n in range(self.max_retries))

    def delay_before_retry(self, retry_number: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry ``retry_number`` (1-based), or ``None``: do not wait, give up now.

        ``retry_after`` (seconds, from a 429/503 response) is honoured instead of the schedule, without
        jitter, as long as it is at most ``max_retry_after``.
        """
        if not 1 <= retry_number <= self.max_retries:
            raise ValueError(f"retry_number must be between 1 and {self.max_retries}, not {retry_number}")
        if retry_after is not None:
            _require_seconds("retry_after", retry_after)
            return retry_after if retry_after <= self.max_retry_after else None
        delay = self.base_delay * self.multiplier ** (retry_number - 1)
        if self.jitter:
            delay *= 1.0 + self.jitter * (2.0 * self.random() - 1.0)
        return delay


@dataclass(frozen=True, slots=True)
class RetryLater:
    """An attempt's answer "this failed, but may succeed if tried again".

    ``retry_after``: the server's ``Retry-After`` in seconds, honoured instead of the schedule.
    """

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class GaveUp:
    """The loop stopped retrying: every attempt was used, or a ``Retry-After`` exceeded the cap.

    ``attempts``: how many attempts were made; ``last``: the last attempt's answer; ``reason``: why, for
    a person (``"retries exhausted after 4 attempt(s); last: HTTP 503 Service Unavailable"``).
    """

    attempts: int
    last: RetryLater
    reason: str


Attempt = Callable[[int, RetryLater | None], Awaitable[T | RetryLater]]
"""One attempt: given its number (1-based) and the previous attempt's answer (``None`` for the first),
a result (the loop returns it), or ``RetryLater``."""


class RetryLoop:
    """``RetryPolicy`` applied: attempts, logged retries and the waits between them on an injected sleep.

    Every retry is logged (``retry_scheduled`` at info, ``retry_abandoned_retry_after_too_long`` at
    warning) with the fields ``context()`` returns, which is only called when there is one to log.
    """

    __slots__ = ("_instrumentation", "_sleep", "policy")

    def __init__(
        self, policy: RetryPolicy, sleep: Sleep, instrumentation: Instrumentation | None = None
    ) -> None:
        self.policy = policy
        self._sleep = sleep
        self._instrumentation = instrumentation if instrumentation is not None else Instrumentation()

    async def run(
        self, attempt: Attempt[T], *, context: Callable[[], Mapping[str, object]] | None = None
    ) -> T | GaveUp:
        """Call ``attempt`` until it answers with a result, or give up; returns the result or ``GaveUp``."""
        answer = await attempt(1, None)
        if not isinstance(answer, RetryLater):
            return answer
        policy = self.policy
        for retry_number in range(1, policy.max_retries + 1):
            delay = policy.delay_before_retry(retry_number, answer.retry_after)
            fields = context() if context is not None else {}
            if delay is None:
                log.warning("retry_abandoned_retry_after_too_long", retry_after=answer.retry_after, **fields)
                cap = policy.max_retry_after
                why = f"{answer.reason}; Retry-After {answer.retry_after:.0f}s exceeds the {cap:.0f}s cap"
                return GaveUp(retry_number, answer, why)
            log.info("retry_scheduled", retry=retry_number, delay=delay, after=answer.reason, **fields)
            self._instrumentation.emit(RetryScheduled(retry_number, delay))
            await self._sleep(delay)
            answer = await attempt(retry_number + 1, answer)
            if not isinstance(answer, RetryLater):
                return answer
        attempts = policy.max_attempts
        return GaveUp(
            attempts, answer, f"retries exhausted after {attempts} attempt(s); last: {answer.reason}"
        )


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """A ``Retry-After`` header as seconds from ``now`` (never negative), or ``None`` if absent or garbage.

    Accepts delay-seconds (``"120"``) and an HTTP-date (``"Wed, 21 Oct 2026 07:28:00 GMT"``); a date in
    the past means "now" (0.0). ``now`` must be timezone-aware: it comes from the injected ``Clock``.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if value is None:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        # email.utils returns a naive datetime for "-0000"; HTTP-dates are always GMT.
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


def _require_seconds(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number of seconds, 0 or more, not {value}")
