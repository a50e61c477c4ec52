"""The circuit breaker in front of the Dynamics portal: its states, their transitions, and where they live.

Owns ``CircuitState``, the transition rules (``BreakerSnapshot``'s methods, the one place they are
written in Python), the ``BreakerStore`` protocol with its in-memory implementation, and
``DynamicsCircuitBreaker``, which callers use. There is no running timer: the cool-down is the injected
clock's ``now()`` compared with the stored ``opened_at``, so a restarted process resumes where the
shared state says. The two operations every call makes (``try_acquire`` and ``record_success``) take
the clock's ``now`` function rather than a time, so that a closed circuit in memory never reads it.
``certsync.store.breaker_state.PostgresBreakerStore`` implements the same rules in SQL so that every
worker shares one breaker; the same contract tests run against both stores.

::

    closed ──(threshold consecutive failures)──▶ open ──(cool-down elapsed: one caller wins)──▶ half_open
       ▲                                           ▲                                               │
       └──────────(any success, or reset)──────────┼───────────────(probe succeeds)────────────────┤
                                                   └───────────────(probe fails: fresh opened_at)──┘
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

import structlog

from certsync.resilience.clock import Clock
from certsync.resilience.instrumentation import CircuitTransitioned, Instrumentation

__all__ = [
    "ALLOWED_CLOSED",
    "DYNAMICS_BREAKER",
    "BreakerSnapshot",
    "BreakerStatus",
    "BreakerStore",
    "CircuitOpenError",
    "CircuitState",
    "DynamicsCircuitBreaker",
    "InMemoryBreakerStore",
    "Now",
    "Permit",
    "Transition",
    "denied_permit",
    "failure_transition",
    "probe_permit",
    "reset_transition",
    "success_transition",
]

log = structlog.get_logger(__name__)

Now = Callable[[], datetime]
"""The caller's clock as a function (``Clock.now``): stores call it only when they need the time."""

DYNAMICS_BREAKER = "dynamics"
"""The name of the one breaker shared by every worker that sends to the portal."""


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(Exception):
    """The circuit refused the call; no request was made. ``retry_at``: when a probe may next go."""

    def __init__(self, name: str, retry_at: datetime) -> None:
        super().__init__(f"circuit {name!r} is open until {retry_at.isoformat()}")
        self.name = name
        self.retry_at = retry_at


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of state, as logged and as counted in the demo's summary."""

    old: CircuitState
    new: CircuitState
    reason: str


@dataclass(frozen=True, slots=True)
class Permit:
    """A store's answer to "may I call now?". ``is_probe``: this caller holds the one half-open probe."""

    allowed: bool
    state: CircuitState
    is_probe: bool = False
    retry_at: datetime | None = None
    transition: Transition | None = None


ALLOWED_CLOSED = Permit(allowed=True, state=CircuitState.CLOSED)
"""Every store's answer for a closed circuit: one shared value, so callers can tell it by identity."""


def probe_permit(old_state: CircuitState) -> Permit:
    """The winner's permit: open → half_open is a transition; re-taking an expired lease is not."""
    transition = (
        Transition(CircuitState.OPEN, CircuitState.HALF_OPEN, "cool-down elapsed; one probe allowed")
        if old_state is CircuitState.OPEN
        else None
    )
    return Permit(allowed=True, state=CircuitState.HALF_OPEN, is_probe=True, transition=transition)


def denied_permit(snapshot: BreakerSnapshot, cooldown: timedelta) -> Permit:
    retry_at = snapshot.next_probe_at(cooldown)
    assert retry_at is not None, "only an open or half-open circuit denies"
    return Permit(allowed=False, state=snapshot.state, retry_at=retry_at)


def success_transition(old_state: CircuitState) -> Transition | None:
    if old_state is CircuitState.CLOSED:
        return None
    why = "probe succeeded" if old_state is CircuitState.HALF_OPEN else "a call succeeded"
    return Transition(old_state, CircuitState.CLOSED, why)


def failure_transition(old_state: CircuitState, new: BreakerSnapshot, reason: str) -> Transition | None:
    if new.state is old_state:
        return None
    if old_state is CircuitState.HALF_OPEN:
        return Transition(old_state, new.state, f"probe failed: {reason}")
    return Transition(
        old_state, new.state, f"{new.consecutive_failures} consecutive failures, last: {reason}"
    )


def reset_transition(old_state: CircuitState) -> Transition | None:
    return None if old_state is CircuitState.CLOSED else Transition(old_state, CircuitState.CLOSED, "reset")


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """One breaker's stored state. ``opened_at`` is kept while half-open (when the outage began)."""

    name: str
    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    opened_at: datetime | None = None
    probe_lease_until: datetime | None = None
    last_failure_reason: str | None = None

    def next_probe_at(self, cooldown: timedelta) -> datetime | None:
        """When a caller may next win the probe: ``None`` while closed (calls go through)."""
        if self.state is CircuitState.OPEN and self.opened_at is not None:
            return self.opened_at + cooldown
        if self.state is CircuitState.HALF_OPEN:
            return self.probe_lease_until
        return None

    # The transition rules. Each returns the new snapshot and what the caller needs to know;
    # store/sql/breaker_state.sql mirrors them statement by statement.

    def clamped(self, now: datetime) -> BreakerSnapshot:
        """Clock-skew guard: an ``opened_at`` in the future (a skewed clock wrote it) becomes ``now``."""
        if self.opened_at is not None and self.opened_at > now:
            return replace(self, opened_at=now)
        return self

    def acquire(
        self, now: datetime, cooldown: timedelta, probe_lease: timedelta
    ) -> tuple[BreakerSnapshot, Permit]:
        if self.state is CircuitState.CLOSED:
            return self, ALLOWED_CLOSED
        current = self.clamped(now)
        lease_until = now + probe_lease
        if current.probe_lease_until is not None and current.probe_lease_until > lease_until:
            # A lease cannot reach further than a lease taken now: it too was written by a skewed clock.
            current = replace(current, probe_lease_until=lease_until)
        retry_at = current.next_probe_at(cooldown)
        assert retry_at is not None
        if now >= retry_at:
            won = replace(current, state=CircuitState.HALF_OPEN, probe_lease_until=lease_until)
            return won, probe_permit(self.state)
        return current, denied_permit(current, cooldown)

    def succeeded(self) -> tuple[BreakerSnapshot, Transition | None]:
        """Any success closes: it is proof the portal answers, whichever state it was sent in."""
        if self.state is CircuitState.CLOSED and self.consecutive_failures == 0:
            return self, None
        closed = BreakerSnapshot(self.name, last_failure_reason=self.last_failure_reason)
        return closed, success_transition(self.state)

    def failed(self, now: datetime, threshold: int, reason: str) -> tuple[BreakerSnapshot, Transition | None]:
        """Failures count only while closed; a failed probe re-opens with a fresh cool-down.

        While open, a failure (of a call that began before the circuit opened) changes nothing: it
        must not push the cool-down further away.
        """
        if self.state is CircuitState.OPEN:
            return self, None
        if self.state is CircuitState.HALF_OPEN:
            new = replace(
                self,
                state=CircuitState.OPEN,
                opened_at=now,
                probe_lease_until=None,
                last_failure_reason=reason,
            )
        else:
            failures = self.consecutive_failures + 1
            opens = failures >= threshold
            new = replace(
                self,
                state=CircuitState.OPEN if opens else CircuitState.CLOSED,
                consecutive_failures=failures,
                opened_at=now if opens else None,
                last_failure_reason=reason,
            )
        return new, failure_transition(self.state, new, reason)

    def reset(self) -> tuple[BreakerSnapshot, Transition | None]:
        return BreakerSnapshot(self.name), reset_transition(self.state)


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """The breaker as an operator or a scheduler sees it: what is stored, and when a call may next go.

    ``next_call_at`` is ``None`` while closed. It may lie in the past: the cool-down has ended and the
    next call will be the half-open probe (``probe_due``).
    """

    snapshot: BreakerSnapshot
    failure_threshold: int
    cooldown: timedelta
    read_at: datetime
    next_call_at: datetime | None

    @property
    def state(self) -> CircuitState:
        return self.snapshot.state

    @property
    def closed(self) -> bool:
        return self.snapshot.state is CircuitState.CLOSED

    @property
    def consecutive_failures(self) -> int:
        return self.snapshot.consecutive_failures

    @property
    def opened_at(self) -> datetime | None:
        return self.snapshot.opened_at

    @property
    def last_failure_reason(self) -> str | None:
        return self.snapshot.last_failure_reason

    @property
    def open_until(self) -> datetime | None:
        """Until when every call is refused; ``None`` when one may go now (closed, or the probe is due)."""
        at = self.next_call_at
        return at if at is not None and at > self.read_at else None

    @property
    def probe_due(self) -> bool:
        return self.next_call_at is not None and self.open_until is None


class BreakerStore(Protocol):
    """Where breaker state lives. Every operation is atomic: callers never read, decide, then write.

    ``now`` comes from the caller's clock: a time, or for ``try_acquire`` and ``record_success`` (made
    around every call) the clock's ``now`` function, called only when the time is needed (never for a
    closed circuit held in memory). ``try_acquire`` answers closed without writing; when open and
    cooled down (or half-open with an expired lease) exactly one caller wins the probe. Every
    operation that reads ``opened_at`` clamps a future value to ``now`` and persists the clamp.
    """

    async def snapshot(self, name: str, now: datetime) -> BreakerSnapshot: ...

    async def try_acquire(
        self, name: str, now: Now, cooldown: timedelta, probe_lease: timedelta
    ) -> Permit: ...

    async def record_success(self, name: str, now: Now) -> Transition | None: ...

    async def record_failure(
        self, name: str, now: datetime, threshold: int, reason: str
    ) -> Transition | None: ...

    async def reset(self, name: str, now: datetime) -> Transition | None: ...


class InMemoryBreakerStore:
    """Breaker state in a dict, for unit tests and single-process use.

    Atomic under asyncio because no method awaits between reading and writing its entry.
    """

    __slots__ = ("_states",)

    def __init__(self) -> None:
        self._states: dict[str, BreakerSnapshot] = {}

    @property
    def states(self) -> Mapping[str, BreakerSnapshot]:
        """What is stored, untouched by any clamp (for tests)."""
        return self._states

    async def snapshot(self, name: str, now: datetime) -> BreakerSnapshot:
        stored = self._states.get(name)
        if stored is None:
            return BreakerSnapshot(name)
        self._states[name] = current = stored.clamped(now)
        return current

    async def try_acquire(self, name: str, now: Now, cooldown: timedelta, probe_lease: timedelta) -> Permit:
        current = self._states.get(name)
        # The fast path: a closed circuit answers without building anything or reading the clock.
        if current is None or current.state is CircuitState.CLOSED:
            return ALLOWED_CLOSED
        self._states[name], permit = current.acquire(now(), cooldown, probe_lease)
        return permit

    async def record_success(self, name: str, now: Now) -> Transition | None:
        current = self._states.get(name)
        if current is None:
            return None
        self._states[name], transition = current.succeeded()
        return transition

    async def record_failure(
        self, name: str, now: datetime, threshold: int, reason: str
    ) -> Transition | None:
        current = self._states.get(name) or BreakerSnapshot(name)
        self._states[name], transition = current.failed(now, threshold, reason)
        return transition

    async def reset(self, name: str, now: datetime) -> Transition | None:
        current = self._states.pop(name, None)
        return None if current is None else current.reset()[1]


class DynamicsCircuitBreaker:
    """Fails fast while the portal is down, and lets one probe find out when it is back.

    Holds no state of its own: two instances over one store are one breaker, and a new instance (a
    restarted worker) resumes from the store. Every transition is logged as ``circuit_transition``.
    """

    __slots__ = (
        "_clock",
        "_cooldown",
        "_instrumentation",
        "_now",
        "_probe_lease",
        "_store",
        "failure_threshold",
        "name",
    )

    def __init__(
        self,
        name: str,
        store: BreakerStore,
        clock: Clock,
        *,
        failure_threshold: int = 3,
        cooldown: float = 30.0,
        probe_lease: float = 30.0,
        instrumentation: Instrumentation | None = None,
    ) -> None:
        """``probe_lease``: how long the probe's holder may take before another caller may probe.

        It must outlast one request (``CERTSYNC_HTTP_TIMEOUT`` plus a token fetch); it only matters
        when the holder dies mid-probe, since any outcome it records ends the half-open state.
        """
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, not {failure_threshold}")
        if cooldown < 0 or probe_lease < 0:
            raise ValueError("cooldown and probe_lease are seconds, 0 or more")
        self.name = name
        self.failure_threshold = failure_threshold
        self._store = store
        self._clock = clock
        self._now: Now = clock.now  # bound once: the stores call it only when they need the time
        self._cooldown = timedelta(seconds=cooldown)
        self._probe_lease = timedelta(seconds=probe_lease)
        self._instrumentation = instrumentation if instrumentation is not None else Instrumentation()

    @property
    def cooldown(self) -> timedelta:
        return self._cooldown

    async def before_call(self) -> Permit:
        """Raise ``CircuitOpenError`` if the call must not be made; otherwise say whether it is the probe."""
        permit = await self._store.try_acquire(self.name, self._now, self._cooldown, self._probe_lease)
        if permit is ALLOWED_CLOSED:
            return permit
        if permit.allowed:
            if permit.transition is not None:
                self._log(permit.transition)
            elif permit.is_probe:
                log.info(
                    "circuit_probe_reclaimed", breaker=self.name, reason="previous probe's lease expired"
                )
            return permit
        assert permit.retry_at is not None
        log.info(
            "circuit_open_rejected", breaker=self.name, state=str(permit.state), retry_at=permit.retry_at
        )
        raise CircuitOpenError(self.name, permit.retry_at)

    async def record_success(self) -> Transition | None:
        transition = await self._store.record_success(self.name, self._now)
        return None if transition is None else self._log(transition)

    async def record_failure(self, reason: str) -> Transition | None:
        """Count one failed call (not one failed operation: each retry counts)."""
        now = self._clock.now()
        return self._log(await self._store.record_failure(self.name, now, self.failure_threshold, reason))

    async def snapshot(self) -> BreakerSnapshot:
        return await self._store.snapshot(self.name, self._clock.now())

    async def status(self) -> BreakerStatus:
        """The stored state with the times derived from it: the one answer to "may a call go, and when?"."""
        now = self._clock.now()
        snapshot = await self._store.snapshot(self.name, now)
        return BreakerStatus(
            snapshot=snapshot,
            failure_threshold=self.failure_threshold,
            cooldown=self._cooldown,
            read_at=now,
            next_call_at=snapshot.next_probe_at(self._cooldown),
        )

    async def open_until(self) -> datetime | None:
        """Until when every call is refused; ``None`` when one may go now (closed, or the probe is due)."""
        return (await self.status()).open_until

    async def reset(self) -> Transition | None:
        """Close the circuit now (operator's ``certsync breaker reset``)."""
        return self._log(await self._store.reset(self.name, self._clock.now()))

    def _log(self, transition: Transition | None) -> Transition | None:
        if transition is not None:
            self._instrumentation.emit(CircuitTransitioned(str(transition.old), str(transition.new)))
            level = log.warning if transition.new is CircuitState.OPEN else log.info
            level(
                "circuit_transition",
                breaker=self.name,
                old_state=str(transition.old),
                new_state=str(transition.new),
                reason=transition.reason,
            )
        return transition
