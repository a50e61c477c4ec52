"""Malformed data in the database: refused where the schema can refuse it, otherwise reported and kept —
never a crashed worker, never a dropped event.

- A renewal history that is not a JSON array cannot exist: ``certifications.renewal_history`` has
  ``check (jsonb_typeof(renewal_history) = 'array')``, so every write of one is refused by PostgreSQL
  (whoever writes it: the app, the dashboard, plain SQL) and the transaction, with its outbox event,
  rolls back. The tests prove the constraint refuses each non-array kind.
- A renewal entry without ``schema_version`` (written by hand): the change still flows to the portal
  (renewal history is not part of contract v1); reading the certification names the bad entry.
- An outbox event whose stored state no longer fits contract v1 is history only: what is sent is the
  certification as the database holds it when it is sent, so the change is delivered anyway; a
  retry-queue entry whose payload is not even an object is replayed the same way (its certification
  gone: a DELETE), never from the payload.
"""

from __future__ import annotations

import json
import uuid
from typing import cast

import psycopg
import pytest

from certsync.app import open_runtime
from certsync.domain.certification import InvalidRenewalEntry
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from tests.faults.conftest import assert_every_event_has_a_home, seed_mentors, table_checksums
from tests.support.runtime import FAST, settings_for
from tests.support.seed import outbox_statuses, rules_disabled

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("not_an_array", ['{"schema_version": 1}', '"renewed"', "1", "true", "null"])
async def test_the_schema_refuses_a_renewal_history_that_is_not_an_array(
    pool: Pool, database_url: str, not_an_array: str
) -> None:
    [certification] = await seed_mentors(pool, mentors=1)
    before = table_checksums(database_url)
    with (
        pytest.raises((psycopg.errors.CheckViolation, psycopg.errors.NotNullViolation)),
        psycopg.connect(database_url) as conn,
    ):
        conn.execute(
            "update public.certifications set renewal_history = %s::jsonb where id = %s",
            (not_an_array, certification),
        )
    assert table_checksums(database_url) == before, "refused with its outbox event: nothing written"


async def test_a_renewal_entry_without_schema_version_is_reported_on_read_kept_and_its_change_delivered(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    [certification] = await seed_mentors(pool, mentors=1)
    entry = {"renewed_at": "2026-01-01T00:00:00Z", "new_valid_until": "2099-06-01"}
    # Planted as a hand-edit would have left it before the rules existed (the documented repair path).
    async with pool.connection() as conn, rules_disabled(conn):
        await conn.execute(
            "update public.certifications set renewal_history = %s where id = %s",
            (json.dumps([entry]), certification),
        )

    async with open_runtime(settings_for(database_url, sandbox)) as runtime:
        stats = await runtime.worker(FAST, listen=False).run(once=True)
        with pytest.raises(InvalidRenewalEntry, match="schema_version"):
            await runtime.certifications().get(certification)

    assert (stats.delivered, stats.crashed) == (1, 0), "the change itself reaches the portal"
    assert await outbox_statuses(pool) == {"delivered": 1, "superseded": 1}
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select renewal_history from public.certifications where id = %s", (certification,)
        )
        assert (await cur.fetchone()) == {"renewal_history": [entry]}, "kept as written, for a person to fix"


@pytest.mark.parametrize(
    "breakage",
    [
        'state || \'{"status": "archived"}\'',
        "state - 'version'",
        'state || \'{"valid_until": "someday"}\'',
        "'\"not an object\"'::jsonb",
    ],
    ids=["unknown status", "no version", "not a date", "not an object"],
)
async def test_an_outbox_event_whose_state_no_longer_fits_is_delivered_from_the_database_state(
    pool: Pool, database_url: str, sandbox: SandboxServer, breakage: str
) -> None:
    [broken, *fine] = await seed_mentors(pool, mentors=4)
    # Written by hand, as a bad migration or a manual fix might: the newest event of one certification.
    async with pool.connection() as conn:
        cur = await conn.execute(
            "insert into public.certification_sync_events"
            " (certification_id, certification_version, operation_type, state)"
            f" select certification_id, certification_version + 1, operation_type, {breakage}"
            " from public.certification_sync_events where certification_id = %s returning id",
            (broken,),
        )
        row = await cur.fetchone()
        assert row is not None
        cur = await conn.execute(
            "select private.certification_sync_state(c) as state from public.certifications c where id = %s",
            (broken,),
        )
        truth = await cur.fetchone()
        assert truth is not None

    async with open_runtime(settings_for(database_url, sandbox)) as runtime:
        stats = await runtime.worker(FAST, listen=False).run(once=True)
        entries = await runtime.queue.list_entries()

    assert (stats.delivered, stats.queued_investigation, stats.crashed) == (len(fine) + 1, 0, 0)
    assert entries == []
    held = sandbox.sandbox.snapshot()["certifications"][str(broken)]["certification"]
    assert held == json.loads(json.dumps(truth["state"], default=str))
    await assert_every_event_has_a_home(pool)


async def test_replaying_an_entry_whose_payload_is_not_an_object_and_whose_certification_is_gone_deletes(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "insert into public.dynamics_sync_retry_queue"
            " (operation_type, certification_id, payload_json, failure_reason)"
            " values ('certification.status_changed', %s, '[\"not\", \"an\", \"object\"]', 'HTTP 503')"
            " returning id",
            (uuid.uuid4(),),
        )
        row = await cur.fetchone()
        assert row is not None
        entry_id = cast(int, row["id"])

    async with open_runtime(settings_for(database_url, sandbox)) as runtime:
        result = await runtime.replay_service().replay(entry_id, by="fault-suite")
        entry = await runtime.queue.get(entry_id)

    # Nothing is read from the payload: the certification is gone, so the replay is its DELETE.
    assert result.status == "replayed"
    assert entry.status == "replayed"
    assert entry.payload_json["operation"] == "delete"
    assert [(r.method, r.status) for r in sandbox.sandbox.requests()] == [("DELETE", 404)]
