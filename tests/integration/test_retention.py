"""Retention against real PostgreSQL: old finished rows go in small batches, nothing open or recent is
touched; and with the flag off the worker still sweeps and prunes while it sends nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import cast
from uuid import UUID

import pytest

from certsync.app import Runtime, open_runtime
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from certsync.store.retention import Retention, RetentionPolicy
from certsync.worker import WorkerOptions
from tests.support.runtime import FAST, settings_for, wait_until
from tests.support.seed import outbox_statuses, seed_certifications

pytestmark = pytest.mark.integration

OLD_EVENTS = 100_000
BATCH = 5000


async def plant_closed_events(pool: Pool, count: int, *, closed_days_ago: float) -> None:
    """``count`` delivered and superseded events closed ``closed_days_ago``, in one statement."""
    async with pool.connection() as conn:
        await conn.execute(
            """
            insert into public.certification_sync_events
              (certification_id, certification_version, operation_type, state, status, occurred_at,
               closed_at)
            select gen_random_uuid(), 1, 'certification.created', '{}'::jsonb,
                   case when i %% 2 = 0 then 'delivered' else 'superseded' end,
                   now() - make_interval(days => %(days)s::int) - make_interval(secs => i),
                   now() - make_interval(days => %(days)s::int) + make_interval(secs => i %% 3600)
            from generate_series(1, %(count)s) as i
            """,
            {"count": count, "days": closed_days_ago},
        )


async def scalar(pool: Pool, sql: str) -> object:
    async with pool.connection() as conn:
        row = await (await conn.execute(sql)).fetchone()
        assert row is not None
        return next(iter(dict(row).values()))


async def status_of(pool: Pool, certification_id: UUID) -> str:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select status from public.certifications where id = %s", (certification_id,)
        )
        row = await cur.fetchone()
    assert row is not None
    return cast(str, row["status"])


async def test_old_delivered_and_superseded_events_are_deleted_in_batches_and_nothing_else(
    pool: Pool,
) -> None:
    await plant_closed_events(pool, OLD_EVENTS, closed_days_ago=40)
    await plant_closed_events(pool, 25, closed_days_ago=2)  # recent: kept
    waiting = await seed_certifications(pool, 3)  # open events: kept whatever their age
    async with pool.connection() as conn:
        await conn.execute(
            "update public.certification_sync_events set occurred_at = now() - interval '90 days'"
            " where status = 'waiting'"
        )
        # A queue entry that names an old event keeps its row; the foreign key forgets the event.
        await conn.execute(
            """
            insert into public.dynamics_sync_retry_queue
              (operation_type, certification_id, event_id, payload_json, failure_reason, status)
            select 'certification.created', e.certification_id, e.id, '{}'::jsonb, 'HTTP 503', 'pending'
            from public.certification_sync_events e where e.status = 'delivered' limit 1
            """
        )
    retention = Retention(pool, RetentionPolicy(outbox_days=30, batch_size=BATCH, max_batches=1000))

    report = await retention.run(datetime.now(UTC))

    counts = report.batches["outbox"]
    assert max(counts) <= BATCH
    assert len(counts) >= OLD_EVENTS // BATCH
    assert sum(counts) == OLD_EVENTS
    assert report.complete
    assert await outbox_statuses(pool) == {"delivered": 12, "superseded": 13, "waiting": 3}
    assert (
        await scalar(pool, "select count(*) from public.dynamics_sync_retry_queue where event_id is null")
        == 1
    )
    assert len(waiting) == 3


async def test_a_run_stops_at_its_bound_and_says_more_is_left(pool: Pool) -> None:
    await plant_closed_events(pool, 250, closed_days_ago=40)
    retention = Retention(pool, RetentionPolicy(outbox_days=30, batch_size=100, max_batches=2))

    first = await retention.run(datetime.now(UTC))
    second = await retention.run(datetime.now(UTC))

    assert (first.batches["outbox"], first.complete) == ([100, 100], False)
    assert (second.batches["outbox"], second.complete) == ([50], True)


async def test_final_queue_entries_and_old_audit_records_have_their_own_retention(pool: Pool) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            """
            insert into public.dynamics_sync_retry_queue
              (operation_type, payload_json, failure_reason, status, updated_at)
            values ('certification.created', '{}', 'r', 'replayed', now() - interval '100 days'),
                   ('certification.created', '{}', 'r', 'discarded', now() - interval '100 days'),
                   ('certification.created', '{}', 'r', 'discarded', now() - interval '10 days'),
                   ('certification.created', '{}', 'r', 'pending', now() - interval '400 days'),
                   ('certification.created', '{}', 'r', 'requires_investigation', now() - interval '400 days')
            """
        )
        await conn.execute(
            """
            insert into private.access_audit
              (read_at, reader_id, certification_id, peer_mentor_id, foreign_organisation_ids)
            select now() - make_interval(days => d), gen_random_uuid(), gen_random_uuid(),
                   gen_random_uuid(), '{}'
            from unnest(array[400, 366, 364, 1]) as d
            """
        )
    retention = Retention(pool, RetentionPolicy(queue_days=90, audit_days=365, batch_size=1))

    report = await retention.run(datetime.now(UTC))

    assert report.batches["queue"] == [1, 1, 0]
    assert report.batches["audit"] == [1, 1, 0]
    left = await scalar(
        pool, "select string_agg(status, ',' order by status) from public.dynamics_sync_retry_queue"
    )
    assert left == "discarded,pending,requires_investigation"
    assert await scalar(pool, "select count(*) from private.access_audit") == 2


@pytest.fixture
async def flag_off(database_url: str, sandbox: SandboxServer) -> AsyncIterator[Runtime]:
    settings = settings_for(database_url, sandbox, dynamics_sync_enabled=False)
    async with open_runtime(settings) as rt:
        yield rt


async def test_with_the_flag_off_the_worker_still_sweeps_and_prunes_and_sends_nothing(
    pool: Pool, flag_off: Runtime, sandbox: SandboxServer
) -> None:
    [lapsed] = await seed_certifications(pool, 1, valid_until=date(2021, 1, 1))
    await seed_certifications(pool, 1)
    await plant_closed_events(pool, 40, closed_days_ago=45)

    stats = await flag_off.worker(FAST, listen=False).run(once=True)

    assert stats.expired_by_sweep == 1
    assert stats.pruned == 40
    assert await status_of(pool, lapsed) == "expired"
    # Created twice and expired once: everything waits, durably, for the flag to be turned on.
    assert await outbox_statuses(pool) == {"waiting": 3}
    assert sandbox.sandbox.requests() == []


async def test_with_the_flag_off_a_running_worker_sweeps_until_it_is_stopped(
    pool: Pool, flag_off: Runtime, sandbox: SandboxServer
) -> None:
    stop = asyncio.Event()
    worker = flag_off.worker(WorkerOptions(sweep_check_seconds=0.1, poll_seconds=0.1), listen=False)
    running = asyncio.create_task(worker.run(stop))
    # A certification that lapses while the worker runs is expired at its next sweep check.
    [lapsed] = await seed_certifications(pool, 1, valid_until=date.today() - timedelta(days=3))

    async def expired() -> bool:
        return await status_of(pool, lapsed) == "expired"

    await wait_until(expired, "the sweep to expire the lapsed certification")
    assert not running.done()
    stop.set()
    stats = await running
    assert stats.expired_by_sweep == 1
    assert sandbox.sandbox.requests() == []
