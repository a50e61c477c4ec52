"""Migrations: apply on an empty database, apply twice cleanly, and agree with the Supabase CLI: the same
file names accepted, the same table, one statement per element of ``statements``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from certsync.store.errors import MigrationError
from certsync.store.migrations import load_migrations, migrate
from tests.support.cli import certsync, cli_env
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
    assert all(r[2] == list(m.statements) for r, m in zip(rows, expected, strict=True))
    # One statement per element, as `supabase migration` records them: the core schema alone creates
    # six tables, each its own element, and no element keeps the `;` that ended it.
    core_schema = rows[0][2]
    assert sum("create table public." in s for s in core_schema) == 6
    assert all(s and not s.endswith(";") and s == s.strip() for r in rows for s in r[2])


# The Supabase CLI (supabase/cli, pkg/migration/file.go) reads a migration's version and name with
# `^([0-9]+)_(.*)\.sql$`: any number of digits, then anything at all.
CLI_FILE_NAMES = [
    "1_first.sql",
    "20261201000000_add-venue-opening-hours.sql",
    "20261201000001_Mixed Case, spaces & dots.v2.sql",
    "20261201000002_.sql",
]


async def test_every_file_name_the_supabase_cli_accepts_is_applied_and_recorded(
    empty_database: str, tmp_path: Path
) -> None:
    for i, name in enumerate(CLI_FILE_NAMES):
        (tmp_path / name).write_text(f"create table public.t{i} (id int);\n", encoding="utf-8")
    async with await psycopg.AsyncConnection.connect(empty_database) as conn:
        report = await migrate(conn, tmp_path)
        cur = await conn.execute("select version, name from supabase_migrations.schema_migrations")
        recorded = set(await cur.fetchall())
    assert len(report.applied) == len(CLI_FILE_NAMES)
    assert recorded == {
        ("1", "first"),
        ("20261201000000", "add-venue-opening-hours"),
        ("20261201000001", "Mixed Case, spaces & dots.v2"),
        ("20261201000002", ""),
    }


@pytest.mark.parametrize("name", ["init.sql", "v1_init.sql", "_1.sql", "\u0661_arabic_digit.sql"])
def test_a_file_name_the_supabase_cli_would_skip_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    # The CLI skips such a file with a warning; here it stops the run, so no migration is silently lost.
    (tmp_path / "1_ok.sql").write_text("select 1;", encoding="utf-8")
    (tmp_path / name).write_text("select 1;", encoding="utf-8")
    with pytest.raises(MigrationError, match=name.replace(".", r"\.")):
        load_migrations(tmp_path)


def test_two_files_with_one_version_are_refused(tmp_path: Path) -> None:
    (tmp_path / "20261201000000_a.sql").write_text("select 1;", encoding="utf-8")
    (tmp_path / "20261201000000_b.sql").write_text("select 2;", encoding="utf-8")
    with pytest.raises(MigrationError, match="20261201000000"):
        load_migrations(tmp_path)


# What the Supabase CLI's splitter (pkg/parser) makes of one file: a `;` ends a statement only outside
# quotes, identifiers, comments, dollar-quoted bodies, parentheses and BEGIN ATOMIC … END; each statement
# is kept as written (comments included) without its `;` and surrounding white space.
SPLIT_SOURCE = """\
-- leading comment; with a semicolon
create table public.notes (body text default 'a;b''c', "odd;name" int);

create function public.f() returns int
language plpgsql as $body$
begin
  perform 1; -- inside the body
  return (select 2);
end
$body$;
/* block; /* nested; */ still comment; */
create function public.g() returns text language sql as $$ select 'x;y' $$;
create function public.h() returns int language sql
begin atomic
  select 1;
  select 2;
end;
insert into public.notes (body) values ('one;'), (E'two\\;');;
-- trailing comment
"""
SPLIT_EXPECTED = [
    "-- leading comment; with a semicolon\n"
    "create table public.notes (body text default 'a;b''c', \"odd;name\" int)",
    "create function public.f() returns int\nlanguage plpgsql as $body$\n"
    "begin\n  perform 1; -- inside the body\n  return (select 2);\nend\n$body$",
    "/* block; /* nested; */ still comment; */\n"
    "create function public.g() returns text language sql as $$ select 'x;y' $$",
    "create function public.h() returns int language sql\nbegin atomic\n  select 1;\n  select 2;\nend",
    "insert into public.notes (body) values ('one;'), (E'two\\;')",
    "-- trailing comment",
]


async def test_statements_are_recorded_one_per_element_as_the_supabase_cli_splits_them(
    empty_database: str, tmp_path: Path
) -> None:
    (tmp_path / "20261201000000_split.sql").write_text(SPLIT_SOURCE, encoding="utf-8")
    async with await psycopg.AsyncConnection.connect(empty_database) as conn:
        await migrate(conn, tmp_path)
        cur = await conn.execute("select statements from supabase_migrations.schema_migrations")
        [(statements,)] = await cur.fetchall()
        cur = await conn.execute("select public.f() + public.h(), public.g(), count(*) from public.notes")
        assert await cur.fetchone() == (4, "x;y", 2)
    assert statements == SPLIT_EXPECTED


async def test_a_failing_statement_is_named_and_nothing_of_its_file_is_applied(
    empty_database: str, tmp_path: Path
) -> None:
    (tmp_path / "20261201000000_broken.sql").write_text(
        "create table public.kept (id int);\nselect 1/0;\n", encoding="utf-8"
    )
    async with await psycopg.AsyncConnection.connect(empty_database) as conn:
        with pytest.raises(MigrationError, match=r"20261201000000_broken\.sql.*statement 2"):
            await migrate(conn, tmp_path)
        cur = await conn.execute("select to_regclass('public.kept') is null")
        assert await cur.fetchone() == (True,)


async def test_certsync_migrate_says_each_step_once_when_piped(empty_database: str) -> None:
    # `certsync migrate | cat`: stdout is not a terminal, so logs are JSON on stderr, at info.
    result = await certsync("migrate", env=cli_env(empty_database, CERTSYNC_LOG_LEVEL="info"))
    assert result.exit_code == 0, result.output
    names = [f"{m.version}_{m.name}" for m in load_migrations()]
    for name in names:
        assert result.stdout.count(name) == 1
    assert not any(m.version in result.stderr for m in load_migrations()), result.stderr
    assert "shims" not in result.stderr


@pytest.mark.parametrize("log_format", [None, "json", "console"])
def test_certsync_migrate_2_to_1_piped_names_each_migration_once(
    empty_database: str, tmp_path: Path, log_format: str | None
) -> None:
    # Issue 15 as reported, `certsync migrate 2>&1 | cat`: a real process, its stdout a pipe and its
    # stderr the same pipe, the log format left to its default (chosen by whether stdout is a terminal)
    # or set. A log line per step would name each migration's version a second time.
    env = {name: value for name, value in os.environ.items() if not name.startswith("CERTSYNC_")}
    env |= {"CERTSYNC_DATABASE_URL": empty_database, "CERTSYNC_LOG_LEVEL": "info"}
    if log_format is not None:
        env["CERTSYNC_LOG_FORMAT"] = log_format
    run = subprocess.run(
        [sys.executable, "-m", "certsync", "migrate"],
        env=env,
        cwd=tmp_path,  # no stray .env
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout
    for migration in load_migrations():
        assert run.stdout.count(migration.version) == 1, run.stdout
    assert run.stdout.count("shims") == 1, run.stdout


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


async def test_the_shims_auth_users_is_supabases_with_no_default_id(empty_database: str) -> None:
    # On Supabase, GoTrue creates auth.users (supabase/auth, migrations/) and supplies every id itself:
    # the column has no default, so a local insert without one must fail here as it would there.
    async with await psycopg.AsyncConnection.connect(empty_database) as conn:
        await migrate(conn)
        cur = await conn.execute(
            """
            select a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid)
            from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
            where a.attrelid = 'auth.users'::regclass and a.attnum > 0 and not a.attisdropped
              and a.attname in ('id', 'email', 'raw_user_meta_data', 'created_at')
            order by a.attname
            """
        )
        assert await cur.fetchall() == [
            ("created_at", "timestamp with time zone", False, None),
            ("email", "character varying(255)", False, None),
            ("id", "uuid", True, None),
            ("raw_user_meta_data", "jsonb", False, None),
        ]
        with pytest.raises(psycopg.errors.NotNullViolation):
            await conn.execute("insert into auth.users default values")
