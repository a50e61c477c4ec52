"""The emergency switch (``private.lockdown``) and the cross-organisation access audit.

Scenario (``world``, tests/support/rls.py): ``coordinator_a1`` sees ``shared_mentor``, who is also in
organisation B where the coordinator holds no membership; reading that mentor's certification is a
cross-organisation read.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import errors

from certsync.store.audit import AccessAuditRecorder
from tests.support.rls import (
    Hierarchy,
    TwoOrganisations,
    acting_as,
    as_user,
    claims_for,
    ids,
    insert_certification,
    rows,
    touch_certifications,
    visible_certification_ids,
)

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]

CROSS_ORGANISATION_READS = (
    "select reader_id, certification_id, peer_mentor_id, foreign_organisation_ids, operation"
    " from private.cross_organisation_reads(now() - interval '1 day')"
)


def lockdown(superuser: Conn, table: str) -> None:
    superuser.execute("select private.lockdown(%s, 'incident drill')", (table,))


# --- emergency switch --------------------------------------------------------------------------------


def test_lockdown_denies_the_table_to_authenticated_from_the_next_statement(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert visible_certification_ids(c) == {world.cert_a1, world.cert_shared}
        lockdown(superuser, "public.certifications")
        # Same request transaction, next statement: READ COMMITTED takes a fresh snapshot.
        assert visible_certification_ids(c) == set()


def test_lockdown_denies_updates_to_authenticated(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    lockdown(superuser, "public.certifications")
    with as_user(api, world.coordinator_a1) as c:
        assert touch_certifications(c) == set()


def test_lockdown_denies_inserts_to_authenticated(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    lockdown(superuser, "public.certifications")
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        insert_certification(c, world.mentor_a1.peer_mentor_id)


def test_lockdown_leaves_other_tables_readable(superuser: Conn, api: Conn, world: TwoOrganisations) -> None:
    lockdown(superuser, "public.certifications")
    with as_user(api, world.coordinator_a1) as c:
        assert ids(c, "select id from public.chapters") == {world.chapter_a1}


def test_lockdown_leaves_service_role_unaffected(superuser: Conn, api: Conn, world: TwoOrganisations) -> None:
    lockdown(superuser, "public.certifications")
    with acting_as(api, "service_role", claims_for(None, "service_role")) as c:
        assert visible_certification_ids(c) == world.all_certifications


def test_lift_lockdown_restores_access(superuser: Conn, api: Conn, world: TwoOrganisations) -> None:
    lockdown(superuser, "public.certifications")
    superuser.execute("select private.lift_lockdown('public.certifications')")
    with as_user(api, world.coordinator_a1) as c:
        assert visible_certification_ids(c) == {world.cert_a1, world.cert_shared}


def test_authenticated_cannot_lock_a_table_down(api: Conn, world: TwoOrganisations) -> None:
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        c.execute("select private.lockdown('public.certifications', 'not yours')")


# --- access audit ------------------------------------------------------------------------------------


def enable_audit(superuser: Conn) -> None:
    superuser.execute("select private.set_access_audit(true)")


def shared_mentor_access(world: TwoOrganisations, operation: str = "read") -> tuple[Any, ...]:
    """The audit row for coordinator_a1 reading (or writing) the shared mentor's certification."""
    return (
        world.coordinator_a1,
        world.cert_shared,
        world.shared_mentor.peer_mentor_id,
        [world.organisation_b],
        operation,
    )


def recorded(superuser: Conn) -> list[tuple[Any, ...]]:
    return rows(superuser, CROSS_ORGANISATION_READS)


def test_audit_is_off_by_default_and_records_nothing(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert world.cert_shared in visible_certification_ids(c)
        touch_certifications(c, {world.cert_shared})
        insert_certification(c, world.shared_mentor.peer_mentor_id)
    assert recorded(superuser) == []


def test_audit_records_a_cross_organisation_read_and_lists_it(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with as_user(api, world.coordinator_a1) as c:
        assert visible_certification_ids(c) == {world.cert_a1, world.cert_shared}
    assert recorded(superuser) == [shared_mentor_access(world)]


def test_audit_does_not_record_a_read_within_the_readers_own_organisations(
    superuser: Conn, api: Conn, hierarchy: Hierarchy, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    coordinator_a2 = hierarchy.coordinator(world.chapter_a2)
    with as_user(api, coordinator_a2) as c:
        assert visible_certification_ids(c) == {world.cert_a2}
    assert recorded(superuser) == []


def test_audit_does_not_record_a_mentor_reading_their_own_certification(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with as_user(api, world.shared_mentor.user_id) as c:
        assert visible_certification_ids(c) == {world.cert_shared}
    assert recorded(superuser) == []


def test_audit_does_not_refuse_a_read_in_a_read_only_transaction_as_postgrest_runs_gets(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with as_user(api, world.coordinator_a1, read_only=True) as c:
        assert visible_certification_ids(c) == {world.cert_a1, world.cert_shared}


def test_audit_records_a_coordinators_update_of_a_shared_mentors_certification(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with as_user(api, world.coordinator_a1) as c:
        assert touch_certifications(c, {world.cert_shared, world.cert_a1}) == {
            world.cert_shared,
            world.cert_a1,
        }
    # An update that names its rows reads them (WHERE), and RETURNING checks the new rows against the
    # SELECT policy too: each is recorded as a read, besides the one update.
    found = recorded(superuser)
    assert [r for r in found if r[4] == "update"] == [shared_mentor_access(world, "update")]
    assert {tuple(map(str, r)) for r in found if r[4] != "update"} == {
        tuple(map(str, shared_mentor_access(world, "read")))
    }


def test_audit_records_a_coordinators_insert_of_a_shared_mentors_certification(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with as_user(api, world.coordinator_a1) as c:
        insert_certification(c, world.shared_mentor.peer_mentor_id)
        insert_certification(c, world.mentor_a1.peer_mentor_id)
    [(reader, certification, mentor, foreign, operation)] = recorded(superuser)
    assert (reader, mentor, foreign, operation) == (
        world.coordinator_a1,
        world.shared_mentor.peer_mentor_id,
        [world.organisation_b],
        "insert",
    )
    assert certification not in world.all_certifications


def test_audit_does_not_record_writes_by_the_service(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with acting_as(api, "service_role", claims_for(None, "service_role")) as c:
        touch_certifications(c)
    touch_certifications(superuser)
    assert recorded(superuser) == []


def read_only_read_notifications(superuser: Conn, api: Conn, world: TwoOrganisations) -> list[str]:
    """The audit's NOTIFY payloads after coordinator_a1 reads in a read-only transaction."""
    superuser.execute("listen certsync_access_audit")
    with as_user(api, world.coordinator_a1, read_only=True) as c:
        visible_certification_ids(c)
    # A list, not a loop over the generator: notifies() holds the connection until it ends.
    return [n.payload for n in superuser.notifies(timeout=5, stop_after=1)]


def spellings(value: UUID) -> list[str]:
    """The ways an id could be written into a text payload."""
    return [str(value), value.hex, base64.b64encode(value.bytes).decode()[:20], value.bytes.hex()]


def test_a_listener_overhears_nothing_of_who_read_what_in_a_read_only_read(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    # LISTEN needs no privilege: any session may listen. What it hears must name nobody and nothing.
    enable_audit(superuser)
    [payload] = read_only_read_notifications(superuser, api, world)
    secrets = [
        world.coordinator_a1,
        world.cert_shared,
        world.shared_mentor.peer_mentor_id,
        world.organisation_a,
        world.organisation_b,
    ]
    assert [s for value in secrets for s in spellings(value) if s.lower() in payload.lower()] == []
    assert read_only_read_notifications(superuser, api, world) != [payload]  # no two alike


def test_a_read_only_reads_notification_recorded_by_a_listener_is_listed(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    for payload in read_only_read_notifications(superuser, api, world):
        assert rows(superuser, "select private.record_access_notification(%s)", (payload,)) == [(True,)]
        # The same notification again (a replay, or the server log recovered twice) adds nothing.
        assert rows(superuser, "select private.record_access_notification(%s)", (payload,)) == [(False,)]
    assert recorded(superuser) == [shared_mentor_access(world)]


def test_authenticated_cannot_read_the_audit(api: Conn, world: TwoOrganisations) -> None:
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        c.execute(CROSS_ORGANISATION_READS)


@pytest.mark.parametrize(
    "write", ["insert into private.access_audit default values", "delete from private.access_audit"]
)
def test_authenticated_cannot_write_the_audit(api: Conn, world: TwoOrganisations, write: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        c.execute(write)


# The worker's recorder, as it runs beside the worker ---------------------------------------------------


@asynccontextmanager
async def running_recorder(
    superuser: Conn, api: Conn, world: TwoOrganisations, database_url: str
) -> AsyncIterator[AccessAuditRecorder]:
    """The recorder, started and seen recording one genuine read-only read (then forgotten)."""
    enable_audit(superuser)
    recorder = AccessAuditRecorder(database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    try:
        for _ in range(100):  # until the recorder is listening
            await asyncio.sleep(0.05)
            with as_user(api, world.coordinator_a1, read_only=True) as c:
                visible_certification_ids(c)
            if recorded(superuser):
                break
        assert recorded(superuser), "the recorder never recorded a read"
        await asyncio.sleep(1.5)  # longer than it gathers notifications for: every read sent has arrived
        superuser.execute("truncate private.access_audit")
        yield recorder
    finally:
        stop.set()
        await task


async def eventually_recorded(superuser: Conn, seconds: float = 3.0) -> list[tuple[Any, ...]]:
    for _ in range(int(seconds / 0.05)):
        if found := recorded(superuser):
            return found
        await asyncio.sleep(0.05)
    return []


async def test_the_workers_audit_recorder_persists_a_read_only_cross_organisation_read(
    superuser: Conn, api: Conn, world: TwoOrganisations, database_url: str
) -> None:
    async with running_recorder(superuser, api, world, database_url):
        with as_user(api, world.coordinator_a1, read_only=True) as c:
            visible_certification_ids(c)
        assert await eventually_recorded(superuser) == [shared_mentor_access(world)]


async def test_a_malformed_notification_does_not_stop_the_recorder(
    superuser: Conn, api: Conn, world: TwoOrganisations, database_url: str
) -> None:
    async with running_recorder(superuser, api, world, database_url):
        with as_user(api, world.coordinator_b1) as c:
            c.execute("notify certsync_access_audit, 'not even json'")
            c.execute("select pg_notify('certsync_access_audit', '{\"reader_id\": 1}')")
        # A genuine read right behind the garbage: once, the garbage dropped the listener and this was lost.
        with as_user(api, world.coordinator_a1, read_only=True) as c:
            visible_certification_ids(c)
        assert await eventually_recorded(superuser) == [shared_mentor_access(world)]


async def test_a_forged_notification_is_not_recorded(
    superuser: Conn, api: Conn, world: TwoOrganisations, database_url: str
) -> None:
    forged = json.dumps(
        {
            "reader_id": str(world.coordinator_b1),  # framing another coordinator
            "certification_id": str(world.cert_a1),
            "peer_mentor_id": str(world.mentor_a1.peer_mentor_id),
            "foreign_organisation_ids": [str(world.organisation_a)],
        }
    )
    async with running_recorder(superuser, api, world, database_url) as recorder:
        heard: list[str] = []
        superuser.execute("listen certsync_access_audit")
        with as_user(api, world.coordinator_a1, read_only=True) as c:
            visible_certification_ids(c)
        heard = [n.payload for n in superuser.notifies(timeout=5, stop_after=1)]
        with as_user(api, world.coordinator_b1) as c:
            c.execute("select pg_notify('certsync_access_audit', %s)", (forged,))
            for genuine in heard:  # a genuine notification replayed by someone who overheard it
                c.execute("select pg_notify('certsync_access_audit', %s)", (genuine,))
        await eventually_recorded(superuser)
        await asyncio.sleep(0.5)  # time for the forgery to arrive, were it to be recorded
        assert recorded(superuser) == [shared_mentor_access(world)]
        assert recorder.rejected >= 1
