"""The pool's check on checkout: a connection the server closed is replaced before it is used, and a
quiet one is handed out without the round trip psycopg_pool's own check would cost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from certsync.store.pool import Pool, open_pool

pytestmark = pytest.mark.integration

Connection = psycopg.AsyncConnection[Any]


@pytest.fixture
async def one_connection(database_url: str) -> AsyncIterator[Pool]:
    pool = await open_pool(database_url, min_size=1, max_size=1)
    yield pool
    await pool.close()


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each round-trip check made (psycopg_pool's ``check_connection`` sends an empty query)."""
    made: list[int] = []
    real = psycopg.AsyncConnection.execute

    async def execute(self: Connection, query: Any, *args: Any, **kwargs: Any) -> Any:
        if query == "":
            made.append(self.info.backend_pid)
        return await real(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "execute", execute)
    return made


async def backend_pid(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("select pg_backend_pid() as pid")
        row = await cur.fetchone()
        assert row is not None
        return int(str(row["pid"]))


async def test_a_quiet_connection_is_handed_out_without_a_round_trip(
    one_connection: Pool, checks: list[int]
) -> None:
    pids = {await backend_pid(one_connection) for _ in range(20)}
    assert len(pids) == 1  # the same connection, twenty times
    assert checks == []


async def test_a_connection_the_server_terminated_is_replaced_before_it_is_used(
    one_connection: Pool, checks: list[int], database_url: str
) -> None:
    before = await backend_pid(one_connection)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
        # pg_terminate_backend only signals the backend; wait (5 s at most) until it has gone.
        await admin.execute("select pg_terminate_backend(%s, 5000)", (before,))

    after = await backend_pid(one_connection)  # no AdminShutdown: the pool noticed first

    assert after != before
    assert checks == [before]  # the one check made: on the connection that had something to say
