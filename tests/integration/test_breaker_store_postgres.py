"""The BreakerStore contract, run against the in-memory store and PostgresBreakerStore alike.

Then what only PostgreSQL can show: separate connections (worker processes) racing for the half-open
probe, concurrent first failures all counted, a new pool resuming the state, driver errors wrapped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from certsync.resilience.breaker import (
    BreakerSnapshot,
    BreakerStore,
    CircuitOpenError,
    CircuitState,
    DynamicsCircuitBreaker,
    InMemoryBreakerStore,
    Permit,
    Transition,
)
from certsync.resilience.testing import ManualClock
from certsync.store.breaker_state import PostgresBreakerStore, snapshot_from_row
from certsync.store.errors import DatabaseUnavailable
from certsync.store.pool import Pool, open_pool

pytestmark = pytest.mark.integration

NAME = "dynamics"
THRESHOLD = 3
COOLDOWN = timedelta(seconds=30)
LEASE = timedelta(seconds=10)


@dataclass
class Subject:
    """A store under test, and how to read what it holds without going through its operations."""

    store: BreakerStore
    stored: Callable[[str], Awaitable[BreakerSnapshot | None]]


def _postgres_subject(pool: Pool) -> Subject:
    async def stored(name: str) -> BreakerSnapshot | None:
        async with pool.connection() as conn:
            cur = await conn.execute(
                "select name, state, consecutive_failures, opened_at, probe_lease_until, last_failure_reason"
                " from public.dynamics_circuit_breakers where name = %s",
                (name,),
            )
            row = await cur.fetchone()
        return None if row is None else snapshot_from_row(row)

    return Subject(PostgresBreakerStore(pool), stored)


def _memory_subject() -> Subject:
    store = InMemoryBreakerStore()

    async def stored(name: str) -> BreakerSnapshot | None:
        return store.states.get(name)

    return Subject(store, stored)


@pytest.fixture(params=["memory", "postgres"])
def subject(request: pytest.FixtureRequest) -> Subject:
    # A plain fixture: the session's template database is created outside any running event loop.
    if request.param == "memory":
        return _memory_subject()
    return _postgres_subject(request.getfixturevalue("pool"))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def open_circuit(store: BreakerStore, clock: ManualClock, name: str = NAME) -> None:
    for n in range(THRESHOLD):
        await store.record_failure(name, clock.now(), THRESHOLD, f"HTTP 503 #{n + 1}")


async def open_from_a_clock_an_hour_ahead(store: BreakerStore) -> None:
    ahead = ManualClock()
    ahead.advance(3600)
    await open_circuit(store, ahead)


async def stored_opened_at(subject: Subject) -> datetime | None:
    stored = await subject.stored(NAME)
    assert stored is not None
    return stored.opened_at


async def acquire(store: BreakerStore, clock: ManualClock, name: str = NAME) -> Permit:
    return await store.try_acquire(name, clock.now, COOLDOWN, LEASE)


# --- the contract, for both stores ------------------------------------------------------------------


async def test_unknown_breaker_is_closed_without_a_stored_row(subject: Subject, clock: ManualClock) -> None:
    assert await subject.store.snapshot(NAME, clock.now()) == BreakerSnapshot(NAME)
    assert await subject.stored(NAME) is None


async def test_closed_circuit_allows_without_writing(subject: Subject, clock: ManualClock) -> None:
    permit = await acquire(subject.store, clock)
    assert (permit.allowed, permit.state, permit.is_probe) == (True, CircuitState.CLOSED, False)
    assert await subject.stored(NAME) is None


async def test_failures_below_threshold_are_counted_while_closed(
    subject: Subject, clock: ManualClock
) -> None:
    for n in range(THRESHOLD - 1):
        assert await subject.store.record_failure(NAME, clock.now(), THRESHOLD, f"HTTP 503 #{n}") is None
    assert await subject.stored(NAME) == BreakerSnapshot(
        NAME, consecutive_failures=THRESHOLD - 1, last_failure_reason="HTTP 503 #1"
    )


async def test_threshold_failures_open_the_circuit(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock)
    assert await subject.stored(NAME) == BreakerSnapshot(
        NAME, CircuitState.OPEN, THRESHOLD, opened_at=clock.now(), last_failure_reason="HTTP 503 #3"
    )


async def test_opening_transition_names_the_count_and_last_failure(
    subject: Subject, clock: ManualClock
) -> None:
    for _ in range(THRESHOLD - 1):
        await subject.store.record_failure(NAME, clock.now(), THRESHOLD, "timeout")
    transition = await subject.store.record_failure(NAME, clock.now(), THRESHOLD, "HTTP 500")
    assert transition == Transition(
        CircuitState.CLOSED, CircuitState.OPEN, "3 consecutive failures, last: HTTP 500"
    )


async def test_threshold_of_one_opens_on_the_first_failure(subject: Subject, clock: ManualClock) -> None:
    transition = await subject.store.record_failure(NAME, clock.now(), 1, "HTTP 503")
    assert transition is not None
    assert transition.new is CircuitState.OPEN


async def test_open_circuit_denies_until_the_cool_down_ends(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock)
    opened = await subject.stored(NAME)
    clock.advance(COOLDOWN.total_seconds() - 0.001)
    permit = await acquire(subject.store, clock)
    assert (permit.allowed, permit.state) == (False, CircuitState.OPEN)
    assert permit.retry_at == ManualClock().now() + COOLDOWN
    assert await subject.stored(NAME) == opened, "a refusal writes nothing"


async def test_cool_down_elapsed_gives_the_probe_and_half_opens(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock)
    clock.advance(COOLDOWN.total_seconds())
    permit = await acquire(subject.store, clock)
    assert permit.is_probe
    assert permit.transition == Transition(
        CircuitState.OPEN, CircuitState.HALF_OPEN, "cool-down elapsed; one probe allowed"
    )
    stored = await subject.stored(NAME)
    assert stored is not None
    assert (stored.state, stored.probe_lease_until) == (CircuitState.HALF_OPEN, clock.now() + LEASE)


async def test_second_caller_during_the_lease_is_denied(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock)
    clock.advance(COOLDOWN.total_seconds())
    await acquire(subject.store, clock)
    clock.advance(LEASE.total_seconds() - 0.001)
    permit = await acquire(subject.store, clock)
    assert (permit.allowed, permit.state) == (False, CircuitState.HALF_OPEN)
    assert permit.retry_at == clock.now() + timedelta(seconds=0.001)


async def test_expired_lease_gives_the_probe_again_without_a_transition(
    subject: Subject, clock: ManualClock
) -> None:
    await open_circuit(subject.store, clock)
    clock.advance(COOLDOWN.total_seconds())
    await acquire(subject.store, clock)
    clock.advance(LEASE.total_seconds())
    permit = await acquire(subject.store, clock)
    assert (permit.is_probe, permit.transition) == (True, None)
    stored = await subject.stored(NAME)
    assert stored is not None
    assert stored.probe_lease_until == clock.now() + LEASE


async def test_probe_failure_reopens_with_a_fresh_opened_at(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock)
    clock.advance(COOLDOWN.total_seconds())
    await acquire(subject.store, clock)
    clock.advance(2)
    transition = await subject.store.record_failure(NAME, clock.now(), THRESHOLD, "HTTP 502")
    assert transition == Transition(CircuitState.HALF_OPEN, CircuitState.OPEN, "probe failed: HTTP 502")
    assert await subject.stored(NAME) == BreakerSnapshot(
        NAME, CircuitState.OPEN, THRESHOLD, opened_at=clock.now(), last_failure_reason="HTTP 502"
    )


async def test_probe_success_closes_and_clears_the_count(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock)
    clock.advance(COOLDOWN.total_seconds())
    await acquire(subject.store, clock)
    transition = await subject.store.record_success(NAME, clock.now)
    assert transition == Transition(CircuitState.HALF_OPEN, CircuitState.CLOSED, "probe succeeded")
    assert await subject.store.snapshot(NAME, clock.now()) == BreakerSnapshot(
        NAME, last_failure_reason="HTTP 503 #3"
    )


async def test_success_while_open_closes(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock)
    transition = await subject.store.record_success(NAME, clock.now)
    assert transition == Transition(CircuitState.OPEN, CircuitState.CLOSED, "a call succeeded")


async def test_success_while_closed_clears_the_count_without_a_transition(
    subject: Subject, clock: ManualClock
) -> None:
    await subject.store.record_failure(NAME, clock.now(), THRESHOLD, "HTTP 503")
    assert await subject.store.record_success(NAME, clock.now) is None
    assert (await subject.store.snapshot(NAME, clock.now())).consecutive_failures == 0


async def test_success_with_nothing_stored_writes_nothing(subject: Subject, clock: ManualClock) -> None:
    assert await subject.store.record_success(NAME, clock.now) is None
    assert await subject.stored(NAME) is None


async def test_failure_while_open_is_not_counted(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock)
    before = await subject.stored(NAME)
    clock.advance(5)
    assert await subject.store.record_failure(NAME, clock.now(), THRESHOLD, "late timeout") is None
    assert await subject.stored(NAME) == before


async def test_future_opened_at_is_clamped_to_now_and_persisted(subject: Subject, clock: ManualClock) -> None:
    await open_from_a_clock_an_hour_ahead(subject.store)
    permit = await acquire(subject.store, clock)
    assert permit.retry_at == clock.now() + COOLDOWN
    assert await stored_opened_at(subject) == clock.now()


async def test_snapshot_clamps_a_future_opened_at_and_persists_it(
    subject: Subject, clock: ManualClock
) -> None:
    await open_from_a_clock_an_hour_ahead(subject.store)
    assert (await subject.store.snapshot(NAME, clock.now())).opened_at == clock.now()
    assert await stored_opened_at(subject) == clock.now()


async def test_future_probe_lease_is_clamped_to_one_lease_from_now(
    subject: Subject, clock: ManualClock
) -> None:
    ahead = ManualClock()
    await open_circuit(subject.store, ahead)
    ahead.advance(COOLDOWN.total_seconds() + 3600)
    assert (await acquire(subject.store, ahead)).is_probe
    permit = await acquire(subject.store, clock)
    assert permit.retry_at == clock.now() + LEASE
    stored = await subject.stored(NAME)
    assert stored is not None
    assert stored.probe_lease_until == clock.now() + LEASE


@pytest.mark.parametrize("state", [CircuitState.OPEN, CircuitState.HALF_OPEN])
async def test_reset_forgets_the_breaker(subject: Subject, clock: ManualClock, state: CircuitState) -> None:
    await open_circuit(subject.store, clock)
    if state is CircuitState.HALF_OPEN:
        clock.advance(COOLDOWN.total_seconds())
        await acquire(subject.store, clock)
    assert await subject.store.reset(NAME, clock.now()) == Transition(state, CircuitState.CLOSED, "reset")
    assert await subject.stored(NAME) is None


async def test_reset_of_a_closed_breaker_is_not_a_transition(subject: Subject, clock: ManualClock) -> None:
    await subject.store.record_failure(NAME, clock.now(), THRESHOLD, "HTTP 503")
    assert await subject.store.reset(NAME, clock.now()) is None
    assert await subject.store.reset(NAME, clock.now()) is None


async def test_breakers_are_independent_by_name(subject: Subject, clock: ManualClock) -> None:
    await open_circuit(subject.store, clock, name="other")
    assert (await acquire(subject.store, clock)).allowed


@pytest.mark.parametrize("state", list(CircuitState))
async def test_a_new_breaker_over_the_same_store_resumes(
    subject: Subject, clock: ManualClock, state: CircuitState
) -> None:
    first = DynamicsCircuitBreaker(NAME, subject.store, clock, cooldown=30.0, probe_lease=10.0)
    if state is not CircuitState.CLOSED:
        for _ in range(THRESHOLD):
            await first.record_failure("HTTP 503")
    if state is CircuitState.HALF_OPEN:
        clock.advance(COOLDOWN.total_seconds())
        await first.before_call()
    before = await first.snapshot()
    restarted = DynamicsCircuitBreaker(NAME, subject.store, clock, cooldown=30.0, probe_lease=10.0)
    assert await restarted.snapshot() == before
    assert before.state is state


# --- what only PostgreSQL shows ----------------------------------------------------------------------


@pytest.fixture
async def second_pool(database_url: str) -> AsyncIterator[Pool]:
    """A second pool on the same database: another worker process's connections."""
    p = await open_pool(database_url, max_size=2)
    yield p
    await p.close()


async def test_two_breakers_on_separate_connections_race_and_exactly_one_probes(
    pool: Pool, second_pool: Pool, clock: ManualClock
) -> None:
    breakers = [
        DynamicsCircuitBreaker(NAME, PostgresBreakerStore(p), clock, cooldown=30.0, probe_lease=10.0)
        for p in (pool, second_pool)
    ]
    for _ in range(THRESHOLD):
        await breakers[0].record_failure("HTTP 503")
    for _ in range(10):
        clock.advance(COOLDOWN.total_seconds())
        outcomes = await asyncio.gather(*(b.before_call() for b in breakers), return_exceptions=True)
        winners = [b for b, o in zip(breakers, outcomes, strict=True) if isinstance(o, Permit)]
        refused = [o for o in outcomes if isinstance(o, CircuitOpenError)]
        assert len(winners) == 1
        assert len(refused) == 1
        await winners[0].record_failure("probe: HTTP 503")


async def test_many_concurrent_callers_get_one_probe(pool: Pool, clock: ManualClock) -> None:
    store = PostgresBreakerStore(pool)
    await open_circuit(store, clock)
    clock.advance(COOLDOWN.total_seconds())
    permits = await asyncio.gather(*(acquire(store, clock) for _ in range(8)))
    assert sum(p.is_probe for p in permits) == 1
    assert sum(p.transition is not None for p in permits) == 1


async def test_concurrent_first_failures_are_all_counted(pool: Pool, clock: ManualClock) -> None:
    store = PostgresBreakerStore(pool)
    transitions = await asyncio.gather(
        *(store.record_failure(NAME, clock.now(), 6, f"HTTP 503 #{n}") for n in range(6))
    )
    opened = [(t.old, t.new) for t in transitions if t is not None]
    assert opened == [(CircuitState.CLOSED, CircuitState.OPEN)], "exactly the sixth failure opens"
    assert (await store.snapshot(NAME, clock.now())).consecutive_failures == 6


async def test_a_new_pool_resumes_the_stored_state(pool: Pool, second_pool: Pool, clock: ManualClock) -> None:
    await open_circuit(PostgresBreakerStore(pool), clock)
    restarted = DynamicsCircuitBreaker(NAME, PostgresBreakerStore(second_pool), clock, cooldown=30.0)
    with pytest.raises(CircuitOpenError):
        await restarted.before_call()
    clock.advance(COOLDOWN.total_seconds())
    assert (await restarted.before_call()).is_probe


async def test_database_failures_are_raised_as_database_unavailable(
    database_url: str, clock: ManualClock
) -> None:
    closed = await open_pool(database_url, max_size=1)
    await closed.close()
    store = PostgresBreakerStore(closed)
    with pytest.raises(DatabaseUnavailable):
        await acquire(store, clock)
    with pytest.raises(DatabaseUnavailable):
        await store.record_failure(NAME, clock.now(), THRESHOLD, "HTTP 503")


# --- the closed-state cache (one process skipping round trips while it knows the breaker is clean) ---


async def test_a_cached_store_notices_a_circuit_another_worker_opened_once_its_cache_lapses(
    pool: Pool, second_pool: Pool, clock: ManualClock
) -> None:
    cached = PostgresBreakerStore(pool, closed_cache_seconds=1.0)
    await cached.record_success(NAME, clock.now)  # seen closed and clean
    await open_circuit(PostgresBreakerStore(second_pool), clock)  # another worker's outage

    assert (await acquire(cached, clock)).allowed  # still within the cache: no query was made
    clock.advance(1.0)
    denied = await acquire(cached, clock)
    assert not denied.allowed
    assert denied.state is CircuitState.OPEN


async def test_a_cached_stores_snapshot_is_the_clean_closed_state_only_within_its_cache(
    pool: Pool, second_pool: Pool, clock: ManualClock
) -> None:
    cached = PostgresBreakerStore(pool, closed_cache_seconds=1.0)
    await cached.record_success(NAME, clock.now)
    await open_circuit(PostgresBreakerStore(second_pool), clock)

    # What the worker reads before each claim: no query while it knows the breaker clean...
    assert (await cached.snapshot(NAME, clock.now())).state is CircuitState.CLOSED
    clock.advance(1.0)
    # ...and the stored state once the cache lapses.
    assert (await cached.snapshot(NAME, clock.now())).state is CircuitState.OPEN


async def test_a_failure_recorded_by_the_cached_store_is_never_hidden_by_its_cache(
    pool: Pool, clock: ManualClock
) -> None:
    cached = PostgresBreakerStore(pool, closed_cache_seconds=60.0)
    await cached.record_success(NAME, clock.now)
    for _ in range(THRESHOLD):
        await cached.record_failure(NAME, clock.now(), THRESHOLD, "HTTP 503")
    assert not (await acquire(cached, clock)).allowed
    assert (await cached.snapshot(NAME, clock.now())).state is CircuitState.OPEN


async def test_a_store_without_a_cache_sees_another_workers_outage_at_once(
    pool: Pool, second_pool: Pool, clock: ManualClock
) -> None:
    uncached = PostgresBreakerStore(pool)
    await uncached.record_success(NAME, clock.now)
    await open_circuit(PostgresBreakerStore(second_pool), clock)
    assert not (await acquire(uncached, clock)).allowed
