"""Migrations: apply on an empty database, apply twice cleanly, and agree with the Supabase CLI's table."""

from __future__ import annotations

import psycopg
import pytest

from certsync.store.migrations import load_migrations, migrate
from tests.support.databases import create_database, drop_database, unique_name

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_database(pg_admin_url: str):  # type: ignore[no-untyped-def]
    name = unique_name("certsync_empty")
    url = create_database(pg_admin_url, name)
    yield url
    drop_database(pg_admin_url, name)


async def test_migrations_apply_twice_cleanly(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database) as conn:
        first = await migrate(conn)
        second = await migrate(conn)
    names = [f"{m.version}_{m.name}" for m in load_migrations()]
    assert list(first.applied) == names
    assert second.applied == ()
    assert list(second.already_applied) == names


async def test_migrations_are_recorded_where_the_supabase_cli_looks(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database) as conn:
        await migrate(conn)
        cur = await conn.execute(
            "select version, name, statements from supabase_migrations.schema_migrations order by version"
        )
        rows = await cur.fetchall()
    expected = load_migrations()
    assert [(r[0], r[1]) for r in rows] == [(m.version, m.name) for m in expected]
    assert all(r[2] == [m.sql] for r, m in zip(rows, expected, strict=True))


async def test_shims_provide_supabase_auth_functions(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database) as conn:
        report = await migrate(conn)
        assert report.shims_applied
        await conn.execute(
            "select set_config('request.jwt.claims', %s, true)",
            ('{"sub": "6f1c2e7a-0000-4000-8000-000000000001", "role": "authenticated"}',),
        )
        cur = await conn.execute("select auth.uid()::text, auth.jwt() ->> 'role', auth.role()")
        assert await cur.fetchone() == (
            "6f1c2e7a-0000-4000-8000-000000000001",
            "authenticated",
            "authenticated",
        )
        cur = await conn.execute("select rolbypassrls from pg_roles where rolname = 'service_role'")
        assert await cur.fetchone() == (True,)
