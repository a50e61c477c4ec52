"""The one connection pool (psycopg 3, async). Opened by the composition root, never at import."""

from __future__ import annotations

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from certsync.store.errors import DatabaseUnavailable, first_line

Pool = AsyncConnectionPool[AsyncConnection[dict[str, object]]]


async def open_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 10.0
) -> Pool:
    """Open a pool and wait until one connection works; raise DatabaseUnavailable if none does.

    One direct connection is tried first so that an unreachable database fails in seconds with the
    driver's own reason, instead of the pool retrying quietly until its timeout.
    """
    try:
        probe = await AsyncConnection.connect(dsn, connect_timeout=max(1, int(connect_timeout)))
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {first_line(exc)}") from exc
    await probe.close()
    pool: Pool = AsyncConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        open=False,
        kwargs={"row_factory": dict_row, "autocommit": False},
        connection_class=AsyncConnection[dict[str, object]],
        name="certsync",
        # One round trip per checkout, but a connection killed by a database restart is replaced
        # before anyone uses it, instead of failing the first statement of every pooled connection.
        check=AsyncConnectionPool.check_connection,
        # A checkout waits this long for a connection before the caller hears the database is down
        # (psycopg_pool's default of 30 s would hide a short outage from the worker's logs).
        timeout=connect_timeout,
    )
    try:
        await pool.open(wait=True, timeout=connect_timeout)
    except Exception as exc:
        await pool.close()
        raise DatabaseUnavailable(f"cannot connect to the database: {exc}") from exc
    return pool
