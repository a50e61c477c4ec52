"""Dataverse's three service-protection limits, played by the emulator without any I/O.

Microsoft documents them per user and per web server, over a sliding window (5 minutes):

=========================  ===============  ==============  ==============================================
limit                      Dataverse        error code      what the emulator counts
=========================  ===============  ==============  ==============================================
number of requests         6000 per 300 s   ``0x80072322``  admitted API requests (an ``UpsertMultiple``
                                                            is ONE request, whatever its targets)
combined execution time    1200 s per 300 s ``0x80072321``  the time each admitted request took to answer,
                                                            summed over the requests finished in the window
concurrent requests        52               ``0x80072326``  admitted requests not yet answered
=========================  ===============  ==============  ==============================================

A request over a limit is answered 429 with ``Retry-After`` (whole seconds: when the window frees
enough) and is not counted itself. Every answer says what is left, as Dataverse does, in
``x-ms-ratelimit-burst-remaining-xrm-requests`` (requests) and
``x-ms-ratelimit-time-remaining-xrm-requests`` (seconds of execution time, two decimals). Each limit
is off when ``None``. Time comes from an injected monotonic function, so that tests scale the window
down (120 per 6 s) and move the clock instead of waiting.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config

REQUESTS_CODE = "0x80072322"
EXECUTION_TIME_CODE = "0x80072321"
CONCURRENCY_CODE = "0x80072326"

BURST_REMAINING_HEADER = "x-ms-ratelimit-burst-remaining-xrm-requests"
TIME_REMAINING_HEADER = "x-ms-ratelimit-time-remaining-xrm-requests"


class LimitsError(ValueError):
    """Service-protection limits (JSON or command-line text) that cannot be applied."""


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """The limits, Dataverse's own by default; scale them down for tests and benchmarks."""

    requests: Annotated[int, Field(ge=1)] | None = 6000
    window_seconds: Annotated[float, Field(gt=0)] = 300.0
    execution_seconds: Annotated[float, Field(gt=0)] | None = 1200.0
    max_concurrent: Annotated[int, Field(ge=1)] | None = 52

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


_LIMITS = TypeAdapter(ServiceLimits)


def parse_limits(data: object) -> ServiceLimits:
    """The admin API's JSON (fields of ``ServiceLimits``; omitted ones keep Dataverse's defaults)."""
    if not isinstance(data, dict):
        raise LimitsError("service-protection limits are a JSON object")
    try:
        return _LIMITS.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise LimitsError(f"{where}: {first['msg']}" if where else str(first["msg"])) from None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request over a limit: answer 429 with this code, message and ``Retry-After``."""

    code: str
    message: str
    retry_after: int
    fault: str


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted request; hand it back to ``ServiceProtection.finish`` once it is answered."""

    started_at: float


class ServiceProtection:
    """Plays one ``ServiceLimits``; ``load`` replaces them and forgets the windows."""

    def __init__(self, limits: ServiceLimits, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self.load(limits)

    def load(self, limits: ServiceLimits) -> None:
        self._limits = limits
        self._admitted: deque[float] = deque()
        self._executed: deque[tuple[float, float]] = deque()  # (finished at, seconds it took)
        self._executed_total = 0.0
        self._in_flight = 0

    @property
    def limits(self) -> ServiceLimits:
        return self._limits

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admit(self) -> Admission | Refusal:
        """Admit one request (counting it), or refuse it with the first limit it is over."""
        limits = self._limits
        now = self._monotonic()
        self._slide(now)
        if limits.requests is not None and len(self._admitted) >= limits.requests:
            return Refusal(
                REQUESTS_CODE,
                f"Number of requests exceeded the limit of {limits.requests} over time window of "
                f"{_seconds(limits.window_seconds)} seconds.",
                _whole_seconds(self._admitted[0] + limits.window_seconds - now),
                "rate_limit:requests",
            )
        if limits.execution_seconds is not None and self._executed_total >= limits.execution_seconds:
            return Refusal(
                EXECUTION_TIME_CODE,
                f"Combined execution time of incoming requests exceeded limit of "
                f"{round(limits.execution_seconds * 1000)} milliseconds over time window of "
                f"{_seconds(limits.window_seconds)} seconds. Decrease number of concurrent requests or "
                "reduce the duration of requests and try again later.",
                _whole_seconds(self._time_frees_at(limits.execution_seconds, limits.window_seconds) - now),
                "rate_limit:execution_time",
            )
        if limits.max_concurrent is not None and self._in_flight >= limits.max_concurrent:
            return Refusal(
                CONCURRENCY_CODE,
                f"Number of concurrent requests exceeded the limit of {limits.max_concurrent}.",
                1,
                "rate_limit:concurrency",
            )
        self._admitted.append(now)
        self._in_flight += 1
        return Admission(started_at=now)

    def finish(self, admission: Admission) -> None:
        """The admitted request has been answered: free its slot and count the time it took."""
        now = self._monotonic()
        self._in_flight -= 1
        took = max(0.0, now - admission.started_at)
        self._executed.append((now, took))
        self._executed_total += took

    def remaining(self) -> dict[str, str]:
        """The two ``x-ms-ratelimit-…`` headers for an answer now (a limit that is off: no header)."""
        limits = self._limits
        self._slide(self._monotonic())
        headers: dict[str, str] = {}
        if limits.requests is not None:
            headers[BURST_REMAINING_HEADER] = str(max(0, limits.requests - len(self._admitted)))
        if limits.execution_seconds is not None:
            headers[TIME_REMAINING_HEADER] = (
                f"{max(0.0, limits.execution_seconds - self._executed_total):.2f}"
            )
        return headers

    def view(self) -> dict[str, Any]:
        """The limits and how much of each the current window has used (the admin API)."""
        self._slide(self._monotonic())
        return {
            "limits": self._limits.to_json_dict(),
            "window_requests": len(self._admitted),
            "window_execution_seconds": round(self._executed_total, 3),
            "in_flight": self._in_flight,
        }

    def _slide(self, now: float) -> None:
        horizon = now - self._limits.window_seconds
        while self._admitted and self._admitted[0] <= horizon:
            self._admitted.popleft()
        while self._executed and self._executed[0][0] <= horizon:
            self._executed_total -= self._executed.popleft()[1]
        if not self._executed:
            self._executed_total = 0.0  # no float drift once the window is empty

    def _time_frees_at(self, budget: float, window: float) -> float:
        """When enough finished requests leave the window for the executed total to drop below budget."""
        total = self._executed_total
        for finished_at, took in self._executed:
            total -= took
            if total < budget:
                return finished_at + window
        return self._monotonic() + window


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _whole_seconds(value: float) -> int:
    return max(1, math.ceil(value))
