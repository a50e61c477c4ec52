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
    wait_for,
    worker_env,
)
from tests.faults.test_worker_kills import change_some
from tests.support.seed import outbox_statuses

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

    await wait_for(delivering, 60, "deliveries in flight")
    private_server.stop()
    await asyncio.sleep(OUTAGE_SECONDS)
    private_server.start()
    assert worker.poll() is None, "the worker must survive the outage, not exit"
    await change_some(pool, certifications, random.Random(7), 100)

    await wait_for(lambda: drained(pool), 90, "the worker to drain the outbox after the restart")
    assert worker.poll() is None
    assert workers.stop(worker) == 0

    logged = workers.events()
    reported = [e for e in logged if e.get("event") in OUTAGE_EVENTS]
    # Short outages are ridden out inside the pool (a checkout waits for a new connection), so the line
    # that is certain is the LISTEN connection's; a longer one adds database_unavailable from the loop.
    assert any(e["event"] == "outbox_listener_lost" for e in reported), "the outage must be reported"
    after = logged.index(reported[-1])
    assert any(e.get("event") == "dynamics_attempt" for e in logged[after:]), "deliveries resume after it"
    await assert_nothing_lost(pool, slow_sandbox)
    assert_no_leaks(workers.lines(), await personal_data(pool) | {STATIC_TOKEN, SIGNING_SECRET})
    print(f"\noutage reported as {Counter(e['event'] for e in reported)}")
