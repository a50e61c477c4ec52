"""certsync in Dataverse mode (CERTSYNC_DYNAMICS_API=dataverse) against the Dataverse emulator over
loopback: the worker's PATCHes by alternate key, a delete, reconcile over the OData paging, the
table check, and an OData refusal kept in the queue with Dataverse's code."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest

from certsync.app import check_portal_contract, open_runtime
from certsync.delivery.reconcile import Reconciler
from certsync.dynamics.dataverse import STATUS_CHOICES
from certsync.sandbox import DataverseConfig, SandboxServer
from certsync.sandbox.dataverse_state import TableMetadata
from certsync.sandbox.state import DEFAULT_TOKEN
from certsync.settings import Settings
from certsync.store.reconcile import ReconcileStore
from tests.support.history import history_json
from tests.support.rls import Hierarchy
from tests.support.runtime import FAST

Conn = psycopg.Connection[Any]

pytestmark = pytest.mark.integration


@pytest.fixture
def emulator() -> Iterator[SandboxServer]:
    with SandboxServer(DataverseConfig()) as server:
        yield server


def dataverse_settings(database_url: str, emulator: SandboxServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "dynamics_api": "dataverse",
        "dynamics_base_url": emulator.url,
        "dynamics_token": DEFAULT_TOKEN,
        "log_format": "json",
        "retry_base_delay": 0.01,
        "breaker_cooldown": 0.5,
    }
    return Settings(_env_file=None, **(values | overrides))


def rows(emulator: SandboxServer) -> dict[str, dict[str, Any]]:
    return dict(emulator.dataverse.snapshot()["rows"])


async def test_the_worker_writes_each_certification_as_a_row_by_its_key_and_deletes_it(
    database_url: str, superuser: Conn, hierarchy: Hierarchy, emulator: SandboxServer
) -> None:
    """Single-request mode (CERTSYNC_DATAVERSE_BATCH_SIZE=1): one PATCH per change."""
    mentor = hierarchy.mentor(hierarchy.chapter(hierarchy.organisation()))
    kept, gone = (hierarchy.certification(mentor.peer_mentor_id) for _ in range(2))
    superuser.execute("update public.certifications set status = 'revoked' where id = %s", (kept,))
    settings = dataverse_settings(database_url, emulator, dataverse_batch_size=1)

    async with open_runtime(settings) as runtime:
        first = await runtime.worker(FAST, listen=False).run(once=True)
    held = rows(emulator)
    superuser.execute("delete from public.certifications where id = %s", (gone,))
    async with open_runtime(settings) as runtime:
        second = await runtime.worker(FAST, listen=False).run(once=True)

    assert first.delivered == 2
    row = held[str(kept)]
    assert (row["hlf_status"], row["hlf_sourceversion"], row["hlf_publiclylisted"]) == (
        STATUS_CHOICES["revoked"],
        2,
        False,
    )
    assert row["hlf_peermentorid"] == str(mentor.peer_mentor_id)
    assert second.delivered == 1
    assert set(rows(emulator)) == {str(kept)}
    methods = [(r.method, r.status) for r in emulator.dataverse.requests()]
    assert methods == [("PATCH", 204), ("PATCH", 204), ("DELETE", 204)]


async def test_reconcile_reads_the_table_through_odata_paging_and_repairs_it(
    database_url: str, hierarchy: Hierarchy, emulator: SandboxServer
) -> None:
    mentor = hierarchy.mentor(hierarchy.chapter(hierarchy.organisation()))
    certifications = sorted(str(hierarchy.certification(mentor.peer_mentor_id)) for _ in range(7))
    settings = dataverse_settings(database_url, emulator)
    async with open_runtime(settings) as runtime:
        await runtime.worker(FAST, listen=False).run(once=True)
    # Drift planted through the Web API itself: one row lost, one revoked behind certsync's back.
    api = f"{emulator.url}/api/data/v9.2/hlf_certifications"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"}) as http:
        lost = await http.delete(f"{api}(hlf_certsyncid='{certifications[2]}')")
        altered = await http.patch(
            f"{api}(hlf_certsyncid='{certifications[5]}')",
            json={"hlf_status": STATUS_CHOICES["revoked"], "hlf_publiclylisted": False},
        )
    assert (lost.status_code, altered.status_code) == (204, 204)
    before = len(emulator.dataverse.requests())

    async with open_runtime(settings) as runtime:
        reconciler = Reconciler(
            runtime.portal(),
            ReconcileStore(runtime.pool),
            clock=runtime.clock,
            today=runtime.today,
            organisation_id=None,
            page_size=3,
        )
        found = await reconciler.reconcile(repair=True, started_by="test")
        reads = [r for r in emulator.dataverse.requests()[before:] if r.method == "GET"]
        await runtime.worker(FAST, listen=False).run(once=True)
        after = await reconciler.reconcile(repair=False, started_by="test")

    assert sorted((str(m.certification_id), str(m.kind)) for m in found.mismatches) == [
        (certifications[2], "missing"),
        (certifications[5], "stale"),
    ]
    assert len(reads) == 2  # 6 rows, 3 per page: the first page's @odata.nextLink, then none
    assert after.agreed
    assert rows(emulator)[certifications[5]]["hlf_status"] == STATUS_CHOICES["active"]


async def test_contract_check_names_what_the_table_lacks(emulator: SandboxServer) -> None:
    good = await check_portal_contract(dataverse_settings("postgresql://unused", emulator))
    assert good.accepted, good.problems

    pending_key = TableMetadata(key_status="Pending")
    with SandboxServer(DataverseConfig(metadata=pending_key)) as other:
        bad = await check_portal_contract(dataverse_settings("postgresql://unused", other))

    assert bad.accepted is False
    assert bad.problems == ("the alternate key on hlf_certsyncid is Pending, not Active",)


async def test_a_refused_row_is_kept_for_investigation_with_dataverses_code(
    database_url: str, hierarchy: Hierarchy
) -> None:
    mentor = hierarchy.mentor(hierarchy.chapter(hierarchy.organisation()))
    refused, fine = (hierarchy.certification(mentor.peer_mentor_id) for _ in range(2))
    with SandboxServer(DataverseConfig(refused=(str(refused),))) as emulator:
        async with open_runtime(dataverse_settings(database_url, emulator)) as runtime:
            stats = await runtime.worker(FAST, listen=False).run(once=True)
            [entry] = await runtime.queue.list_entries()
        held = rows(emulator)

    assert (stats.delivered, stats.queued_investigation) == (1, 1)
    assert set(held) == {str(fine)}
    assert entry.status == "requires_investigation"
    assert entry.failure_reason.startswith("HTTP 400 Bad Request: 0x")


async def test_due_changes_go_in_bulk_and_a_refused_row_is_isolated(
    database_url: str, superuser: Conn, hierarchy: Hierarchy
) -> None:
    """250 due changes with CERTSYNC_DATAVERSE_BATCH_SIZE=100: UpsertMultiple calls of at most 100
    targets, one certification per target; one row refused by a plug-in fails its call whole, the
    batch is split until it stands alone, and it is the only one left for investigation."""
    mentor = hierarchy.mentor(hierarchy.chapter(hierarchy.organisation()))
    superuser.execute(
        "insert into public.certifications (peer_mentor_id, valid_from, valid_until)"
        " select %s, date '2026-01-01', date '2027-12-31' from generate_series(1, 250)",
        (mentor.peer_mentor_id,),
    )
    ids = sorted(str(r[0]) for r in superuser.execute("select id from public.certifications").fetchall())
    refused = ids[123]
    with SandboxServer(DataverseConfig(refused=(refused,))) as emulator:
        settings = dataverse_settings(database_url, emulator, dataverse_batch_size=100)
        async with open_runtime(settings) as runtime:
            stats = await runtime.worker(FAST, listen=False).run(once=True)
            [entry] = await runtime.queue.list_entries()
        held = rows(emulator)
        calls = emulator.dataverse.requests()

    assert (stats.delivered, stats.queued_investigation, stats.crashed) == (249, 1, 0)
    assert set(held) == set(ids) - {refused}
    assert (entry.certification_id, entry.status) == (UUID(refused), "requires_investigation")
    bulk = [c for c in calls if c.method == "POST"]
    assert bulk, "no UpsertMultiple was made"
    assert max(c.targets or 0 for c in bulk) == 100
    # Far fewer calls than changes: three full calls, and the splits around the refused row.
    assert len(calls) < 30
    statuses = superuser.execute(
        "select status, count(*) from public.certification_sync_events group by status order by 1"
    ).fetchall()
    assert statuses == [("delivered", 249), ("queued", 1)]

    # The refused row's history names every call that carried it and what Dataverse answered: each
    # refused bulk call, halving, down to its own PATCH.
    [change] = (await history_json(database_url, refused))["changes"]
    calls_made = [(a["outcome"], a["status"], a["targets"]) for a in change["attempts"]]
    first = calls_made[0][2]
    assert first in (100, 50), calls_made  # the batch it was claimed in
    assert calls_made[-1] == ("refused", 400, None)  # alone at last: a single PATCH
    targets = [n for _, _, n in calls_made[:-1]]
    assert {(outcome, status) for outcome, status, _ in calls_made} == {("refused", 400)}
    assert targets == sorted(targets, reverse=True)
    assert targets[-1] <= 3
    # Every other row of its first call was delivered, and keeps that refused call in its history.
    carried = superuser.execute(
        "select count(*) from public.certification_sync_events"
        " where status = 'delivered' and attempt_log @> %s::jsonb",
        (f'[{{"outcome": "refused", "targets": {first}}}]',),
    ).fetchone()
    assert carried == (first - 1,)
