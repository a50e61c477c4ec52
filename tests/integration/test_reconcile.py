"""``certsync reconcile`` end to end: drift planted in the real sandbox or the real database (triggers
bypassed, so no outbox event tells the worker), found exactly, repaired through the outbox and the
worker, and the worker's own periodic reconcile."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from certsync.app import open_runtime
from certsync.delivery.status import read_system_status
from certsync.metrics import SystemStatusCollector
from certsync.sandbox.faults import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from certsync.store.reconcile import ReconcileStore
from tests.support.cli import UNREACHABLE_DATABASE, assert_one_line_error, certsync, cli_env
from tests.support.runtime import FAST, settings_for, wait_until
from tests.support.seed import seed_certifications

pytestmark = pytest.mark.integration

NO_MISMATCHES = {"listed_but_should_not_be": 0, "unknown_to_database": 0, "missing": 0, "stale": 0}


async def delivered(pool: Pool, sandbox: SandboxServer, database_url: str, count: int = 3) -> list[UUID]:
    """``count`` certifications, delivered: portal and database agree."""
    ids = await seed_certifications(pool, count)
    result = await certsync("worker", "--once", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output
    assert len(sandbox.sandbox.snapshot()["certifications"]) == count
    return ids


async def behind_the_outbox(pool: Pool, sql: str, params: dict[str, Any]) -> None:
    """Change the database with every trigger bypassed: no version bump, no outbox event (drift)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        await conn.execute(sql, params)


async def reconcile(
    database_url: str, sandbox: SandboxServer, *args: str, **env: str
) -> tuple[int, dict[str, Any]]:
    result = await certsync("reconcile", "--json", *args, env=cli_env(database_url, sandbox.url, **env))
    assert result.exit_code in (0, 3), result.output
    return result.exit_code, json.loads(result.stdout)


async def repair_and_deliver(database_url: str, sandbox: SandboxServer) -> None:
    code, _ = await reconcile(database_url, sandbox, "--repair")
    assert code == 3
    result = await certsync("worker", "--once", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output


async def open_repair_events(pool: Pool) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select certification_id, certification_version, state from public.certification_sync_events"
            " where operation_type = 'certification.repaired' and status = 'waiting'"
        )
        return [dict(r) for r in await cur.fetchall()]


def only(report: dict[str, Any]) -> dict[str, Any]:
    assert len(report["mismatches"]) == 1, report
    return cast(dict[str, Any], report["mismatches"][0])


# agreement and each kind ------------------------------------------------------------------------------


async def test_a_delivered_database_and_its_portal_agree(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    await delivered(pool, sandbox, database_url)
    code, report = await reconcile(database_url, sandbox)
    assert code == 0
    assert report == {"mismatches": [], "counts": NO_MISMATCHES, "in_transit": 0}


async def test_the_text_output_is_one_line_per_mismatch_then_the_counts(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    sandbox.sandbox.delete(str(ids[0]))
    result = await certsync("reconcile", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 3, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{ids[0]} missing"
    assert lines[1].split() == [
        "listed_but_should_not_be:",
        "0",
        "unknown_to_database:",
        "0",
        "missing:",
        "1",
        "stale:",
        "0",
    ]


async def test_missing_is_found_exactly_and_repaired(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    sandbox.sandbox.delete(str(ids[1]))

    code, report = await reconcile(database_url, sandbox)
    assert code == 3
    assert only(report) == {
        "certification_id": str(ids[1]),
        "kind": "missing",
        "portal_version": None,
        "database_version": 1,
    }
    assert report["counts"] == NO_MISMATCHES | {"missing": 1}
    assert await open_repair_events(pool) == []  # without --repair nothing is queued

    code, _ = await reconcile(database_url, sandbox, "--repair")
    assert code == 3
    [event] = await open_repair_events(pool)
    assert (event["certification_id"], event["certification_version"]) == (ids[1], 1)
    assert event["state"]["id"] == str(ids[1])
    assert event["state"]["status"] == "active"
    result = await certsync("worker", "--once", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output

    assert await reconcile(database_url, sandbox) == (
        0,
        {"mismatches": [], "counts": NO_MISMATCHES, "in_transit": 0},
    )


async def test_stale_is_found_exactly_and_repaired(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    # The portal shows it suspended and unlisted; the database (same version) says active and listed.
    held = sandbox.sandbox.snapshot()["certifications"][str(ids[2])]
    sandbox.sandbox.plant(
        {**held, "publicly_listed": False, "certification": {**held["certification"], "status": "suspended"}}
    )

    code, report = await reconcile(database_url, sandbox)
    assert code == 3
    assert only(report) == {
        "certification_id": str(ids[2]),
        "kind": "stale",
        "portal_version": 1,
        "database_version": 1,
    }

    await repair_and_deliver(database_url, sandbox)
    repaired = sandbox.sandbox.snapshot()["certifications"][str(ids[2])]
    assert (repaired["certification"]["status"], repaired["publicly_listed"]) == ("active", True)
    assert (await reconcile(database_url, sandbox))[0] == 0


async def test_an_older_version_alone_is_stale(pool: Pool, sandbox: SandboxServer, database_url: str) -> None:
    ids = await delivered(pool, sandbox, database_url)
    await behind_the_outbox(
        pool, "update public.certifications set version = 5 where id = %(id)s", {"id": ids[0]}
    )
    code, report = await reconcile(database_url, sandbox)
    assert code == 3
    assert only(report) == {
        "certification_id": str(ids[0]),
        "kind": "stale",
        "portal_version": 1,
        "database_version": 5,
    }


async def test_listed_but_should_not_be_is_found_exactly_and_repaired(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    await behind_the_outbox(
        pool,
        "update public.certifications set status = 'suspended', version = 2 where id = %(id)s",
        {"id": ids[0]},
    )

    code, report = await reconcile(database_url, sandbox)
    assert code == 3
    assert only(report) == {
        "certification_id": str(ids[0]),
        "kind": "listed_but_should_not_be",
        "portal_version": 1,
        "database_version": 2,
    }

    await repair_and_deliver(database_url, sandbox)
    assert sandbox.sandbox.snapshot()["certifications"][str(ids[0])]["publicly_listed"] is False
    assert (await reconcile(database_url, sandbox))[0] == 0


async def test_a_certification_deleted_behind_the_outbox_is_listed_but_should_not_be(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    await behind_the_outbox(pool, "delete from public.certifications where id = %(id)s", {"id": ids[0]})

    code, report = await reconcile(database_url, sandbox)
    assert code == 3
    assert only(report) == {
        "certification_id": str(ids[0]),
        "kind": "listed_but_should_not_be",
        "portal_version": 1,
        "database_version": None,
    }
    code, _ = await reconcile(database_url, sandbox, "--repair")
    assert code == 3
    [event] = await open_repair_events(pool)
    assert event["state"] == {"id": str(ids[0]), "version": 1, "deleted": True}
    result = await certsync("worker", "--once", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output

    # A repaired event of a certification the database lacks is a DELETE.
    assert str(ids[0]) not in sandbox.sandbox.snapshot()["certifications"]
    assert (await reconcile(database_url, sandbox))[0] == 0


async def test_unknown_to_database_is_found_exactly_and_repaired(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    await delivered(pool, sandbox, database_url)
    stranger = uuid.uuid4()
    sandbox.sandbox.plant(
        {
            "contract_version": 1,
            "event_id": str(uuid.uuid4()),
            "occurred_at": "2026-11-29T10:00:00Z",
            "certification": {
                "id": str(stranger),
                "peer_mentor_id": str(uuid.uuid4()),
                "certification_type": "peer_mentor",
                "status": "expired",
                "valid_from": "2024-01-01",
                "valid_until": "2025-01-01",
                "version": 4,
            },
            "publicly_listed": False,
        }
    )

    code, report = await reconcile(database_url, sandbox)
    assert code == 3
    assert only(report) == {
        "certification_id": str(stranger),
        "kind": "unknown_to_database",
        "portal_version": 4,
        "database_version": None,
    }
    code, _ = await reconcile(database_url, sandbox, "--repair")
    assert code == 3
    [event] = await open_repair_events(pool)
    assert (event["certification_id"], event["certification_version"]) == (stranger, 4)
    assert event["state"] == {"id": str(stranger), "version": 4, "deleted": True}
    result = await certsync("worker", "--once", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output

    assert str(stranger) not in sandbox.sandbox.snapshot()["certifications"]
    assert (await reconcile(database_url, sandbox))[0] == 0


async def test_outside_the_organisation_scope_what_the_portal_holds_is_not_the_databases(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url, count=2)
    async with pool.connection() as conn:
        cur = await conn.execute("insert into public.organisations (name) values ('Elsewhere') returning id")
        row = await cur.fetchone()
        assert row is not None
        elsewhere = str(row["id"])

    code, report = await reconcile(database_url, sandbox, CERTSYNC_DYNAMICS_ORGANISATION_ID=elsewhere)
    assert code == 3
    assert sorted((m["certification_id"], m["kind"]) for m in report["mismatches"]) == sorted(
        (str(i), "listed_but_should_not_be") for i in ids
    )
    # Without a scope every organisation's mentors are this portal's: they agree.
    assert (await reconcile(database_url, sandbox))[0] == 0


# what is not a mismatch ----------------------------------------------------------------------------------


async def test_a_change_still_in_the_outbox_is_in_transit_not_a_mismatch(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    async with pool.connection() as conn:  # captured, not yet delivered
        await conn.execute("update public.certifications set status = 'suspended' where id = %s", (ids[0],))
    await seed_certifications(pool, 1)  # created, not yet delivered: the portal lacks it

    code, report = await reconcile(database_url, sandbox)
    assert code == 0
    assert report == {"mismatches": [], "counts": NO_MISMATCHES, "in_transit": 2}


async def test_a_delete_in_transit_is_not_reported(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    async with pool.connection() as conn:  # captured: a certification.deleted event waits
        await conn.execute("delete from public.certifications where id = %s", (ids[0],))
    code, report = await reconcile(database_url, sandbox)
    assert (code, report["in_transit"], report["mismatches"]) == (0, 1, [])


# failures ------------------------------------------------------------------------------------------------


async def test_an_unreachable_portal_exits_1_with_one_line_and_the_run_is_recorded_failed(
    pool: Pool, database_url: str
) -> None:
    # The request's own warning is a log line (stderr too); the operator's answer is one line.
    env = cli_env(database_url, "http://127.0.0.1:1", CERTSYNC_HTTP_TIMEOUT="2", CERTSYNC_LOG_LEVEL="error")
    result = await certsync("reconcile", "--json", env=env)
    assert result.exit_code == 1
    assert_one_line_error(result)
    assert result.stdout == ""
    async with pool.connection() as conn:
        cur = await conn.execute("select outcome, error, finished_at from public.reconcile_runs")
        [run] = await cur.fetchall()
    assert run["outcome"] == "failed"
    assert run["error"]
    assert run["finished_at"] is not None


async def test_an_unreachable_database_exits_1_with_one_line(sandbox: SandboxServer) -> None:
    result = await certsync("reconcile", "--json", env=cli_env(UNREACHABLE_DATABASE, sandbox.url))
    assert result.exit_code == 1
    assert_one_line_error(result)
    assert "database" in result.stderr
    assert sandbox.sandbox.requests() == []


# the record, the metrics -------------------------------------------------------------------------------


async def test_each_run_is_recorded_with_its_mismatches_and_the_metrics_report_the_last(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    sandbox.sandbox.delete(str(ids[0]))
    await reconcile(database_url, sandbox, "--repair")

    async with pool.connection() as conn:
        cur = await conn.execute(
            "select r.outcome, r.counts, r.repaired, r.scheduled, m.certification_id, m.kind,"
            " m.portal_version, m.database_version"
            " from public.reconcile_runs r join public.reconcile_mismatches m on m.run_id = r.id"
        )
        [row] = await cur.fetchall()
    assert (row["outcome"], row["repaired"], row["scheduled"]) == ("mismatches", 1, False)
    assert row["counts"] == NO_MISMATCHES | {"missing": 1}
    assert (row["certification_id"], row["kind"], row["portal_version"], row["database_version"]) == (
        ids[0],
        "missing",
        None,
        1,
    )

    async with open_runtime(settings_for(database_url, sandbox)) as rt:
        status = await read_system_status(rt.pool, rt.breaker, rt.clock.now())
    registry = CollectorRegistry()
    registry.register(SystemStatusCollector(lambda: status))
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert found[("certsync_reconcile_mismatches", (("kind", "missing"),))] == 1
    assert found[("certsync_reconcile_mismatches", (("kind", "stale"),))] == 0
    assert status.last_reconcile is not None
    assert found[("certsync_reconcile_last_finished_timestamp_seconds", ())] == (
        status.last_reconcile.finished_at.timestamp()
    )


async def test_only_the_last_twenty_runs_keep_their_mismatches(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url, count=1)
    sandbox.sandbox.delete(str(ids[0]))
    for _ in range(22):
        await reconcile(database_url, sandbox)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select (select count(*) from public.reconcile_runs) as runs,"
            " (select count(distinct run_id) from public.reconcile_mismatches) as with_mismatches"
        )
        counts = await cur.fetchone()
    assert counts is not None
    assert (counts["runs"], counts["with_mismatches"]) == (22, 20)


# the worker's own reconcile ----------------------------------------------------------------------------


async def test_one_scheduled_run_per_interval_however_many_workers_claim(pool: Pool) -> None:
    store = ReconcileStore(pool)
    start = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)

    async def claim(at: datetime, who: str) -> UUID | None:
        return await store.claim_scheduled_run(at, interval_seconds=600, started_by=who)

    first = await asyncio.gather(*(claim(start, f"worker {n}") for n in range(5)))
    assert sum(run is not None for run in first) == 1
    assert await claim(start + timedelta(seconds=599), "worker 0") is None
    # An operator's run does not use up the workers' interval.
    await store.start_run(start + timedelta(seconds=599), started_by="cli test")
    assert await claim(start + timedelta(seconds=600), "worker 1") is not None


async def test_a_running_worker_reconciles_by_itself_and_repairs_what_it_finds(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    sandbox.sandbox.delete(str(ids[0]))
    settings = settings_for(database_url, sandbox, reconcile_interval_seconds=1.0)

    async with open_runtime(settings) as rt:
        worker = rt.worker(FAST, reconcile=True)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            await wait_until(
                lambda: str(ids[0]) in sandbox.sandbox.snapshot()["certifications"], "the repair delivered"
            )
        finally:
            stop.set()
            await running

    async with pool.connection() as conn:
        cur = await conn.execute(
            "select outcome, repaired, started_by from public.reconcile_runs"
            " where scheduled order by started_at"
        )
        runs = await cur.fetchall()
    assert runs[0]["outcome"] == "mismatches"
    assert runs[0]["repaired"] == 1
    assert str(runs[0]["started_by"]).startswith("worker ")


async def test_worker_once_does_not_reconcile(pool: Pool, sandbox: SandboxServer, database_url: str) -> None:
    ids = await delivered(pool, sandbox, database_url)
    sandbox.sandbox.delete(str(ids[0]))
    result = await certsync(
        "worker", "--once", env=cli_env(database_url, sandbox.url, CERTSYNC_RECONCILE_INTERVAL_SECONDS="1")
    )
    assert result.exit_code == 0, result.output
    async with pool.connection() as conn:
        cur = await conn.execute("select count(*) as n from public.reconcile_runs")
        row = await cur.fetchone()
    assert row is not None
    assert row["n"] == 0
    assert str(ids[0]) not in sandbox.sandbox.snapshot()["certifications"]


async def test_a_failed_periodic_reconcile_is_tried_again_next_interval_and_never_stops_the_worker(
    pool: Pool, sandbox: SandboxServer, database_url: str
) -> None:
    ids = await delivered(pool, sandbox, database_url)
    sandbox.sandbox.delete(str(ids[0]))
    # Nothing waits to be delivered, so the first request the worker makes is its reconcile's listing.
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503),)))
    settings = settings_for(database_url, sandbox, reconcile_interval_seconds=1.0)

    async with open_runtime(settings) as rt:
        worker = rt.worker(FAST, reconcile=True)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            await wait_until(
                lambda: str(ids[0]) in sandbox.sandbox.snapshot()["certifications"], "the second run's repair"
            )
            assert not running.done()
        finally:
            stop.set()
            await running

    async with pool.connection() as conn:
        cur = await conn.execute(
            "select outcome, error from public.reconcile_runs where scheduled order by started_at"
        )
        runs = await cur.fetchall()
    assert runs[0]["outcome"] == "failed"
    assert "503" in str(runs[0]["error"])
    assert runs[1]["outcome"] == "mismatches"
