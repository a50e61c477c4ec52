"""DynamicsCircuitBreaker over the in-memory store, on a ManualClock: the seed's scenarios by name."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from structlog.testing import capture_logs

from certsync.resilience.breaker import (
    BreakerSnapshot,
    CircuitOpenError,
    CircuitState,
    DynamicsCircuitBreaker,
    InMemoryBreakerStore,
    Now,
    Permit,
    Transition,
)
from certsync.resilience.testing import ManualClock

THRESHOLD = 3
COOLDOWN = 30.0
LEASE = 10.0


def make_breaker(
    store: InMemoryBreakerStore | None = None, clock: ManualClock | None = None, *, threshold: int = THRESHOLD
) -> tuple[DynamicsCircuitBreaker, InMemoryBreakerStore, ManualClock]:
    store = store if store is not None else InMemoryBreakerStore()
    clock = clock if clock is not None else ManualClock()
    breaker = DynamicsCircuitBreaker(
        "dynamics", store, clock, failure_threshold=threshold, cooldown=COOLDOWN, probe_lease=LEASE
    )
    return breaker, store, clock


async def trip(breaker: DynamicsCircuitBreaker, failures: int = THRESHOLD) -> None:
    for n in range(failures):
        await breaker.before_call()
        await breaker.record_failure(f"HTTP 503 #{n + 1}")


async def state_of(breaker: DynamicsCircuitBreaker) -> CircuitState:
    return (await breaker.snapshot()).state


# --- the seed's scenarios ---------------------------------------------------------------------------


async def test_circuit_closed_to_open_to_half_open_to_closed() -> None:
    breaker, _, clock = make_breaker()
    assert await state_of(breaker) is CircuitState.CLOSED
    await trip(breaker)
    assert await state_of(breaker) is CircuitState.OPEN
    clock.advance(COOLDOWN)
    permit = await breaker.before_call()
    assert permit.is_probe
    assert await state_of(breaker) is CircuitState.HALF_OPEN
    await breaker.record_success()
    assert await state_of(breaker) is CircuitState.CLOSED


async def test_circuit_closed_to_open_to_half_open_to_open() -> None:
    breaker, _, clock = make_breaker()
    await trip(breaker)
    clock.advance(COOLDOWN)
    await breaker.before_call()
    assert await state_of(breaker) is CircuitState.HALF_OPEN
    transition = await breaker.record_failure("HTTP 503")
    assert transition == Transition(CircuitState.HALF_OPEN, CircuitState.OPEN, "probe failed: HTTP 503")
    snapshot = await breaker.snapshot()
    assert snapshot.state is CircuitState.OPEN
    assert snapshot.opened_at == clock.now(), "a failed probe starts a fresh cool-down"


async def test_open_circuit_blocks_calls_without_side_effects() -> None:
    breaker, store, clock = make_breaker()
    await trip(breaker)
    before = dict(store.states)
    clock.advance(COOLDOWN - 0.001)
    with pytest.raises(CircuitOpenError) as refused:
        await breaker.before_call()
    assert refused.value.name == "dynamics"
    assert refused.value.retry_at == ManualClock().now() + timedelta(seconds=COOLDOWN)
    assert dict(store.states) == before


@pytest.mark.parametrize("state", list(CircuitState))
async def test_restart_in_each_state_resumes_from_the_store(state: CircuitState) -> None:
    breaker, store, clock = make_breaker()
    if state is not CircuitState.CLOSED:
        await trip(breaker)
    if state is CircuitState.HALF_OPEN:
        clock.advance(COOLDOWN)
        await breaker.before_call()
    before = await breaker.snapshot()

    restarted, _, _ = make_breaker(store, clock)

    assert await restarted.snapshot() == before
    assert before.state is state


async def test_restarted_breaker_keeps_the_cool_down_of_the_one_that_opened() -> None:
    breaker, store, clock = make_breaker()
    await trip(breaker)
    clock.advance(COOLDOWN / 2)
    restarted, _, _ = make_breaker(store, clock)
    with pytest.raises(CircuitOpenError):
        await restarted.before_call()
    clock.advance(COOLDOWN / 2)
    assert (await restarted.before_call()).is_probe


async def test_restarted_breaker_does_not_get_a_second_probe_while_the_lease_holds() -> None:
    breaker, store, clock = make_breaker()
    await trip(breaker)
    clock.advance(COOLDOWN)
    await breaker.before_call()
    restarted, _, _ = make_breaker(store, clock)
    with pytest.raises(CircuitOpenError) as refused:
        await restarted.before_call()
    assert refused.value.retry_at == clock.now() + timedelta(seconds=LEASE)


async def test_cool_down_is_a_wall_clock_comparison_with_opened_at() -> None:
    breaker, store, clock = make_breaker()
    await trip(breaker)
    opened_at = store.states["dynamics"].opened_at
    assert opened_at == clock.now()
    # No timer runs: only the clock's reading, compared with the stored opened_at, decides.
    clock.set(opened_at + timedelta(seconds=COOLDOWN) - timedelta(microseconds=1))
    with pytest.raises(CircuitOpenError):
        await breaker.before_call()
    clock.set(opened_at + timedelta(seconds=COOLDOWN))
    assert (await breaker.before_call()).is_probe


async def test_clock_skew_opened_at_in_the_future_is_clamped_and_persisted() -> None:
    ahead = ManualClock()
    ahead.advance(3600)  # a worker whose clock runs an hour fast opens the circuit
    skewed, store, _ = make_breaker(clock=ahead)
    await trip(skewed)
    clock = ManualClock()
    breaker, _, _ = make_breaker(store, clock)

    with pytest.raises(CircuitOpenError) as refused:
        await breaker.before_call()

    assert store.states["dynamics"].opened_at == clock.now(), "the clamp is stored, not just used"
    assert refused.value.retry_at == clock.now() + timedelta(seconds=COOLDOWN)
    clock.advance(COOLDOWN)
    assert (await breaker.before_call()).is_probe, "open no longer than the cool-down after first sight"


async def test_clock_skew_clamp_is_persisted_by_a_status_read() -> None:
    ahead = ManualClock()
    ahead.advance(600)
    skewed, store, _ = make_breaker(clock=ahead)
    await trip(skewed)
    breaker, _, clock = make_breaker(store)
    assert (await breaker.snapshot()).opened_at == clock.now()
    assert store.states["dynamics"].opened_at == clock.now()


async def test_clock_skew_probe_lease_in_the_future_is_clamped_to_one_lease() -> None:
    ahead = ManualClock()
    skewed, store, _ = make_breaker(clock=ahead)
    await trip(skewed)
    ahead.advance(COOLDOWN + 3600)
    await skewed.before_call()  # takes the probe with a lease an hour ahead, then dies
    breaker, _, clock = make_breaker(store)
    with pytest.raises(CircuitOpenError) as refused:
        await breaker.before_call()
    assert refused.value.retry_at == clock.now() + timedelta(seconds=LEASE)
    clock.advance(LEASE)
    assert (await breaker.before_call()).is_probe


# --- counting -----------------------------------------------------------------------------------------


async def test_failures_below_the_threshold_keep_the_circuit_closed() -> None:
    breaker, _, _ = make_breaker()
    await trip(breaker, THRESHOLD - 1)
    snapshot = await breaker.snapshot()
    assert snapshot.state is CircuitState.CLOSED
    assert snapshot.consecutive_failures == THRESHOLD - 1
    assert snapshot.last_failure_reason == "HTTP 503 #2"


async def test_reaching_the_threshold_opens_naming_the_count_and_last_failure() -> None:
    breaker, _, _ = make_breaker()
    await trip(breaker, THRESHOLD - 1)
    transition = await breaker.record_failure("timeout")
    assert transition == Transition(
        CircuitState.CLOSED, CircuitState.OPEN, "3 consecutive failures, last: timeout"
    )


async def test_a_threshold_of_one_opens_on_the_first_failure() -> None:
    breaker, _, _ = make_breaker(threshold=1)
    assert (await breaker.record_failure("HTTP 500")) is not None
    assert await state_of(breaker) is CircuitState.OPEN


async def test_a_success_clears_the_failure_count() -> None:
    breaker, _, _ = make_breaker()
    await trip(breaker, THRESHOLD - 1)
    assert await breaker.record_success() is None
    assert (await breaker.snapshot()).consecutive_failures == 0
    await trip(breaker, THRESHOLD - 1)
    assert await state_of(breaker) is CircuitState.CLOSED


async def test_a_failure_while_open_is_not_counted_and_does_not_extend_the_cool_down() -> None:
    breaker, _, clock = make_breaker()
    await trip(breaker)
    before = await breaker.snapshot()
    clock.advance(COOLDOWN / 2)
    assert await breaker.record_failure("late 503 from a call sent before opening") is None
    assert await breaker.snapshot() == before


async def test_a_success_while_open_closes_the_circuit() -> None:
    breaker, _, _ = make_breaker()
    await trip(breaker)
    transition = await breaker.record_success()
    assert transition == Transition(CircuitState.OPEN, CircuitState.CLOSED, "a call succeeded")
    assert (await breaker.before_call()).state is CircuitState.CLOSED


async def test_a_success_on_a_stored_clean_closed_circuit_keeps_the_same_snapshot() -> None:
    breaker, store, _ = make_breaker()
    await trip(breaker, 1)
    await breaker.record_success()  # stored, closed, no failures
    stored = store.states["dynamics"]
    assert await breaker.record_success() is None
    assert store.states["dynamics"] is stored


async def test_a_success_with_nothing_stored_changes_nothing() -> None:
    breaker, store, _ = make_breaker()
    assert await breaker.record_success() is None
    assert dict(store.states) == {}


def test_a_closed_snapshot_allows_a_call_and_stays_as_it_is() -> None:
    closed = BreakerSnapshot("dynamics", consecutive_failures=2)
    now = ManualClock().now()
    after, permit = closed.acquire(now, timedelta(seconds=COOLDOWN), timedelta(seconds=LEASE))
    assert after is closed
    assert (permit.allowed, permit.is_probe, permit.transition) == (True, False, None)


async def test_a_closed_circuit_answers_without_storing_anything() -> None:
    breaker, store, _ = make_breaker()
    permit = await breaker.before_call()
    assert permit.allowed
    assert not permit.is_probe
    assert dict(store.states) == {}


# --- the probe ----------------------------------------------------------------------------------------


async def test_only_one_of_two_breakers_over_one_store_gets_the_probe() -> None:
    first, store, clock = make_breaker()
    second, _, _ = make_breaker(store, clock)
    await trip(first)
    clock.advance(COOLDOWN)
    assert (await first.before_call()).is_probe
    with pytest.raises(CircuitOpenError):
        await second.before_call()


async def test_an_expired_probe_lease_lets_another_caller_probe() -> None:
    first, store, clock = make_breaker()
    second, _, _ = make_breaker(store, clock)
    await trip(first)
    clock.advance(COOLDOWN)
    await first.before_call()
    clock.advance(LEASE)
    with capture_logs() as logs:
        permit = await second.before_call()
    assert permit.is_probe
    assert permit.transition is None, "half-open stays half-open: not a transition"
    assert [entry["event"] for entry in logs] == ["circuit_probe_reclaimed"]


# --- reset, status --------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [CircuitState.OPEN, CircuitState.HALF_OPEN])
async def test_reset_closes_the_circuit_from_any_state(state: CircuitState) -> None:
    breaker, store, clock = make_breaker()
    await trip(breaker)
    if state is CircuitState.HALF_OPEN:
        clock.advance(COOLDOWN)
        await breaker.before_call()
    assert await breaker.reset() == Transition(state, CircuitState.CLOSED, "reset")
    assert await breaker.snapshot() == BreakerSnapshot("dynamics")
    assert dict(store.states) == {}


async def test_reset_of_a_closed_circuit_is_not_a_transition() -> None:
    breaker, _, _ = make_breaker()
    await trip(breaker, 1)
    assert await breaker.reset() is None
    assert await breaker.reset() is None


async def test_status_says_when_the_next_call_may_go_none_while_closed_then_after_the_cool_down() -> None:
    breaker, _, clock = make_breaker()
    assert (await breaker.status()).next_call_at is None
    await trip(breaker)
    status = await breaker.status()
    assert status.next_call_at == clock.now() + breaker.cooldown
    assert status.open_until == status.next_call_at
    assert not status.probe_due
    clock.advance(COOLDOWN)
    await breaker.before_call()
    assert (await breaker.status()).next_call_at == clock.now() + timedelta(seconds=LEASE)


async def test_open_until_is_none_once_the_cool_down_has_ended_and_the_probe_is_due() -> None:
    breaker, _, clock = make_breaker()
    assert await breaker.open_until() is None
    await trip(breaker)
    assert await breaker.open_until() == clock.now() + breaker.cooldown
    clock.advance(COOLDOWN)
    status = await breaker.status()
    assert status.state is CircuitState.OPEN
    assert status.open_until is None
    assert status.probe_due
    assert status.failure_threshold == breaker.failure_threshold


def test_circuit_open_error_says_until_when() -> None:
    error = CircuitOpenError("dynamics", ManualClock().now())
    assert str(error) == "circuit 'dynamics' is open until 2026-11-29T10:00:00+00:00"


def test_circuit_states_read_as_their_stored_names() -> None:
    assert [str(s) for s in CircuitState] == ["closed", "open", "half_open"]


@pytest.mark.parametrize("arguments", [{"failure_threshold": 0}, {"cooldown": -1.0}, {"probe_lease": -0.5}])
def test_invalid_breaker_settings_are_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"threshold|cooldown"):
        DynamicsCircuitBreaker("dynamics", InMemoryBreakerStore(), ManualClock(), **arguments)  # type: ignore[arg-type]


# --- logging ------------------------------------------------------------------------------------------


async def test_every_transition_is_logged_with_breaker_name_states_and_reason() -> None:
    breaker, _, clock = make_breaker()
    with capture_logs() as logs:
        await trip(breaker)
        clock.advance(COOLDOWN)
        await breaker.before_call()
        await breaker.record_failure("HTTP 502")
        clock.advance(COOLDOWN)
        await breaker.before_call()
        await breaker.record_success()
        await trip(breaker)
        await breaker.reset()
    transitions = [
        (e["breaker"], e["old_state"], e["new_state"], e["reason"], e["log_level"])
        for e in logs
        if e["event"] == "circuit_transition"
    ]
    assert transitions == [
        ("dynamics", "closed", "open", "3 consecutive failures, last: HTTP 503 #3", "warning"),
        ("dynamics", "open", "half_open", "cool-down elapsed; one probe allowed", "info"),
        ("dynamics", "half_open", "open", "probe failed: HTTP 502", "warning"),
        ("dynamics", "open", "half_open", "cool-down elapsed; one probe allowed", "info"),
        ("dynamics", "half_open", "closed", "probe succeeded", "info"),
        ("dynamics", "closed", "open", "3 consecutive failures, last: HTTP 503 #3", "warning"),
        ("dynamics", "open", "closed", "reset", "info"),
    ]


async def test_a_refused_call_is_logged_as_circuit_open_rejected() -> None:
    breaker, _, clock = make_breaker()
    await trip(breaker)
    with capture_logs() as logs, pytest.raises(CircuitOpenError):
        await breaker.before_call()
    assert logs == [
        {
            "event": "circuit_open_rejected",
            "breaker": "dynamics",
            "state": "open",
            "retry_at": clock.now() + timedelta(seconds=COOLDOWN),
            "log_level": "info",
        }
    ]


async def test_nothing_is_logged_for_calls_through_a_closed_circuit() -> None:
    breaker, _, _ = make_breaker()
    with capture_logs() as logs:
        await breaker.before_call()
        await breaker.record_success()
        await breaker.record_failure("HTTP 503")
    assert logs == []


class CountingClock(ManualClock):
    """A ManualClock that counts how often it is read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def now(self) -> datetime:
        self.reads += 1
        return super().now()


async def test_a_closed_circuit_in_memory_never_reads_the_clock() -> None:
    clock = CountingClock()
    breaker, _, _ = make_breaker(clock=clock)
    for _ in range(3):
        permit = await breaker.before_call()
        assert (permit.allowed, permit.is_probe) == (True, False)
        assert await breaker.record_success() is None
    assert clock.reads == 0
    await trip(breaker)
    reads = clock.reads
    with pytest.raises(CircuitOpenError):
        await breaker.before_call()
    assert clock.reads > reads, "an open circuit compares the clock with opened_at"


async def test_a_closed_permit_of_a_stores_own_making_is_let_through_without_a_log_line() -> None:
    class OwnPermits(InMemoryBreakerStore):
        async def try_acquire(
            self, name: str, now: Now, cooldown: timedelta, probe_lease: timedelta
        ) -> Permit:
            return Permit(allowed=True, state=CircuitState.CLOSED)

    breaker, _, _ = make_breaker(OwnPermits())
    with capture_logs() as logs:
        permit = await breaker.before_call()
    assert (permit.allowed, permit.is_probe, permit.transition, logs) == (True, False, None, [])
