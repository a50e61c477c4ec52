"""Automatic replay against the real sandbox: pending entries are re-sent by the worker itself.

Time is scaled: the clock runs with the system's, a second ahead of the database's (so what the
database stamps with ``now()`` is due), and the test jumps it over the circuit's cool-down and the
schedule's 1, 5, 15 and 60 minutes. Sleeps are real but short (retry back-off 0.01 s, as in every
worker test): a ManualClock's sleep returns without yielding, and the worker's heartbeat would spin.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from certsync.app import Runtime, open_runtime
from certsync.delivery.auto_replay import AUTO_REPLAY_BY, AutoReplaySchedule
from certsync.sandbox.faults import FaultScript, FaultStep, Latency
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from certsync.store.retry_queue import RetryEntry
from tests.support.runtime import FAST, puts, settings_for
from tests.support.seed import seed_certifications, seed_pending_entries

pytestmark = pytest.mark.integration

OPERATOR = "ops-on-call"
COOLDOWN = 30.0


def portal_answers(sandbox: SandboxServer, status: int | None, *, latency_ms: int = 0) -> None:
    """Every certification PUT answers ``status`` from now on (``None``: the portal has recovered)."""
    steps = () if status is None else (FaultStep(status=status, times=None, scope="put"),)
    latency = Latency(min_ms=latency_ms, scope="put") if latency_ms else None
    sandbox.sandbox.load_faults(FaultScript(steps=steps, latency=latency))


class JumpingClock:
    """The system clock plus an offset the test moves forward (``advance``)."""

    def __init__(self) -> None:
        self._offset = timedelta(seconds=1)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += timedelta(seconds=seconds)


@asynccontextmanager
async def runtime_for(
    database_url: str, sandbox: SandboxServer, clock: JumpingClock, **overrides: Any
) -> AsyncIterator[Runtime]:
    values: dict[str, Any] = {
        "auto_replay": True,
        "breaker_cooldown": COOLDOWN,
        "breaker_failure_threshold": 3,
    }
    settings = settings_for(database_url, sandbox, **(values | overrides))
    async with open_runtime(settings, clock=clock) as rt:
        yield rt


@pytest.fixture
def clock() -> JumpingClock:
    return JumpingClock()


async def entries(runtime: Runtime) -> list[RetryEntry]:
    return [await runtime.queue.get(row.id) for row in await runtime.queue.list_entries(limit=500)]


async def once(runtime: Runtime) -> Any:
    return await runtime.worker(FAST, listen=False).run(once=True)


async def test_an_outage_leaves_pending_entries_that_the_worker_delivers_itself_once_the_portal_heals(
    pool: Pool, database_url: str, sandbox: SandboxServer, clock: JumpingClock
) -> None:
    async with runtime_for(database_url, sandbox, clock) as runtime:
        portal_answers(sandbox, 503)
        certifications = await seed_certifications(pool, 3)
        outage = await once(runtime)
        # Three failed calls open the circuit: every operation is cut short and queued pending. While
        # the circuit is open nothing is replayed.
        assert outage.queued_pending == 3
        assert outage.auto_replayed == 0
        assert (await runtime.breaker.snapshot()).state == "open"
        queued = await entries(runtime)
        assert {e.status for e in queued} == {"pending"}
        assert all(e.next_auto_replay_at is not None and e.auto_replay_count == 0 for e in queued)
        sent_in_outage = len(puts(sandbox))

        portal_answers(sandbox, None)
        still_open = await once(runtime)  # the cool-down is not over: nothing is sent
        assert still_open.auto_replayed == 0
        assert len(puts(sandbox)) == sent_in_outage

        clock.advance(COOLDOWN + 1)
        healed = await once(runtime)

        # The first replay is the half-open probe; it closes the circuit and the others follow.
        assert healed.auto_replayed == 3
        assert (await runtime.breaker.snapshot()).state == "closed"
        replayed = await entries(runtime)
        assert {(e.status, e.last_replayed_by, e.next_auto_replay_at) for e in replayed} == {
            ("replayed", AUTO_REPLAY_BY, None)
        }
        assert len(puts(sandbox)) == sent_in_outage + 3
        held = sandbox.sandbox.snapshot()["certifications"]
        assert set(held) == {str(c) for c in certifications}


async def test_a_400_requires_investigation_and_is_never_replayed_automatically(
    pool: Pool, database_url: str, sandbox: SandboxServer, clock: JumpingClock
) -> None:
    async with runtime_for(database_url, sandbox, clock) as runtime:
        sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=400, times=1, scope="put"),)))
        await seed_certifications(pool, 1)
        await once(runtime)
        [entry] = await entries(runtime)
        assert (entry.status, entry.next_auto_replay_at) == ("requires_investigation", None)

        clock.advance(2 * 3600)
        stats = await once(runtime)

        assert stats.auto_replayed == stats.auto_replay_failed == 0
        [after] = await entries(runtime)
        assert (after.status, after.replay_count, after.auto_replay_count) == ("requires_investigation", 0, 0)
        assert len(puts(sandbox)) == 1


async def test_after_five_failed_automatic_replays_an_entry_waits_for_a_person(
    pool: Pool, database_url: str, sandbox: SandboxServer, clock: JumpingClock
) -> None:
    # A threshold above the calls made keeps the circuit closed: each replay fails on its own retries.
    async with runtime_for(database_url, sandbox, clock, breaker_failure_threshold=1000) as runtime:
        portal_answers(sandbox, 503)
        await seed_certifications(pool, 1)
        calls = 4  # one attempt and three retries per operation

        first = await once(runtime)  # delivery fails, is queued pending, and is replayed at once
        assert (first.queued_pending, first.auto_replay_failed) == (1, 1)
        [entry] = await entries(runtime)
        assert (entry.auto_replay_count, entry.replay_count) == (1, 1)
        assert len(puts(sandbox)) == 2 * calls

        for made, delay in enumerate(AutoReplaySchedule().delays, start=1):
            assert entry.next_auto_replay_at is not None
            due_in = (entry.next_auto_replay_at - clock.now()).total_seconds()
            assert delay - 1 < due_in <= delay
            clock.advance(due_in - 5)
            early = await once(runtime)  # not yet due: nothing is sent
            assert early.auto_replay_failed == 0
            assert len(puts(sandbox)) == (1 + made) * calls
            clock.advance(6)
            due = await once(runtime)
            assert due.auto_replay_failed == 1
            [entry] = await entries(runtime)
            assert entry.auto_replay_count == made + 1

        assert (entry.status, entry.auto_replay_count, entry.next_auto_replay_at) == ("pending", 5, None)
        assert [h.get("replayed_by") for h in entry.failure_history[1:]] == [AUTO_REPLAY_BY] * 5
        clock.advance(86400)
        idle = await once(runtime)
        assert idle.auto_replay_failed == 0
        assert len(puts(sandbox)) == 6 * calls

        # A person can still replay it, exactly as before.
        portal_answers(sandbox, None)
        result = await runtime.replay_service().replay(entry.id, by=OPERATOR)
        assert result.status == "replayed"
        after = await runtime.queue.get(entry.id)
        assert (after.status, after.last_replayed_by, after.next_auto_replay_at) == (
            "replayed",
            OPERATOR,
            None,
        )


async def test_with_auto_replay_off_nothing_is_replayed(
    pool: Pool, database_url: str, sandbox: SandboxServer, clock: JumpingClock
) -> None:
    async with runtime_for(
        database_url, sandbox, clock, auto_replay=False, breaker_failure_threshold=1000
    ) as runtime:
        portal_answers(sandbox, 503)
        await seed_certifications(pool, 2)
        await once(runtime)
        portal_answers(sandbox, None)
        clock.advance(3600)
        stats = await once(runtime)

        assert stats.auto_replayed == 0
        queued = await entries(runtime)
        assert [(e.status, e.replay_count) for e in queued] == [("pending", 0), ("pending", 0)]
        assert len(puts(sandbox)) == 2 * 4


async def test_a_replay_refused_by_the_open_circuit_uses_up_no_automatic_replay(
    pool: Pool, database_url: str, sandbox: SandboxServer, clock: JumpingClock
) -> None:
    async with runtime_for(database_url, sandbox, clock) as runtime:
        await seed_pending_entries(pool, 1)
        [row] = await runtime.queue.list_entries()
        await mark_due(pool, clock.now())
        claims = await runtime.queue.claim_auto_replays(clock.now(), limit=5, lease_seconds=300)
        assert [c.id for c in claims] == [row.id]
        # Another worker opens the circuit between this worker's look at it and its replay.
        for _ in range(3):
            await runtime.breaker.record_failure("503 elsewhere")

        outcome = await runtime.auto_replayer().replay(claims[0])

        assert outcome == "refused"
        after = await runtime.queue.get(row.id)
        open_until = await runtime.breaker.open_until()
        assert (after.status, after.auto_replay_count) == ("pending", 0)
        assert after.next_auto_replay_at == open_until
        assert puts(sandbox) == []


async def mark_due(pool: Pool, now: datetime) -> None:
    """Entries planted straight into the table (seed_pending_entries) get the schedule the writers set."""
    async with pool.connection() as conn:
        await conn.execute(
            "update public.dynamics_sync_retry_queue set next_auto_replay_at = %s where status = 'pending'",
            (now,),
        )


async def test_concurrent_claims_never_take_one_entry_twice(
    pool: Pool, database_url: str, sandbox: SandboxServer, clock: JumpingClock
) -> None:
    async with runtime_for(database_url, sandbox, clock) as runtime:
        await seed_pending_entries(pool, 60)
        await mark_due(pool, clock.now())
        batches = await asyncio.gather(
            *(runtime.queue.claim_auto_replays(clock.now(), limit=7, lease_seconds=300) for _ in range(12))
        )
        taken = [claim.id for batch in batches for claim in batch]
        assert len(taken) == 60
        assert len(set(taken)) == 60
        # Leased: none of them is due again until the lease has passed.
        assert await runtime.queue.claim_auto_replays(clock.now(), limit=100, lease_seconds=300) == []
        later = clock.now() + timedelta(seconds=301)
        assert len(await runtime.queue.claim_auto_replays(later, limit=100, lease_seconds=300)) == 60


async def test_two_workers_never_replay_one_entry_at_once(
    pool: Pool, database_url: str, sandbox: SandboxServer, clock: JumpingClock
) -> None:
    # Every replay takes a while at the portal, so the two workers' replays overlap.
    portal_answers(sandbox, None, latency_ms=30)
    await seed_pending_entries(pool, 40)
    await mark_due(pool, clock.now())
    async with (
        runtime_for(database_url, sandbox, clock) as first,
        runtime_for(database_url, sandbox, clock) as second,
    ):
        one, two = await asyncio.gather(once(first), once(second))

        assert one.auto_replayed + two.auto_replayed == 40
        assert one.auto_replayed > 0
        assert two.auto_replayed > 0
        replayed = await entries(first)
        assert {(e.status, e.replay_count, e.auto_replay_count) for e in replayed} == {("replayed", 1, 1)}
        # One PUT per replay, beside the ten certifications' own deliveries from the outbox.
        assert one.delivered + two.delivered == 10
        assert len(puts(sandbox)) == 40 + 10
