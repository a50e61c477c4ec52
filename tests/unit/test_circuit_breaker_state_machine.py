"""The breaker's invariants under any interleaving of calls, outcomes, restarts, resets and skewed clocks.

Three workers share one in-memory store and one ManualClock; a fourth kind of worker runs on a clock
that is off by up to an hour. Calls are begun and finished in separate steps so that outcomes arrive
late, after the circuit has changed under them, as they do in production.
"""

from __future__ import annotations

from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from certsync.resilience.breaker import (
    BreakerSnapshot,
    CircuitOpenError,
    CircuitState,
    DynamicsCircuitBreaker,
    InMemoryBreakerStore,
    Permit,
)
from certsync.resilience.testing import ManualClock

T = TypeVar("T")

NAME = "dynamics"
THRESHOLD = 3
COOLDOWN = timedelta(seconds=30)
LEASE = timedelta(seconds=10)
WORKERS = 3


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that must finish without suspending: the in-memory store never awaits."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("the in-memory breaker suspended: its operations would not be atomic")


class OffsetClock:
    """A worker's clock that runs ``offset`` ahead of (or behind) the shared one."""

    def __init__(self, base: ManualClock, offset: timedelta) -> None:
        self._base = base
        self._offset = offset

    def now(self) -> datetime:
        return self._base.now() + self._offset


class BreakerMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.clock = ManualClock()
        self.store = InMemoryBreakerStore()
        self.workers = [self._breaker(self.clock) for _ in range(WORKERS)]
        self.in_flight: dict[int, Permit] = {}
        # The open episode's first sighting by a worker on the true clock; None until seen.
        self.first_seen: datetime | None = None
        # The lease of the probe that was granted and not yet resolved.
        self.probe_lease_until: datetime | None = None

    def _breaker(self, clock: ManualClock | OffsetClock) -> DynamicsCircuitBreaker:
        return DynamicsCircuitBreaker(
            NAME,
            self.store,
            clock,
            failure_threshold=THRESHOLD,
            cooldown=COOLDOWN.total_seconds(),
            probe_lease=LEASE.total_seconds(),
        )

    def stored(self) -> BreakerSnapshot:
        return self.store.states.get(NAME) or BreakerSnapshot(NAME)

    def _after_write(self, before: BreakerSnapshot) -> None:
        after = self.stored()
        if after.state is not CircuitState.OPEN or (
            before.state is not CircuitState.OPEN and after.opened_at != before.opened_at
        ):
            self.first_seen = None  # a new open episode (or none): not yet seen by anyone
        if after.state is not CircuitState.HALF_OPEN:
            self.probe_lease_until = None

    @rule(seconds=st.floats(min_value=0.0, max_value=2 * COOLDOWN.total_seconds()))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(worker=st.integers(0, WORKERS - 1))
    def begin_call(self, worker: int) -> None:
        before = self.stored()
        now = self.clock.now()
        if before.state is CircuitState.OPEN and self.first_seen is None:
            self.first_seen = now
        try:
            permit = run(self.workers[worker].before_call())
        except CircuitOpenError as refused:
            self._check_refusal(before, now, refused.retry_at)
            return
        if permit.is_probe:
            # At most one probe per lease.
            assert self.probe_lease_until is None or self.probe_lease_until <= now
            self.probe_lease_until = now + LEASE
        else:
            assert before.state is CircuitState.CLOSED
        self.in_flight[worker] = permit
        self._after_write(before)

    def _check_refusal(self, before: BreakerSnapshot, now: datetime, retry_at: datetime) -> None:
        assert before.state is not CircuitState.CLOSED
        if before.state is CircuitState.OPEN:
            assert self.first_seen is not None
            # Never open longer than the cool-down after its first sighting, whatever clocks wrote it.
            assert retry_at <= self.first_seen + COOLDOWN
            assert now < self.first_seen + COOLDOWN
        else:
            assert retry_at <= now + LEASE

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data(), succeeded=st.booleans())
    def finish_call(self, data: st.DataObject, succeeded: bool) -> None:
        worker = data.draw(st.sampled_from(sorted(self.in_flight)))
        del self.in_flight[worker]
        if succeeded:
            self._succeed(worker)
        else:
            self._fail(self.workers[worker], "HTTP 503")

    @precondition(lambda self: bool(self.in_flight))
    @rule(data=st.data())
    def worker_dies_mid_call(self, data: st.DataObject) -> None:
        worker = data.draw(st.sampled_from(sorted(self.in_flight)))
        del self.in_flight[worker]
        self.workers[worker] = self._breaker(self.clock)

    @rule(offset=st.floats(min_value=-3600.0, max_value=3600.0))
    def skewed_worker_call_fails(self, offset: float) -> None:
        self._fail(self._breaker(OffsetClock(self.clock, timedelta(seconds=offset))), "timeout")

    @rule()
    def every_worker_restarts(self) -> None:
        before = run(self.workers[0].snapshot())
        self.workers = [self._breaker(self.clock) for _ in range(WORKERS)]
        assert run(self.workers[0].snapshot()) == before

    @rule()
    def operator_resets(self) -> None:
        before = self.stored()
        run(self.workers[0].reset())
        assert self.stored() == BreakerSnapshot(NAME)
        self._after_write(before)

    def _succeed(self, worker: int) -> None:
        before = self.stored()
        run(self.workers[worker].record_success())
        after = self.stored()
        # Success closes, from any state, and forgets the failures.
        assert after.state is CircuitState.CLOSED
        assert after.consecutive_failures == 0
        self._after_write(before)

    def _fail(self, breaker: DynamicsCircuitBreaker, reason: str) -> None:
        before = self.stored()
        transition = run(breaker.record_failure(reason))
        after = self.stored()
        # Failures count only while closed; a failed probe re-opens; while open nothing changes.
        if before.state is CircuitState.OPEN:
            assert after == before
            assert transition is None
        elif before.state is CircuitState.HALF_OPEN:
            assert after.state is CircuitState.OPEN
            assert after.consecutive_failures == before.consecutive_failures
        else:
            assert after.consecutive_failures == before.consecutive_failures + 1
            assert (after.state is CircuitState.OPEN) == (after.consecutive_failures >= THRESHOLD)
        self._after_write(before)

    @invariant()
    def stored_state_has_the_shape_of_its_state(self) -> None:
        if not hasattr(self, "store"):
            return
        snapshot = self.stored()
        if snapshot.state is CircuitState.CLOSED:
            assert snapshot.opened_at is None
            assert snapshot.probe_lease_until is None
            assert snapshot.consecutive_failures < THRESHOLD
        elif snapshot.state is CircuitState.OPEN:
            assert snapshot.opened_at is not None
            assert snapshot.probe_lease_until is None
        else:
            assert snapshot.opened_at is not None
            assert snapshot.probe_lease_until is not None


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_invariants_hold_under_any_interleaving = BreakerMachine.TestCase
