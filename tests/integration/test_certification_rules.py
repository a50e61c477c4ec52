"""Rules the database enforces beyond the shared cases: immutable columns for every writer, the columns
a coordinator may write, the issue rule, whole statements refused, and the owner's repair path."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg import errors

from certsync.store.pool import Pool
from certsync.store.sweep import expire_due
from tests.support.rls import ApiRole, TwoOrganisations, acting_as, as_user, claims_for
from tests.support.seed import rules_disabled, seed_certifications

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]


def execute_as(api: Conn, role: ApiRole | None, statement: str, params: tuple[Any, ...]) -> None:
    """One statement as an API role (its own transaction), or as the superuser when ``role`` is None."""
    if role is None:
        api.execute(statement, params)
        return
    with acting_as(api, role, claims_for(None, role)) as c:
        c.execute(statement, params)


def events_of(superuser: Conn, certification_ids: list[UUID]) -> int:
    row = superuser.execute(
        "select count(*) from public.certification_sync_events where certification_id = any(%s)",
        (certification_ids,),
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    ("column", "value"),
    [("id", uuid4()), ("peer_mentor_id", None), ("created_at", "2020-01-01T00:00:00+00:00")],
)
@pytest.mark.parametrize("writer", ["service_role", "superuser"])
def test_id_peer_mentor_and_created_at_are_immutable_for_every_writer(
    api: Conn, world: TwoOrganisations, column: str, value: object, writer: str
) -> None:
    value = world.mentor_a2.peer_mentor_id if column == "peer_mentor_id" else value
    statement = f"update public.certifications set {column} = %s where id = %s"
    role: ApiRole | None = "service_role" if writer == "service_role" else None
    with pytest.raises(errors.CheckViolation, match=rf"^{column}_is_immutable: ") as refused:
        execute_as(api, role, statement, (value, world.cert_a1))
    assert (refused.value.sqlstate, refused.value.diag.constraint_name) == ("23514", f"{column}_is_immutable")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("id", uuid4()),
        ("peer_mentor_id", None),
        ("certification_type", "other"),
        ("valid_from", date(2020, 1, 1)),
        ("version", 99),
        ("created_at", date(2020, 1, 1)),
        ("updated_at", date(2020, 1, 1)),
    ],
)
def test_a_coordinator_may_update_no_column_but_status_valid_until_and_renewal_history(
    api: Conn, world: TwoOrganisations, column: str, value: object
) -> None:
    value = world.mentor_a1.peer_mentor_id if column == "peer_mentor_id" else value
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        c.execute(f"update public.certifications set {column} = %s where id = %s", (value, world.cert_a1))


def test_a_coordinators_update_privileges_are_exactly_the_three_columns(superuser: Conn) -> None:
    rows = superuser.execute(
        "select privilege_type, column_name from information_schema.column_privileges"
        " where table_schema = 'public' and table_name = 'certifications' and grantee = 'authenticated'"
        " and privilege_type in ('INSERT', 'UPDATE')"
    ).fetchall()
    assert sorted(rows) == [
        ("INSERT", "certification_type"),
        ("INSERT", "id"),
        ("INSERT", "peer_mentor_id"),
        ("INSERT", "valid_from"),
        ("INSERT", "valid_until"),
        ("UPDATE", "renewal_history"),
        ("UPDATE", "status"),
        ("UPDATE", "valid_until"),
    ]
    table_level = superuser.execute(
        "select privilege_type from information_schema.table_privileges"
        " where table_schema = 'public' and table_name = 'certifications' and grantee = 'authenticated'"
    ).fetchall()
    assert sorted(table_level) == [("SELECT",)]


@pytest.mark.parametrize("column", ["status", "renewal_history", "version"])
def test_a_coordinator_issues_without_choosing_status_history_or_version(
    api: Conn, world: TwoOrganisations, column: str
) -> None:
    value = {"status": "revoked", "renewal_history": "[]", "version": 7}[column]
    with pytest.raises(errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        c.execute(
            f"insert into public.certifications (peer_mentor_id, valid_from, valid_until, {column})"
            " values (%s, current_date, current_date + 365, %s)",
            (world.mentor_a1.peer_mentor_id, value),
        )


def test_a_coordinator_issues_an_active_certification_with_an_empty_history(
    api: Conn, world: TwoOrganisations
) -> None:
    with as_user(api, world.coordinator_a1) as c:
        row = c.execute(
            "insert into public.certifications (id, peer_mentor_id, valid_from, valid_until)"
            " values (%s, %s, current_date, current_date + 365) returning status, renewal_history, version",
            (uuid4(), world.mentor_a1.peer_mentor_id),
        ).fetchone()
    assert row == ("active", [], 1)


def test_a_coordinator_cannot_issue_a_certification_whose_validity_has_passed(
    api: Conn, world: TwoOrganisations
) -> None:
    with (
        pytest.raises(errors.CheckViolation, match=r"^validity_not_passed: cannot issue"),
        as_user(api, world.coordinator_a1) as c,
    ):
        c.execute(
            "insert into public.certifications (peer_mentor_id, valid_from, valid_until)"
            " values (%s, date '2020-01-01', current_date - 2)",
            (world.mentor_a1.peer_mentor_id,),
        )


def test_one_refused_row_refuses_the_whole_statement_and_the_outbox_sees_nothing(
    api: Conn, superuser: Conn, world: TwoOrganisations
) -> None:
    superuser.execute(
        "update public.certifications set status = 'revoked' where id = %s", (world.cert_shared,)
    )
    mine = [world.cert_a1, world.cert_shared]  # the two certifications coordinator_a1 coordinates
    before = events_of(superuser, mine)
    with (
        pytest.raises(errors.CheckViolation, match=r"^revoked_is_final: "),
        as_user(api, world.coordinator_a1) as c,
    ):
        c.execute("update public.certifications set status = 'suspended'")
    assert events_of(superuser, mine) == before
    statuses = superuser.execute(
        "select status from public.certifications where id = any(%s) order by status", (mine,)
    ).fetchall()
    assert statuses == [("active",), ("revoked",)]


def test_the_rules_run_before_the_outbox_capture_and_identity_is_kept_per_row(superuser: Conn) -> None:
    def triggers(where: str) -> list[str]:
        rows = superuser.execute(
            "select tgname from pg_trigger where tgrelid = 'public.certifications'::regclass"
            f" and not tgisinternal and tgtype & 16 = 16 and {where} order by tgname"  # UPDATE triggers
        ).fetchall()
        return [r[0] for r in rows]

    # PostgreSQL fires triggers of one kind in name order: the rules first, then the access audit of
    # coordinators' writes, then the outbox capture (a refused statement reaches neither).
    assert triggers("tgtype & 3 = 0") == [
        "certifications_assert_rules",
        "certifications_audit_updates",
        "certifications_capture_updates",
    ]
    assert triggers("tgtype & 3 = 3") == ["certifications_bump_version", "certifications_keep_identity"]


def test_the_owner_repairs_through_the_documented_path_and_the_repair_is_captured(
    api: Conn, superuser: Conn, world: TwoOrganisations
) -> None:
    superuser.execute("update public.certifications set status = 'revoked' where id = %s", (world.cert_a1,))
    before = events_of(superuser, [world.cert_a1])
    with superuser.transaction():
        superuser.execute("alter table public.certifications disable trigger certifications_assert_rules")
        superuser.execute(
            "update public.certifications set status = 'active' where id = %s", (world.cert_a1,)
        )
        superuser.execute("alter table public.certifications enable trigger certifications_assert_rules")
    assert events_of(superuser, [world.cert_a1]) == before + 1
    # The trigger is back: leaving `revoked` (set again, as a plain update may) is refused once more.
    superuser.execute("update public.certifications set status = 'revoked' where id = %s", (world.cert_a1,))
    with pytest.raises(errors.CheckViolation, match=r"^revoked_is_final: "):
        superuser.execute(
            "update public.certifications set status = 'active' where id = %s", (world.cert_a1,)
        )


@pytest.mark.parametrize("role", ["authenticated", "service_role"])
def test_no_api_role_can_take_the_repair_path(api: Conn, role: ApiRole) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match="must be owner"):
        execute_as(
            api, role, "alter table public.certifications disable trigger certifications_assert_rules", ()
        )


async def test_the_sweep_still_expires_through_the_rules(pool: Pool) -> None:
    lapsed = await seed_certifications(pool, 3, valid_until=date(2020, 6, 1))
    await seed_certifications(pool, 2)
    assert await expire_due(pool, date.today() + timedelta(days=1)) == 3
    async with pool.connection() as conn:
        cur = await conn.execute("select count(*) as n from public.certifications where status = 'expired'")
        assert await cur.fetchone() == {"n": len(lapsed)}


async def test_the_repair_helper_restores_the_rules_afterwards(pool: Pool) -> None:
    [cert] = await seed_certifications(pool, 1, status="revoked")
    async with pool.connection() as conn, rules_disabled(conn):
        await conn.execute("update public.certifications set status = 'active' where id = %s", (cert,))
    with pytest.raises(errors.CheckViolation, match=r"^validity_changes_only_by_renewal: "):
        async with pool.connection() as conn:
            await conn.execute(
                "update public.certifications set valid_until = '2100-01-01' where id = %s", (cert,)
            )
