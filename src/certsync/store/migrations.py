"""Applies ``supabase/migrations/*.sql`` idempotently, recording them where the Supabase CLI does.

As ``supabase migration up`` / ``db push``: a file is ``<digits>_<anything>.sql``, split into statements
that run in order in one transaction, and recorded with one statement per element of ``statements``.
On a plain PostgreSQL (no ``auth`` schema) the local shims in ``store/shims`` are applied first so the
migrations find what a Supabase project provides: the roles, ``auth.users``, ``auth.uid()``, ``auth.jwt()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.rows import scalar_row

from certsync.store.errors import MigrationError

log = structlog.get_logger(__name__)

# The Supabase CLI's own pattern (supabase/cli, pkg/migration/file.go): any digits, then anything.
_FILE = re.compile(r"^([0-9]+)_(.*)\.sql$", re.DOTALL)
# Any constant would do; it serialises concurrent `certsync migrate` runs against one database.
_MIGRATION_LOCK = 0x63657274


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def file_name(self) -> str:
        return f"{self.version}_{self.name}.sql"

    @property
    def statements(self) -> tuple[str, ...]:
        return split_statements(self.sql)


@dataclass(frozen=True, slots=True)
class MigrationReport:
    shims_applied: bool
    applied: tuple[str, ...]
    already_applied: tuple[str, ...]


def migrations_dir() -> Path:
    """The source tree's ``supabase/migrations`` when running from a checkout, else the packaged copy."""
    checkout = Path(__file__).resolve().parents[3] / "supabase" / "migrations"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("certsync.store").joinpath("migrations")))


def load_migrations(directory: Path | None = None) -> list[Migration]:
    folder = directory or migrations_dir()
    found: list[Migration] = []
    seen: dict[str, str] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            # The CLI skips such a file with a warning; stopping says so before anything is applied.
            raise MigrationError(f"{path.name}: migration files are named <digits>_<name>.sql")
        if match[1] in seen:
            raise MigrationError(f"{seen[match[1]]} and {path.name} have the same version {match[1]}")
        seen[match[1]] = path.name
        found.append(Migration(match[1], match[2], path.read_text(encoding="utf-8")))
    if not found:
        raise MigrationError(f"no migrations found in {folder}")
    return found


_DOLLAR_TAG = re.compile(r"\$\w*\$")
_WORD = re.compile(r"\w+")


def split_statements(sql: str) -> tuple[str, ...]:
    """The statements of a migration file, as the Supabase CLI splits them (supabase/cli, pkg/parser).

    A ``;`` ends a statement only outside quotes (``'…'`` with ``''``, ``"…"``), comments (``--``, nested
    ``/* */``), dollar-quoted bodies (``$tag$ … $tag$``), parentheses and a ``BEGIN ATOMIC … END`` body
    (which ends at its first ``end`` word); ``\\`` outside them escapes the next character. Each statement
    is kept as written, comments included, without its ``;`` and the white space around it; empty ones
    are dropped.
    """
    chunks: list[str] = []
    start = i = depth = 0
    atomic = False
    while i < len(sql):
        if (after := _opaque_end(sql, i)) is not None:
            i = after
        elif (word := _WORD.match(sql, i)) is not None and (i == 0 or not _is_word_char(sql[i - 1])):
            lowered = word[0].lower()
            if atomic and lowered == "end" and depth == 0:
                atomic = False
            elif lowered == "atomic" and _previous_word(sql, i).lower() == "begin":
                atomic = True
            i = word.end()
        else:
            char = sql[i]
            if char == "(":
                depth += 1
            elif char == ")":
                depth = max(depth - 1, 0)
            elif char == ";" and depth == 0 and not atomic:
                chunks.append(sql[start:i])
                start = i + 1
            i += 1
    chunks.append(sql[start:])
    return tuple(statement for chunk in chunks if (statement := chunk.rstrip(";").strip()))


def _opaque_end(sql: str, i: int) -> int | None:
    """Where the comment, quoted text, dollar-quoted body or escape starting at ``i`` ends; None if none."""
    if sql.startswith("--", i):
        newline = sql.find("\n", i)
        return len(sql) if newline < 0 else newline + 1
    if sql.startswith("/*", i):
        return _block_comment_end(sql, i)
    if sql[i] in "'\"":
        return _quoted_end(sql, i)
    if sql[i] == "\\":
        return i + 2
    if (tag := _DOLLAR_TAG.match(sql, i)) is not None:
        close = sql.find(tag[0], tag.end())
        return len(sql) if close < 0 else close + len(tag[0])
    return None


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char in "_$"


def _previous_word(sql: str, before: int) -> str:
    head = sql[:before].rstrip()
    word = re.search(r"\w+$", head)
    if word is None or (word.start() > 0 and _is_word_char(head[word.start() - 1])):
        return ""
    return word[0]


def _block_comment_end(sql: str, i: int) -> int:
    depth = 0
    while i < len(sql):
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return i


def _quoted_end(sql: str, i: int) -> int:
    quote = sql[i]
    i += 1
    while True:
        close = sql.find(quote, i)
        if close < 0:
            return len(sql)
        if not sql.startswith(quote * 2, close):
            return close + 1
        i = close + 2


def _shims_sql() -> str:
    return resources.files("certsync.store").joinpath("shims", "supabase_shims.sql").read_text("utf-8")


async def _has_auth_schema(conn: AsyncConnection[Any]) -> bool:
    async with conn.cursor(row_factory=scalar_row) as cur:
        await cur.execute("select exists(select 1 from pg_namespace where nspname = 'auth')")
        return bool(await cur.fetchone())


async def migrate(conn: AsyncConnection[Any], directory: Path | None = None) -> MigrationReport:
    """Apply shims (when needed) and every pending migration, each in its own transaction."""
    migrations = load_migrations(directory)
    await conn.set_autocommit(False)
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        shims = not await _has_auth_schema(conn)
        if shims:
            await conn.execute(_shims_sql().encode())
            # Debug, not info: the report is the result, and every caller already says it (the CLI once).
            log.debug("supabase_shims_applied")
        await conn.execute(
            """
            create schema if not exists supabase_migrations;
            create table if not exists supabase_migrations.schema_migrations (
              version text not null primary key
            );
            alter table supabase_migrations.schema_migrations add column if not exists statements text[];
            alter table supabase_migrations.schema_migrations add column if not exists name text;
            """
        )
    applied: list[str] = []
    skipped: list[str] = []
    for migration in migrations:
        async with conn.transaction():
            await conn.execute("select pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            done = await conn.execute(
                "select 1 from supabase_migrations.schema_migrations where version = %s",
                (migration.version,),
            )
            if await done.fetchone() is not None:
                skipped.append(f"{migration.version}_{migration.name}")
                continue
            statements = migration.statements
            for number, statement in enumerate(statements, start=1):
                try:
                    await conn.execute(statement.encode())
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"{migration.file_name} failed at statement {number} of {len(statements)}: {exc}"
                    ) from exc
            await conn.execute(
                "insert into supabase_migrations.schema_migrations (version, name, statements)"
                " values (%s, %s, %s)",
                (migration.version, migration.name, list(statements)),
            )
            applied.append(f"{migration.version}_{migration.name}")
            log.debug("migration_applied", version=migration.version, migration=migration.name)
    return MigrationReport(shims_applied=shims, applied=tuple(applied), already_applied=tuple(skipped))
