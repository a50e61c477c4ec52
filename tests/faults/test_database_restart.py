"""PostgreSQL goes down under a running worker and comes back: the worker reconnects by itself, says so
in its log, and loses nothing.

The server is this suite's own (``private_server``: pgserver in a temporary directory), never the one
other engineers share. It is stopped with a fast shutdown (every connection cut, as a host restart
does), kept down for longer than a lease, and started again while the worker process keeps running.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool, open_pool
from tests.faults.conftest import (
    SIGNING_SECRET,
    STATIC_TOKEN,
    PrivateServer,
    WorkerProcesses,
    assert_no_leaks,
    assert_nothing_lost,
    drained,
    personal_data,
    seed_mentors,
    worker_env,
)
from tests.support.runtime import wait_until
from tests.support.seed import change_some, outbox_statuses

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_SECONDS = 3.0  # longer than the 2 s lease: claims held across the outage must come back too
# What the worker logs when it loses the database (the LISTEN connection, the loop, the lease heartbeat).
OUTAGE_EVENTS = {"database_unavailable", "lease_heartbeat_failed", "outbox_listener_lost"}


@pytest.fixture
def private_database(private_server: PrivateServer) -> str:
    return private_server.migrated_database()  # sync: it runs its own event loop


@pytest.fixture
async def private_pool(private_database: str) -> AsyncIterator[tuple[str, Pool]]:
    url = private_database
    pool = await open_pool(url, max_size=2)
    yield url, pool
    await pool.close()


async def test_the_worker_reconnects_after_a_database_restart_reports_it_and_loses_nothing(
    private_server: PrivateServer,
    private_pool: tuple[str, Pool],
    slow_sandbox: SandboxServer,
    workers: WorkerProcesses,
) -> None:
    url, pool = private_pool
    certifications = await seed_mentors(pool, mentors=100, certifications_each=4)
    worker = workers.start(worker_env(url, slow_sandbox.url), "--concurrency", "8")

    async def delivering() -> bool:
        statuses = await outbox_statuses(pool)
        return statuses.get("delivered", 0) >= 40 and statuses.get("in_flight", 0) > 0

    await wait_until(delivering, "deliveries in flight", 60, every=0.05)
    private_server.stop()
    await asyncio.sleep(OUTAGE_SECONDS)
    private_server.start()
    assert worker.poll() is None, "the worker must survive the outage, not exit"
    await change_some(pool, certifications, random.Random(7), 100)

    await wait_until(
        lambda: drained(pool), "the worker to drain the outbox after the restart", 90, every=0.05
    )
    assert worker.poll() is None
    assert workers.stop(worker) == 0

    logged = workers.events()
    reported = [e for e in logged if e.get("event") in OUTAGE_EVENTS]
    # Short outages are ridden out inside the pool (a checkout waits for a new connection), so the line
    # that is certain is the LISTEN connection's; a longer one adds database_unavailable from the loop.
    assert any(e["event"] == "outbox_listener_lost" for e in reported), "the outage must be reported"
    after = logged.index(reported[-1])
    assert any(_delivered_put(e) for e in logged[after:]), "deliveries resume after it"
    await assert_nothing_lost(pool, slow_sandbox)
    assert_no_leaks(workers.lines(), await personal_data(pool) | {STATIC_TOKEN, SIGNING_SECRET})
    print(f"\noutage reported as {Counter(e['event'] for e in reported)}")


def _delivered_put(event: dict[str, Any]) -> bool:
    """A delivered upsert: the client's ``dynamics_request`` of a PUT answered 2xx (the service logs no
    line of its own for a success)."""
    status = event.get("status")
    return (
        event.get("event") == "dynamics_request"
        and event.get("method") == "PUT"
        and isinstance(status, int)
        and 200 <= status < 300
    )
