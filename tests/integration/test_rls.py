"""Row-level security, case by case: who sees and changes which rows, acting as PostgREST does.

Each request is one transaction with ``set local role`` and ``request.jwt.claims`` (tests/support/rls.py).
The scenario (``world``): organisations A (chapters a1, a2) and B (chapter b1), a coordinator of a1 and
one of b1, a mentor in each chapter, and a shared mentor in both a1 and b1.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.support.rls import (
    Hierarchy,
    TwoOrganisations,
    acting_as,
    as_user,
    claims_for,
    ids,
    insert_certification,
    touch_certifications,
    visible_certification_ids,
)

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]

DIRECTORY_TABLES = [
    "public.organisations",
    "public.chapters",
    "public.chapter_memberships",
    "public.peer_mentors",
    "public.certifications",
]


# --- anon and claims without a user ----------------------------------------------------------------


@pytest.mark.parametrize("table", [*DIRECTORY_TABLES, "public.dynamics_sync_retry_queue"])
def test_anon_is_refused_with_42501_because_it_holds_no_table_privilege(
    api: Conn, world: TwoOrganisations, table: str
) -> None:
    # 42501, not 0 rows: the migration revokes every privilege from anon, so PostgreSQL refuses the
    # statement before RLS is consulted (PostgREST answers 401). RLS would still filter; see below.
    with pytest.raises(errors.InsufficientPrivilege), acting_as(api, "anon") as c:
        c.execute(f"select * from {table}")


def test_anon_would_see_no_rows_even_if_granted_select_because_no_policy_admits_it(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    superuser.execute("grant select on public.certifications to anon")
    with acting_as(api, "anon") as c:
        assert visible_certification_ids(c) == set()


@pytest.mark.parametrize("table", DIRECTORY_TABLES)
def test_authenticated_without_a_sub_claim_sees_no_rows(
    api: Conn, world: TwoOrganisations, table: str
) -> None:
    with acting_as(api, "authenticated", claims_for(None)) as c:
        assert c.execute(f"select * from {table}").fetchall() == []


def test_authenticated_cannot_read_the_retry_queue(api: Conn, world: TwoOrganisations) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege),
        as_user(api, world.coordinator_a1) as c,
    ):
        c.execute("select * from public.dynamics_sync_retry_queue")


# --- peer mentors ------------------------------------------------------------------------------------


def test_peer_mentor_sees_only_their_own_certifications(api: Conn, world: TwoOrganisations) -> None:
    with as_user(api, world.shared_mentor.user_id) as c:
        assert visible_certification_ids(c) == {world.cert_shared}


def test_peer_mentor_sees_only_their_own_peer_mentor_row(api: Conn, world: TwoOrganisations) -> None:
    with as_user(api, world.mentor_a1.user_id) as c:
        assert ids(c, "select id from public.peer_mentors") == {world.mentor_a1.peer_mentor_id}


def test_peer_mentor_cannot_update_their_own_certification(api: Conn, world: TwoOrganisations) -> None:
    # 0 rows, not an error: the UPDATE policy's USING hides the row from the update.
    with as_user(api, world.mentor_a1.user_id) as c:
        assert touch_certifications(c) == set()


def test_peer_mentor_cannot_insert_a_certification_for_themselves(api: Conn, world: TwoOrganisations) -> None:
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.mentor_a1.user_id) as c:
        insert_certification(c, world.mentor_a1.peer_mentor_id)


# --- coordinators: reads ---------------------------------------------------------------------------


def test_coordinator_sees_their_chapters_mentors_including_one_also_in_another_organisation(
    api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert visible_certification_ids(c) == {world.cert_a1, world.cert_shared}


def test_coordinator_does_not_see_the_other_organisations_mentors(api: Conn, world: TwoOrganisations) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert world.cert_b1 not in visible_certification_ids(c)
        assert world.mentor_b1.peer_mentor_id not in ids(c, "select id from public.peer_mentors")


def test_coordinator_does_not_see_mentors_of_another_chapter_of_their_organisation(
    api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert world.cert_a2 not in visible_certification_ids(c)


def test_coordinator_sees_only_their_own_chapter_and_organisation_not_those_of_a_shared_mentor(
    api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert ids(c, "select id from public.chapters") == {world.chapter_a1}
        assert ids(c, "select id from public.organisations") == {world.organisation_a}


def test_coordinator_sees_memberships_of_their_chapter_only_not_a_shared_mentors_other_ones(
    api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        rows = c.execute("select user_id, chapter_id from public.chapter_memberships").fetchall()
    assert set(rows) == {
        (world.coordinator_a1, world.chapter_a1),
        (world.mentor_a1.user_id, world.chapter_a1),
        (world.shared_mentor.user_id, world.chapter_a1),
    }


def test_coordinator_of_two_organisations_sees_both(
    api: Conn, hierarchy: Hierarchy, world: TwoOrganisations
) -> None:
    coordinator = hierarchy.coordinator(world.chapter_a2, world.chapter_b1)
    with as_user(api, coordinator) as c:
        assert visible_certification_ids(c) == {world.cert_a2, world.cert_b1, world.cert_shared}
        assert ids(c, "select id from public.organisations") == {world.organisation_a, world.organisation_b}


# --- coordinators: writes --------------------------------------------------------------------------


def test_coordinator_can_update_and_insert_certifications_of_their_chapters_mentors(
    api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert touch_certifications(c) == {world.cert_a1, world.cert_shared}
        insert_certification(c, world.shared_mentor.peer_mentor_id)


def test_coordinator_cannot_update_a_certification_of_a_mentor_outside_their_chapters(
    api: Conn, world: TwoOrganisations
) -> None:
    # 0 rows: rows outside the UPDATE policy's USING are invisible to the UPDATE, not an error.
    with as_user(api, world.coordinator_a1) as c:
        assert touch_certifications(c, {world.cert_b1, world.cert_a2}) == set()


def test_coordinator_cannot_insert_a_certification_for_a_mentor_outside_their_chapters(
    api: Conn, world: TwoOrganisations
) -> None:
    # 42501 "new row violates row-level security policy": the INSERT policy's WITH CHECK.
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        insert_certification(c, world.mentor_b1.peer_mentor_id)


def test_coordinator_cannot_move_a_certification_to_a_mentor_outside_their_chapters(
    api: Conn, world: TwoOrganisations
) -> None:
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        c.execute(
            "update public.certifications set peer_mentor_id = %s where id = %s",
            (world.mentor_b1.peer_mentor_id, world.cert_a1),
        )


def test_a_coordinator_who_is_also_a_mentor_reads_but_cannot_change_their_own_certification(
    api: Conn, hierarchy: Hierarchy, world: TwoOrganisations
) -> None:
    # Separation of duties: the coordinator of a1 is made a mentor of a1 too.
    hierarchy.membership(world.coordinator_a1, world.chapter_a1, "peer_mentor")
    own = hierarchy.certification(hierarchy.peer_mentor(world.coordinator_a1))
    with as_user(api, world.coordinator_a1) as c:
        assert own in visible_certification_ids(c)
        assert touch_certifications(c, {own}) == set()
        assert touch_certifications(c) == {world.cert_a1, world.cert_shared}


# --- changes take effect at once; service_role ----------------------------------------------------


def test_removing_a_membership_takes_effect_in_the_next_transaction_of_the_same_session(
    api: Conn, hierarchy: Hierarchy, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        assert world.cert_a1 in visible_certification_ids(c)
    hierarchy.remove_membership(world.mentor_a1.user_id, world.chapter_a1, "peer_mentor")
    with as_user(api, world.coordinator_a1) as c:
        assert visible_certification_ids(c) == {world.cert_shared}


def test_service_role_sees_every_certification(api: Conn, world: TwoOrganisations) -> None:
    with acting_as(api, "service_role", claims_for(None, "service_role")) as c:
        assert visible_certification_ids(c) == world.all_certifications
