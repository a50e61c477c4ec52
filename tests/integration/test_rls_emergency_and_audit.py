"""The emergency switch (``private.lockdown``) and the cross-organisation access audit.

Scenario (``world``, tests/support/rls.py): ``coordinator_a1`` sees ``shared_mentor``, who is also in
organisation B where the coordinator holds no membership; reading that mentor's certification is a
cross-organisation read.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

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
    "select reader_id, certification_id, peer_mentor_id, foreign_organisation_ids"
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


def shared_mentor_read(world: TwoOrganisations) -> tuple[Any, ...]:
    """The audit row for coordinator_a1 reading the shared mentor's certification."""
    return (
        world.coordinator_a1,
        world.cert_shared,
        world.shared_mentor.peer_mentor_id,
        [world.organisation_b],
    )


def test_audit_is_off_by_default_and_records_nothing(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert world.cert_shared in visible_certification_ids(c)
    assert rows(superuser, CROSS_ORGANISATION_READS) == []


def test_audit_records_a_cross_organisation_read_and_lists_it(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with as_user(api, world.coordinator_a1) as c:
        assert visible_certification_ids(c) == {world.cert_a1, world.cert_shared}
    assert rows(superuser, CROSS_ORGANISATION_READS) == [shared_mentor_read(world)]


def test_audit_does_not_record_a_read_within_the_readers_own_organisations(
    superuser: Conn, api: Conn, hierarchy: Hierarchy, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    coordinator_a2 = hierarchy.coordinator(world.chapter_a2)
    with as_user(api, coordinator_a2) as c:
        assert visible_certification_ids(c) == {world.cert_a2}
    assert rows(superuser, CROSS_ORGANISATION_READS) == []


def test_audit_does_not_record_a_mentor_reading_their_own_certification(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with as_user(api, world.shared_mentor.user_id) as c:
        assert visible_certification_ids(c) == {world.cert_shared}
    assert rows(superuser, CROSS_ORGANISATION_READS) == []


def test_audit_does_not_refuse_a_read_in_a_read_only_transaction_as_postgrest_runs_gets(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    with as_user(api, world.coordinator_a1, read_only=True) as c:
        assert visible_certification_ids(c) == {world.cert_a1, world.cert_shared}


def read_only_read_notifications(superuser: Conn, api: Conn, world: TwoOrganisations) -> list[str]:
    """The audit's NOTIFY payloads after coordinator_a1 reads in a read-only transaction."""
    superuser.execute("listen certsync_access_audit")
    with as_user(api, world.coordinator_a1, read_only=True) as c:
        visible_certification_ids(c)
    # A list, not a loop over the generator: notifies() holds the connection until it ends.
    return [n.payload for n in superuser.notifies(timeout=5, stop_after=1)]


def test_audit_in_a_read_only_transaction_notifies_listeners_of_the_cross_organisation_read(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    payloads = [json.loads(p) for p in read_only_read_notifications(superuser, api, world)]
    assert payloads == [
        {
            "reader_id": str(world.coordinator_a1),
            "certification_id": str(world.cert_shared),
            "peer_mentor_id": str(world.shared_mentor.peer_mentor_id),
            "foreign_organisation_ids": [str(world.organisation_b)],
        }
    ]


def test_a_read_only_reads_notification_recorded_by_a_listener_is_listed(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    enable_audit(superuser)
    for payload in read_only_read_notifications(superuser, api, world):
        superuser.execute("select private.record_cross_organisation_read(%s)", (payload,))
    assert rows(superuser, CROSS_ORGANISATION_READS) == [shared_mentor_read(world)]


def test_authenticated_cannot_read_the_audit(api: Conn, world: TwoOrganisations) -> None:
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        c.execute(CROSS_ORGANISATION_READS)


async def test_the_workers_audit_recorder_persists_a_read_only_cross_organisation_read(
    superuser: Conn, api: Conn, world: TwoOrganisations, database_url: str
) -> None:
    enable_audit(superuser)
    recorder = AccessAuditRecorder(database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    try:
        for _ in range(100):  # until the recorder is listening
            await asyncio.sleep(0.05)
            with as_user(api, world.coordinator_a1, read_only=True) as c:
                visible_certification_ids(c)
            if recorder.recorded:
                break
    finally:
        stop.set()
        await task
    assert rows(superuser, CROSS_ORGANISATION_READS)[0] == shared_mentor_read(world)
