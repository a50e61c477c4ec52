"""The outbox: capture in the same transaction, claim newest-per-certification, fencing, queueing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
import structlog.testing

from certsync.store.errors import DatabaseUnavailable
from certsync.store.outbox import (
    CLAIM_PART_MIN_EVENTS,
    NOTIFY_CHANNEL,
    Claim,
    DeliveredClose,
    DeliveredCloser,
    Outbox,
)
from certsync.store.pool import Pool, open_pool
from certsync.store.queries import query
from certsync.store.retry_queue import NewRetryEntry
from tests.support.seed import seed_certifications

pytestmark = pytest.mark.integration

# Event times default to the database clock; claims pass "now" explicitly, a little later than that.
NOW = datetime.now(UTC) + timedelta(hours=1)


async def events(pool: Pool, certification_id: UUID) -> list[dict[str, object]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select * from public.certification_sync_events where certification_id = %s"
            " order by certification_version",
            (certification_id,),
        )
        return [dict(r) for r in await cur.fetchall()]


async def test_insert_by_plain_sql_is_captured_as_a_created_event(pool: Pool) -> None:
    [cert] = await seed_certifications(pool, 1)
    [event] = await events(pool, cert)
    assert event["operation_type"] == "certification.created"
    assert event["status"] == "waiting"
    assert event["certification_version"] == 1
    assert event["state"] == {
        "id": str(cert),
        "peer_mentor_id": event["state"]["peer_mentor_id"],  # type: ignore[index]
        "certification_type": "peer_mentor",
        "status": "active",
        "valid_from": "2020-01-01",
        "valid_until": "2099-01-01",
        "version": 1,
    }


async def test_status_change_by_plain_sql_is_captured_with_the_new_state_and_version(pool: Pool) -> None:
    [cert] = await seed_certifications(pool, 1)
    async with pool.connection() as conn:
        await conn.execute("update public.certifications set status = 'revoked' where id = %s", (cert,))
    _created, changed = await events(pool, cert)
    assert changed["operation_type"] == "certification.status_changed"
    assert changed["certification_version"] == 2
    assert changed["state"]["status"] == "revoked"  # type: ignore[index]
    assert changed["state"]["version"] == 2  # type: ignore[index]


async def test_a_rolled_back_change_leaves_no_event(pool: Pool) -> None:
    [cert] = await seed_certifications(pool, 1)
    async with pool.connection() as conn, conn.transaction() as tx:
        await conn.execute("update public.certifications set status = 'suspended' where id = %s", (cert,))
        raise psycopg.Rollback(tx)
    assert [e["operation_type"] for e in await events(pool, cert)] == ["certification.created"]


async def test_a_bulk_update_writes_one_event_per_row_and_one_notification(
    pool: Pool, database_url: str
) -> None:
    certs = await seed_certifications(pool, 50)
    listener = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    try:
        await listener.execute(f"listen {NOTIFY_CHANNEL}")
        async with pool.connection() as conn:
            await conn.execute(
                "update public.certifications set status = 'expired' where id = any(%s)", (certs,)
            )
        received = []
        gen = listener.notifies(timeout=1.0)
        async for note in gen:
            received.append(note)
        assert len(received) == 1
    finally:
        await listener.close()
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select count(*) as n from public.certification_sync_events"
            " where operation_type = 'certification.status_changed'"
        )
        assert (await cur.fetchone())["n"] == 50  # type: ignore[index]


async def test_claim_takes_the_newest_state_once_and_supersedes_older_events(pool: Pool) -> None:
    [cert] = await seed_certifications(pool, 1)
    async with pool.connection() as conn:
        await conn.execute("update public.certifications set status = 'suspended' where id = %s", (cert,))
        await conn.execute("update public.certifications set status = 'revoked' where id = %s", (cert,))
    outbox = Outbox(pool, "worker-a")
    claim = await outbox.claim(datetime.now(UTC), limit=10, lease_seconds=60)
    assert [(e.certification_id, e.certification_version) for e in claim.events] == [(cert, 3)]
    assert claim.superseded == 2
    statuses = {e["certification_version"]: e["status"] for e in await events(pool, cert)}
    assert statuses == {1: "superseded", 2: "superseded", 3: "in_flight"}


async def test_an_event_in_flight_blocks_a_second_claim_of_its_certification(pool: Pool) -> None:
    [cert] = await seed_certifications(pool, 1)
    outbox = Outbox(pool, "worker-a")
    first = await outbox.claim(datetime.now(UTC), limit=10, lease_seconds=60)
    async with pool.connection() as conn:
        await conn.execute("update public.certifications set status = 'revoked' where id = %s", (cert,))
    second = await Outbox(pool, "worker-b").claim(datetime.now(UTC), limit=10, lease_seconds=60)
    assert len(first.events) == 1
    assert second.events == ()


async def test_a_claim_looks_each_candidate_up_instead_of_comparing_every_pair(
    pool: Pool,
) -> None:
    """With statistics that saw nothing in flight (as after a bulk load), the claim was planned on
    one-row estimates: ``not exists`` became an anti join comparing every in-flight event with each
    candidate (987 of a 1,600-event claim's 1,035 ms with 9,600 in flight), and the superseding join
    compared every claimed event with every locked one. Each candidate is now one index lookup, and
    nothing is compared pairwise."""
    await seed_certifications(pool, 400)
    async with pool.connection() as conn:
        await conn.execute("analyze public.certification_sync_events")
    in_flight = await Outbox(pool, "worker-a").claim(NOW, limit=200, lease_seconds=60)
    assert len(in_flight.events) == 200
    params = {"now": NOW, "limit": 200, "worker": "worker-b", "lease_seconds": 60, "organisation_id": None}
    async with pool.connection() as conn:
        cur = await conn.execute("explain (analyze, format json) " + query("claim_due_events"), params)
        [row] = await cur.fetchall()
        await conn.rollback()
    plan: list[dict[str, Any]] = row["QUERY PLAN"]  # type: ignore[assignment]
    nodes = list(_plan_nodes(plan[0]["Plan"]))
    compared = sum(n.get("Rows Removed by Join Filter", 0) for n in nodes)
    in_flight_read = sum(
        n["Actual Rows"] * n["Actual Loops"]
        for n in nodes
        if n.get("Relation Name") == "certification_sync_events" and "in_flight" in n.get("Index Name", "")
    )
    assert compared <= 200, f"{compared} row pairs compared by join filters: quadratic in the claim"
    assert in_flight_read == 0, f"{in_flight_read} in-flight rows read for 200 candidates, none in flight"


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


async def test_concurrent_claimers_never_take_the_same_certification(pool: Pool, database_url: str) -> None:
    certs = await seed_certifications(pool, 200)
    async with pool.connection() as conn:
        await conn.execute(
            "update public.certifications set status = 'suspended' where id = any(%s)", (certs,)
        )
    pools = [await open_pool(database_url, max_size=2) for _ in range(4)]
    try:
        outboxes = [Outbox(p, f"worker-{i}") for i, p in enumerate(pools)]
        claimed: list[UUID] = []
        for _ in range(20):
            claims = await asyncio.gather(
                *(o.claim(datetime.now(UTC), limit=25, lease_seconds=60) for o in outboxes)
            )
            batch = [e.certification_id for c in claims for e in c.events]
            claimed.extend(batch)
            if not batch:
                break
    finally:
        for p in pools:
            await p.close()
    assert sorted(claimed) == sorted(certs)  # every certification exactly once


async def test_a_large_claim_runs_as_concurrent_parts_each_event_once_oldest_first(pool: Pool) -> None:
    certs = await seed_certifications(pool, 2 * CLAIM_PART_MIN_EVENTS + 50)
    outbox = Outbox(pool, "worker-a")
    parts: list[int] = []
    running = 0
    claim_part = outbox._claim_part

    async def counted(now: datetime, limit: int, lease_seconds: float) -> Claim:
        nonlocal running
        running += 1
        parts.append(running)  # how many statements were running as this one started
        try:
            return await claim_part(now, limit, lease_seconds)
        finally:
            running -= 1

    outbox._claim_part = counted  # type: ignore[method-assign]
    first = await outbox.claim(NOW, limit=len(certs), lease_seconds=60)
    assert parts == [1, 2]  # two statements, the second started while the first ran
    rest = await outbox.claim(NOW, limit=len(certs), lease_seconds=60)  # any a racing part passed over
    claimed = [e.certification_id for e in first.events + rest.events]
    assert sorted(claimed) == sorted(certs)  # every certification once, none twice
    order = [(e.occurred_at, e.id) for e in first.events]
    assert order == sorted(order)


async def test_a_failed_claim_part_leaves_the_other_parts_claims_to_deliver(pool: Pool) -> None:
    await seed_certifications(pool, 2 * CLAIM_PART_MIN_EVENTS)
    outbox = Outbox(pool, "worker-a")
    claim_part = outbox._claim_part
    calls = 0

    async def second_fails(now: datetime, limit: int, lease_seconds: float) -> Claim:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise DatabaseUnavailable("database unavailable (claim_due_events): connection lost")
        return await claim_part(now, limit, lease_seconds)

    outbox._claim_part = second_fails  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        claim = await outbox.claim(NOW, limit=2 * CLAIM_PART_MIN_EVENTS, lease_seconds=60)
    assert len(claim.events) == CLAIM_PART_MIN_EVENTS  # the part that succeeded: claimed, so returned
    assert [entry["event"] for entry in logs] == ["claim_part_failed"]
    assert "connection lost" in logs[0]["error"]

    async def every_part_fails(now: datetime, limit: int, lease_seconds: float) -> Claim:
        raise DatabaseUnavailable("database unavailable (claim_due_events): connection lost")

    outbox._claim_part = every_part_fails  # type: ignore[method-assign]
    with pytest.raises(DatabaseUnavailable):
        await outbox.claim(NOW, limit=2 * CLAIM_PART_MIN_EVENTS, lease_seconds=60)


async def test_a_rescued_claim_cannot_be_closed_by_the_worker_that_lost_it(pool: Pool) -> None:
    [cert] = await seed_certifications(pool, 1)
    dead = Outbox(pool, "dead-worker")
    [lost] = (await dead.claim(NOW, limit=1, lease_seconds=30)).events
    alive = Outbox(pool, "alive-worker")
    assert await alive.rescue_expired(NOW + timedelta(seconds=31)) == 1
    [rescued] = (await alive.claim(NOW + timedelta(seconds=31), limit=1, lease_seconds=30)).events
    assert rescued.id == lost.id
    assert rescued.attempts == 2
    assert await dead.mark_delivered_many([DeliveredClose(lost)], NOW) == set()  # fenced
    assert await alive.mark_delivered_many([DeliveredClose(rescued)], NOW) == {rescued.id}
    [event] = await events(pool, cert)
    assert event["status"] == "delivered"
    assert event["claimed_by"] == "alive-worker"


async def test_a_bulk_close_is_one_statement_fenced_per_event(pool: Pool) -> None:
    certs = await seed_certifications(pool, 3)
    dead = Outbox(pool, "dead-worker")
    claimed = (await dead.claim(NOW, limit=3, lease_seconds=30)).events
    alive = Outbox(pool, "alive-worker")
    # One of the three is rescued and claimed again: the dead worker's close must leave it alone.
    async with pool.connection() as conn:
        await conn.execute(
            "update public.certification_sync_events set lease_until = %s where id = %s",
            (NOW - timedelta(seconds=1), claimed[0].id),
        )
    assert await alive.rescue_expired(NOW) == 1
    [rescued] = (await alive.claim(NOW, limit=3, lease_seconds=30)).events

    closed = await dead.mark_delivered_many([DeliveredClose(e) for e in claimed], NOW)

    assert closed == {claimed[1].id, claimed[2].id}
    statuses = {c: [str(e["status"]) for e in await events(pool, c)] for c in certs}
    assert statuses[rescued.certification_id] == ["in_flight"]
    assert sorted(s for c, v in statuses.items() if c != rescued.certification_id for s in v) == [
        "delivered",
        "delivered",
    ]
    assert await dead.mark_delivered_many([], NOW) == set()


async def test_each_closed_event_keeps_its_own_detail_and_failed_calls(pool: Pool) -> None:
    certs = await seed_certifications(pool, 2)
    outbox = Outbox(pool, "worker-a")
    first, second = (await outbox.claim(NOW, limit=2, lease_seconds=30)).events
    call = {"claim": 1, "attempt": 1, "at": NOW.isoformat(), "outcome": "transient", "status": 503}

    closed = await outbox.mark_delivered_many(
        [DeliveredClose(first, [call, {**call, "attempt": 2}]), DeliveredClose(second, (), "not sent")], NOW
    )

    assert closed == {first.id, second.id}
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select id, detail, attempt_log from public.certification_sync_events"
            " where certification_id = any(%s)",
            (certs,),
        )
        rows = {r["id"]: (r["detail"], r["attempt_log"]) for r in await cur.fetchall()}
    assert rows[first.id] == (None, [call, {**call, "attempt": 2}])
    assert rows[second.id] == ("not sent", [])


class CountingOutbox(Outbox):
    """The real outbox, counting the close statements it runs (and failing the first ``fail`` of them)."""

    def __init__(self, pool: Pool, worker_id: str, *, fail: int = 0) -> None:
        super().__init__(pool, worker_id)
        self.statements: list[int] = []
        self._fail = fail

    async def mark_delivered_many(self, closes, now):  # type: ignore[no-untyped-def]
        closing = list(closes)
        self.statements.append(len(closing))
        if len(self.statements) <= self._fail:
            await asyncio.sleep(0.01)
            raise DatabaseUnavailable("connection lost while closing")
        return await super().mark_delivered_many(closing, now)


async def test_deliveries_finishing_together_share_close_statements_each_fenced(pool: Pool) -> None:
    await seed_certifications(pool, 40)
    outbox = CountingOutbox(pool, "worker-a")
    claimed = (await outbox.claim(NOW, limit=40, lease_seconds=30)).events
    # One of them was rescued and claimed by another worker: its close must answer False.
    async with pool.connection() as conn:
        await conn.execute(
            "update public.certification_sync_events set claim_token = gen_random_uuid() where id = %s",
            (claimed[7].id,),
        )
    closer = DeliveredCloser(outbox)

    answers = await asyncio.gather(*(closer.close(event, NOW) for event in claimed))

    assert answers == [event.id != claimed[7].id for event in claimed]
    # All forty asked for before the first statement could start: one statement, not forty.
    assert outbox.statements == [40]
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select count(*) from public.certification_sync_events where status = 'delivered'"
        )
        assert (await cur.fetchone() or {}).get("count") == 39


async def test_a_failed_close_statement_raises_in_every_delivery_it_carried_and_later_closes_work(
    pool: Pool,
) -> None:
    await seed_certifications(pool, 5)
    outbox = CountingOutbox(pool, "worker-a", fail=1)
    claimed = (await outbox.claim(NOW, limit=5, lease_seconds=30)).events
    closer = DeliveredCloser(outbox)

    failed = await asyncio.gather(*(closer.close(e, NOW) for e in claimed), return_exceptions=True)
    # Those of the failed statement stay in flight (as with a lost single close); a later close works.
    assert [type(answer) for answer in failed] == [DatabaseUnavailable] * 5
    assert await asyncio.gather(*(closer.close(e, NOW) for e in claimed)) == [True] * 5
    assert outbox.statements == [5, 5]


async def test_claims_handed_back_together_wait_again_without_counting_and_fenced(pool: Pool) -> None:
    certs = await seed_certifications(pool, 3)
    outbox = Outbox(pool, "worker-a")
    claimed = (await outbox.claim(NOW, limit=3, lease_seconds=30)).events
    async with pool.connection() as conn:  # one was rescued and claimed again meanwhile
        await conn.execute(
            "update public.certification_sync_events set claim_token = gen_random_uuid() where id = %s",
            (claimed[0].id,),
        )

    assert await outbox.release_many(claimed, available_at=NOW, detail="worker stopped") == 2

    rows = {c: await events(pool, c) for c in certs}
    handed_back = [r for c, [r] in rows.items() if c != claimed[0].certification_id]
    assert {(r["status"], r["attempts"], r["detail"]) for r in handed_back} == {
        ("waiting", 0, "worker stopped")
    }
    [kept] = rows[claimed[0].certification_id]
    assert kept["status"] == "in_flight"
    assert await outbox.release_many([], available_at=NOW) == 0


async def test_queueing_closes_the_event_and_writes_the_retry_row_together(pool: Pool) -> None:
    [cert] = await seed_certifications(pool, 1)
    outbox = Outbox(pool, "worker-a")
    [event] = (await outbox.claim(datetime.now(UTC), limit=1, lease_seconds=60)).events
    entry = NewRetryEntry(
        operation_type=event.operation_type,
        certification_id=cert,
        event_id=event.id,
        payload_json={"contract_version": 1},
        failure_reason="HTTP 503 Service Unavailable",
        attempt_count=4,
        status="pending",
    )
    entry_id = await outbox.mark_queued(event, NOW, entry)
    assert entry_id is not None
    assert await outbox.mark_queued(event, NOW, entry) is None  # the claim is closed: nothing written twice
    async with pool.connection() as conn:
        cur = await conn.execute("select count(*) as n from public.dynamics_sync_retry_queue")
        assert (await cur.fetchone())["n"] == 1  # type: ignore[index]
    [closed] = await events(pool, cert)
    assert closed["status"] == "queued"


async def test_release_puts_the_event_back_without_counting_the_attempt(pool: Pool) -> None:
    [_cert] = await seed_certifications(pool, 1)
    outbox = Outbox(pool, "worker-a")
    [event] = (await outbox.claim(NOW, limit=1, lease_seconds=60)).events
    assert await outbox.release(event, available_at=NOW + timedelta(seconds=5), detail="circuit open")
    assert (await outbox.claim(NOW, limit=1, lease_seconds=60)).events == ()
    [again] = (await outbox.claim(NOW + timedelta(seconds=5), limit=1, lease_seconds=60)).events
    assert again.id == event.id
    assert again.attempts == 1
    depth = await outbox.depth()
    assert (depth.waiting, depth.in_flight) == (0, 1)
