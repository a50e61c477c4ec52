"""Running named queries on the pool, with driver failures mapped to store errors in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection

from certsync.store.errors import DatabaseUnavailable, SchemaMissing, first_line
from certsync.store.pool import Pool
from certsync.store.queries import query


@contextmanager
def driver_errors(what: str) -> Iterator[None]:
    """Map psycopg's failures onto store errors (the one place that does): callers never import psycopg.

    ``what`` names the operation in the message (a query name, "queueing an event").
    """
    try:
        yield
    except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout
        raise DatabaseUnavailable(f"database unavailable ({what}): {first_line(exc)}") from exc
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as exc:
        raise SchemaMissing(
            f"the database lacks certsync's schema ({first_line(exc)}): run `certsync migrate`"
        ) from exc


@asynccontextmanager
async def transaction(pool: Pool, what: str) -> AsyncIterator[AsyncConnection[Any]]:
    """A pooled connection inside one transaction, with driver failures mapped."""
    with driver_errors(what):
        async with pool.connection() as conn, conn.transaction():
            yield conn


async def fetch(pool: Pool, name: str, params: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Run the named query in its own transaction; the rows it returns (none for a plain statement).

    ``params`` None: the query is sent as it is, so it may hold several statements (a DDL script).
    """
    with driver_errors(name):
        async with pool.connection() as conn:
            cur = await conn.execute(query(name), params)
            return await cur.fetchall() if cur.description else []
