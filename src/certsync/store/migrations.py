"""Applies ``supabase/migrations/*.sql`` idempotently, recording them where the Supabase CLI does.

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

_FILE = re.compile(r"^(\d{14})_(\w+)\.sql$")
# Any constant would do; it serialises concurrent `certsync migrate` runs against one database.
_MIGRATION_LOCK = 0x63657274


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str


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
    for path in sorted(folder.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named <14-digit timestamp>_<name>.sql")
        found.append(Migration(match[1], match[2], path.read_text(encoding="utf-8")))
    if not found:
        raise MigrationError(f"no migrations found in {folder}")
    return found


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
            log.info("supabase_shims_applied")
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
            try:
                await conn.execute(migration.sql.encode())
            except psycopg.Error as exc:
                raise MigrationError(f"{migration.version}_{migration.name}.sql failed: {exc}") from exc
            await conn.execute(
                "insert into supabase_migrations.schema_migrations (version, name, statements)"
                " values (%s, %s, %s)",
                (migration.version, migration.name, [migration.sql]),
            )
            applied.append(f"{migration.version}_{migration.name}")
            log.info("migration_applied", version=migration.version, migration=migration.name)
    return MigrationReport(shims_applied=shims, applied=tuple(applied), already_applied=tuple(skipped))
