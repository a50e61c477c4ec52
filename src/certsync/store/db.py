"""Running named queries on the pool, with driver failures mapped to store errors in one place."""

from __future__ import annotations

from typing import Any

import psycopg

from certsync.store.errors import DatabaseUnavailable, SchemaMissing, first_line
from certsync.store.pool import Pool
from certsync.store.queries import query


async def fetch(pool: Pool, name: str, params: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Run the named query in its own transaction; the rows it returns (none for a plain statement).

    ``params`` None: the query is sent as it is, so it may hold several statements (a DDL script).
    """
    try:
        async with pool.connection() as conn:
            cur = await conn.execute(query(name), params)
            rows = await cur.fetchall() if cur.description else []
            return [dict(r) for r in rows]
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"database unavailable ({name}): {first_line(exc)}") from exc
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as exc:
        raise SchemaMissing(
            f"the database lacks certsync's schema ({first_line(exc)}): run `certsync migrate`"
        ) from exc
