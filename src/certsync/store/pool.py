"""The one connection pool (psycopg 3, async). Opened by the composition root, never at import."""

from __future__ import annotations

import select

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from certsync.store.errors import DatabaseUnavailable, first_line

Pool = AsyncConnectionPool[AsyncConnection[dict[str, object]]]
Connection = AsyncConnection[dict[str, object]]


async def check_unless_quiet(conn: Connection) -> None:
    """The pool's check on checkout, made only when the connection's socket has something to say.

    psycopg_pool's ``check_connection`` is a round trip per checkout: at a busy worker's rate that
    was nearly one extra statement per delivered event. An idle connection in a pool has nothing to
    read; one the server closed or terminated (a restart, ``pg_terminate_backend``) has its error
    message or end-of-file waiting, so a zero-timeout poll of its socket tells the two apart without
    a round trip (go-sql-driver/mysql checks its idle connections the same way). Only then is the
    real check made, and a dead connection is replaced before anyone uses it.
    """
    if conn.closed or _readable(conn.pgconn.socket):
        await AsyncConnectionPool.check_connection(conn)


def _readable(fd: int) -> bool:
    """Data, end-of-file or an error waiting on ``fd`` (poll, not select: no limit on the fd's number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


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
        connection_class=Connection,
        name="certsync",
        # A connection killed by a database restart is replaced before anyone uses it, instead of
        # failing the first statement of every pooled connection; a quiet one costs no round trip.
        check=check_unless_quiet,
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
