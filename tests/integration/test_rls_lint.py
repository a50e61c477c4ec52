"""Row-level security lint: catalogue checks that catch the mistakes a new migration is likely to make.

They read the migrated database's catalogue, so a table, view, function or policy added by any later
migration is checked too.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.support.rls import (
    EXPOSED_SCHEMAS,
    rows,
)

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]

# Lookups the `private` helpers make (SQL function bodies record no column dependencies, so these are
# listed by hand): memberships by user and by chapter, mentors by user, chapters by organisation.
HELPER_LOOKUPS = [
    ("chapter_memberships", "user_id"),
    ("chapter_memberships", "chapter_id"),
    ("peer_mentors", "user_id"),
    ("peer_mentors", "id"),
    ("chapters", "id"),
    ("chapters", "organisation_id"),
    ("certifications", "peer_mentor_id"),
]

# (table, column) is the leading column of some valid index on public.table.
LEADING_INDEX_COLUMNS = """
select c.relname, a.attname
from pg_index i
join pg_class c on c.oid = i.indrelid
join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
where n.nspname = 'public' and i.indisvalid
"""


def test_every_table_in_public_has_row_level_security_enabled(superuser: Conn) -> None:
    assert (
        rows(
            superuser,
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = 'public' and c.relkind in ('r', 'p') and not c.relrowsecurity",
        )
        == []
    )


def test_no_security_definer_function_lives_in_a_schema_the_api_exposes(superuser: Conn) -> None:
    assert (
        rows(
            superuser,
            "select n.nspname, p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = any(%s) and p.prosecdef",
            (EXPOSED_SCHEMAS,),
        )
        == []
    )


def test_every_security_definer_function_pins_an_empty_search_path(superuser: Conn) -> None:
    # Without it a caller could shadow an unqualified name with their own object (CVE-2018-1058 style).
    assert (
        rows(
            superuser,
            "select n.nspname, p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where p.prosecdef and n.nspname not in ('pg_catalog', 'information_schema')"
            " and not coalesce('search_path=\"\"' = any(p.proconfig), false)",
        )
        == []
    )


def test_every_view_in_public_is_security_invoker(superuser: Conn) -> None:
    assert (
        rows(
            superuser,
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = 'public' and c.relkind = 'v'"
            " and not coalesce(c.reloptions && array['security_invoker=true', 'security_invoker=on'], false)",
        )
        == []
    )


def test_no_materialized_view_lives_in_public_because_it_would_bypass_rls(superuser: Conn) -> None:
    assert (
        rows(
            superuser,
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = 'public' and c.relkind = 'm'",
        )
        == []
    )


def test_every_column_a_policy_filters_on_leads_an_index(superuser: Conn) -> None:
    # A policy records a dependency on each column its USING / WITH CHECK reads.
    filtered = rows(
        superuser,
        "select distinct c.relname, a.attname from pg_depend d"
        " join pg_class c on c.oid = d.refobjid"
        " join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid"
        " where d.classid = 'pg_policy'::regclass and d.refobjsubid > 0",
    )
    assert filtered, "expected policies that filter on columns"
    indexed = set(rows(superuser, LEADING_INDEX_COLUMNS))
    assert [column for column in filtered if column not in indexed] == []


@pytest.mark.parametrize(("table", "column"), HELPER_LOOKUPS)
def test_every_lookup_the_policy_helpers_make_leads_an_index(
    superuser: Conn, table: str, column: str
) -> None:
    assert (table, column) in set(rows(superuser, LEADING_INDEX_COLUMNS))


def test_every_policy_applies_to_authenticated_only(superuser: Conn) -> None:
    # A policy `to public` would also admit anon; service_role needs none (it bypasses RLS).
    assert (
        rows(
            superuser,
            "select tablename, policyname, roles from pg_policies"
            " where schemaname = 'public' and roles <> array['authenticated']::name[]",
        )
        == []
    )


def test_anon_holds_no_privilege_on_any_table_in_public(superuser: Conn) -> None:
    assert (
        rows(
            superuser,
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm')"
            " and has_table_privilege('anon', c.oid, 'select, insert, update, delete, truncate')",
        )
        == []
    )


def test_only_the_database_owner_may_flip_the_emergency_and_audit_switches(superuser: Conn) -> None:
    switches = [
        "private.lockdown(regclass, text)",
        "private.lift_lockdown(regclass)",
        "private.set_access_audit(boolean)",
        "private.cross_organisation_reads(timestamptz)",
        "private.record_access_notification(text)",
        "private.seal_access_record(bytea)",
    ]
    granted = [
        (role, fn)
        for fn in switches
        for role in ("public", "anon", "authenticated")
        if rows(superuser, "select has_function_privilege(%s, %s, 'execute')", (role, fn))[0][0]
    ]
    assert granted == []
