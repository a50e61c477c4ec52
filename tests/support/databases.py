"""Real PostgreSQL for tests: a migrated template per session, a fresh clone of it per test.

``CERTSYNC_TEST_DATABASE_URL`` (CI: 127.0.0.1:5432) names an admin connection; without it the
embedded server (pgserver) is started in the user cache directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import platformdirs
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from certsync.store.embedded import embedded_database_url
from certsync.store.migrations import migrate


def admin_url() -> str:
    url = os.environ.get("CERTSYNC_TEST_DATABASE_URL")
    if url:
        return url
    return embedded_database_url(Path(platformdirs.user_cache_dir("certsync", appauthor=False)) / "test-pg")


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)  # type: ignore[arg-type]


def create_database(admin: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        if template:
            conn.execute(
                sql.SQL("create database {} template {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        else:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    return with_dbname(admin, name)


def drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def create_migrated_template(admin: str) -> str:
    """A new database with every migration applied, to be cloned by each test."""
    name = unique_name("certsync_template")
    url = create_database(admin, name)

    async def apply() -> None:
        conn = await psycopg.AsyncConnection.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(apply())
    return name


@contextlib.contextmanager
def database_outage(admin: str, name: str) -> Iterator[None]:
    """Take one database down for the duration: its sessions are cut and new connections refused.

    ``allow_connections = false`` refuses superusers too, so this is an outage of this database alone,
    with the driver's real errors, while the shared server keeps serving everyone else.
    """
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("alter database {} allow_connections false").format(sql.Identifier(name)))
        conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = %s and pid <> pg_backend_pid()",
            (name,),
        )
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("alter database {} allow_connections true").format(sql.Identifier(name)))
