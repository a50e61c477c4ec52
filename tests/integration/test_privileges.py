"""Privileges around the policies: what the API roles may touch besides the rows RLS hands them.

RLS decides which rows a request sees; these tests are about the objects around it: sequences, which
RLS does not cover at all, and the ``security definer`` functions a request may call directly. Like
test_rls_lint.py they read the migrated database's catalogue, so an object a later migration adds is
checked too, and a new one that is open fails here by name (docs/security.md, "Privileges").
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.support.rls import (
    ApiRole,
    TwoOrganisations,
    acting_as,
    as_user,
    claims_for,
    rows,
)

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]

API_ROLES: tuple[ApiRole, ...] = ("anon", "authenticated")

# Schemas whose objects Supabase (or the local shims standing in for it) owns, not certsync.
PLATFORM_SCHEMAS = ["pg_catalog", "information_schema", "auth"]

# Every sequence outside the platform's schemas on which anon or authenticated holds any privilege,
# directly, through PUBLIC or through a role they are a member of.
OPEN_SEQUENCES = """
select format('%%I.%%I', n.nspname, c.relname) as sequence, r.role,
       array_remove(array[
         case when has_sequence_privilege(r.role, c.oid, 'USAGE') then 'USAGE' end,
         case when has_sequence_privilege(r.role, c.oid, 'SELECT') then 'SELECT' end,
         case when has_sequence_privilege(r.role, c.oid, 'UPDATE') then 'UPDATE' end
       ], null) as privileges,
       coalesce((select array_agg(format('%%s=%%s', case when a.grantee = 0 then 'PUBLIC'
                                                         else a.grantee::regrole::text end,
                                          a.privilege_type) order by a.grantee, a.privilege_type)
                 from aclexplode(c.relacl) a), '{}') as grants
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
cross join unnest(%(roles)s::text[]) as r(role)
where c.relkind = 'S'
  and n.nspname <> all(%(platform)s::text[]) and n.nspname !~ '^pg_(toast|temp)'
  and has_sequence_privilege(r.role, c.oid, 'USAGE, SELECT, UPDATE')
order by 1, 2
"""

# Every security definer function outside the platform's schemas that anon or authenticated may execute.
EXECUTABLE_SECURITY_DEFINER_FUNCTIONS = """
select format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)), r.role
from pg_proc p
join pg_namespace n on n.oid = p.pronamespace
cross join unnest(%(roles)s::text[]) as r(role)
where p.prosecdef
  and n.nspname <> all(%(platform)s::text[])
  and has_function_privilege(r.role, p.oid, 'EXECUTE')
order by 1, 2
"""

# The security definer functions `authenticated` may call, each reviewed: what it can tell or do to a
# caller who calls it directly rather than through a policy. A new one fails the test below until it is
# reviewed and listed here with its reason. `anon` may execute none.
REVIEWED_FOR_AUTHENTICATED = {
    "private.my_chapter_ids()": "the caller's own chapters: what chapters_select already shows them",
    "private.coordinated_chapter_ids()": "the chapters the caller coordinates: their own memberships",
    "private.my_organisation_ids()": "the caller's own organisations: what organisations_select shows",
    "private.coordinated_mentor_ids()": "the mentors the caller coordinates: rows peer_mentors_select shows",
    "private.visible_mentor_ids()": "the coordinated mentors and the caller: rows peer_mentors_select shows",
    "private.is_locked(p_table text)": "whether a table is locked down: its effect, 0 rows, shows it anyway",
    "private.access_audit_enabled()": "whether the audit is on: a deployment setting, and its cost shows it",
    "private.cross_organisation_mentor_ids()": (
        "empty while the audit is off; while on, which mentors the caller already sees also belong to"
        " an organisation the caller is not in (a bit each, never which): any audit that records those"
        " rows and not others shows the same bit through its cost"
    ),
    "private.audit_certification_read(p_certification_id uuid, p_peer_mentor_id uuid)": (
        "records the caller's own read of a certification they can see, from auth.uid(); returns true,"
        " says nothing (no message, no readable notification), does nothing for any other pair"
    ),
}


def open_sequences(superuser: Conn) -> list[tuple[Any, ...]]:
    return rows(superuser, OPEN_SEQUENCES, {"roles": list(API_ROLES), "platform": PLATFORM_SCHEMAS})


# --- 1. sequences ------------------------------------------------------------------------------------


def test_no_api_role_holds_any_privilege_on_any_sequence(superuser: Conn) -> None:
    # Supabase's default privileges grant anon and authenticated ALL on every sequence created in
    # public (identity and serial columns included); RLS does not apply to sequences. Each migration
    # revokes on the sequences it creates (docs/security.md, "Privileges"); this names any it missed.
    found = open_sequences(superuser)
    assert not found, (
        "open to an API role (revoke all on sequence … from anon, authenticated):\n"
        + "\n".join(
            f"  {sequence}: {role} holds {', '.join(privileges)} (grants: {', '.join(grants)})"
            for sequence, role, privileges, grants in found
        )
    )


@pytest.mark.parametrize("role", API_ROLES)
@pytest.mark.parametrize("call", ["setval({}, 9223372036854775807)", "nextval({})", "currval({})"])
def test_an_api_role_cannot_move_or_read_the_retry_queue_sequence(
    superuser: Conn, api: Conn, role: ApiRole, call: str
) -> None:
    sequence = rows(superuser, "select pg_get_serial_sequence('public.dynamics_sync_retry_queue', 'id')")[0][
        0
    ]
    with pytest.raises(errors.InsufficientPrivilege), acting_as(api, role, claims_for(None, role)) as c:
        c.execute(sql.SQL("select " + call).format(sql.Literal(sequence)))


def test_the_retry_queue_still_takes_rows_after_an_api_role_tried_to_exhaust_its_sequence(
    superuser: Conn, api: Conn
) -> None:
    # The harm the grant did: setval to the maximum, and the next failure could not be queued.
    with pytest.raises(errors.InsufficientPrivilege), acting_as(api, "anon") as c:
        c.execute("select setval('public.dynamics_sync_retry_queue_id_seq', 9223372036854775807)")
    superuser.execute(
        "insert into public.dynamics_sync_retry_queue (operation_type, payload_json, failure_reason)"
        " values ('certification.updated', '{}', 'probe')"
    )


def test_the_shims_grant_new_objects_in_public_to_the_api_roles_as_supabase_does(superuser: Conn) -> None:
    # The lint above is honest only if a sequence a future migration forgets is open here as it would
    # be on Supabase: its default privileges grant ALL on new tables, sequences and functions in public
    # to anon, authenticated and service_role (supabase/postgres, init-scripts/00000000000000).
    superuser.execute(
        "create sequence public.probe_seq;"
        " create table public.probe_table (id bigint generated always as identity primary key);"
        " create function public.probe_function() returns int language sql as 'select 1'"
    )
    for role in ("anon", "authenticated", "service_role"):
        granted = rows(
            superuser,
            "select has_sequence_privilege(%(r)s, 'public.probe_seq', 'USAGE, SELECT, UPDATE'),"
            " has_table_privilege(%(r)s, 'public.probe_table', 'SELECT, INSERT, UPDATE, DELETE'),"
            " has_function_privilege(%(r)s, 'public.probe_function()', 'EXECUTE')",
            {"r": role},
        )[0]
        assert granted == (True, True, True), role
    named = {sequence for sequence, *_ in open_sequences(superuser)}
    assert named == {"public.probe_seq", "public.probe_table_id_seq"}
    # And the roles inherit, as Supabase's do, so a grant through a group role counts for them too.
    assert rows(
        superuser,
        "select rolname, rolinherit from pg_roles where rolname = any(%s) order by 1",
        (["anon", "authenticated", "service_role"],),
    ) == [("anon", True), ("authenticated", True), ("service_role", True)]


# --- 2. security definer functions the API roles may call ------------------------------------------


def executable_security_definer_functions(superuser: Conn, role: str) -> set[str]:
    found = rows(
        superuser,
        EXECUTABLE_SECURITY_DEFINER_FUNCTIONS,
        {"roles": [role], "platform": PLATFORM_SCHEMAS},
    )
    return {signature for signature, _ in found}


def test_anon_may_execute_no_security_definer_function(superuser: Conn) -> None:
    assert executable_security_definer_functions(superuser, "anon") == set()


def test_every_security_definer_function_authenticated_may_execute_has_been_reviewed(superuser: Conn) -> None:
    found = executable_security_definer_functions(superuser, "authenticated")
    assert sorted(found - REVIEWED_FOR_AUTHENTICATED.keys()) == [], "not reviewed: add a reason or revoke"
    assert sorted(REVIEWED_FOR_AUTHENTICATED.keys() - found) == [], "reviewed but gone: drop the entry"


def test_authenticated_may_execute_nothing_else_in_private(superuser: Conn) -> None:
    # Not only the security definer ones: the audit's sealing and recording functions run as the owner
    # inside them, and must not be callable on their own.
    found = rows(
        superuser,
        "select format('%%I.%%I(%%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid))"
        " from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = 'private' and has_function_privilege('authenticated', p.oid, 'EXECUTE')",
        (),
    )
    assert sorted({signature for (signature,) in found} - REVIEWED_FOR_AUTHENTICATED.keys()) == []


def audit_rows(superuser: Conn) -> list[tuple[Any, ...]]:
    return rows(superuser, "select reader_id, certification_id from private.access_audit")


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
def test_calling_the_audit_function_directly_tells_nothing_of_a_mentor_the_caller_cannot_see(
    superuser: Conn, api: Conn, world: TwoOrganisations, read_only: bool
) -> None:
    # coordinator_b1 cannot see mentor_a2 (organisation A only). Asked directly about that mentor, the
    # function once answered in a LOG line and a NOTIFY naming organisation A, and recorded the read.
    superuser.execute("select private.set_access_audit(true)")
    messages: list[str] = []
    api.add_notice_handler(lambda diag: messages.append(diag.message_primary or ""))
    api.execute("listen certsync_access_audit")
    with as_user(api, world.coordinator_b1, read_only=read_only) as c:
        c.execute("set local client_min_messages = log")  # LOG lines reach the client too
        for certification, mentor in [
            (world.cert_a2, world.mentor_a2.peer_mentor_id),  # a mentor they do not see
            (world.cert_a2, world.shared_mentor.peer_mentor_id),  # a mentor they see, not this certification
        ]:
            c.execute("select private.audit_certification_read(%s, %s)", (certification, mentor))
    heard = [n.payload for n in api.notifies(timeout=0.5, stop_after=1)]
    assert (messages, heard) == ([], [])
    assert audit_rows(superuser) == []


def test_calling_the_audit_function_directly_records_only_the_callers_own_read(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    # The reader comes from auth.uid(), never from an argument; the pair must be one the caller sees.
    superuser.execute("select private.set_access_audit(true)")
    with as_user(api, world.coordinator_a1) as c:
        c.execute(
            "select private.audit_certification_read(%s, %s)",
            (world.cert_shared, world.shared_mentor.peer_mentor_id),
        )
    assert audit_rows(superuser) == [(world.coordinator_a1, world.cert_shared)]


def test_the_audit_function_does_nothing_while_the_audit_is_off(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        c.execute(
            "select private.audit_certification_read(%s, %s)",
            (world.cert_shared, world.shared_mentor.peer_mentor_id),
        )
        assert rows(c, "select * from private.cross_organisation_mentor_ids()") == []
    assert audit_rows(superuser) == []
