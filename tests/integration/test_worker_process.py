"""``certsync worker`` as a real process: killed mid-delivery it loses nothing; SIGTERM stops it cleanly.

The sandbox runs in this process (so its state can be read); every answer to a PUT takes 300 ms, so
that a signal lands while deliveries are in flight.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest

from certsync.sandbox.faults import FaultScript, Latency
from certsync.sandbox.server import SandboxServer
from certsync.sandbox.state import SandboxConfig
from certsync.store.pool import Pool
from tests.support.cli import cli_env
from tests.support.seed import outbox_statuses, seed_certifications, set_status

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LATENCY = FaultScript(latency=Latency(min_ms=300, scope="put"))


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(faults=LATENCY)) as server:
        yield server


@pytest.fixture
def start_worker(
    database_url: str, sandbox: SandboxServer, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts ``python -m certsync worker ARGS`` against this test's database and sandbox."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(started)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "certsync", "worker", *args],
            env={**os.environ, **cli_env(database_url, sandbox.url), **(env or {})},
            cwd=tmp_path,  # no stray .env
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


async def wait_until(pool: Pool, condition: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """Poll the outbox (another process changes it) until ``condition`` holds, for 30 s at most."""
    for _ in range(600):
        statuses = await outbox_statuses(pool)
        if condition(statuses):
            return statuses
        await asyncio.sleep(0.05)
    pytest.fail(f"the outbox never reached the expected state: {await outbox_statuses(pool)}")


async def database_versions(pool: Pool) -> dict[str, int]:
    async with pool.connection() as conn:
        cur = await conn.execute("select id, version from public.certifications")
        return {str(r["id"]): cast(int, r["version"]) for r in await cur.fetchall()}


def portal_versions(sandbox: SandboxServer) -> dict[str, int]:
    held = sandbox.sandbox.snapshot()["certifications"]
    return {cert_id: int(body["certification"]["version"]) for cert_id, body in held.items()}


async def test_a_worker_killed_mid_delivery_loses_nothing_and_a_second_worker_finishes(
    pool: Pool, sandbox: SandboxServer, start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    certs = await seed_certifications(pool, 40)
    # A short lease, so the dead worker's claims are rescued by a real expiry, not by hand.
    first = start_worker("--concurrency", "8", env={"CERTSYNC_WORKER_LEASE_SECONDS": "2"})
    await wait_until(pool, lambda s: s.get("delivered", 0) >= 8 and s.get("in_flight", 0) > 0)

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)

    statuses = await outbox_statuses(pool)
    assert statuses.get("in_flight", 0) > 0, "the kill should land while deliveries are in flight"
    # Changes keep coming while no worker runs.
    await set_status(pool, certs[:5], "suspended")
    # The dead worker's claims stay theirs until their lease runs out.
    await asyncio.sleep(2.5)

    second = start_worker("--once", "--concurrency", "8")
    assert second.wait(timeout=60) == 0

    assert "in_flight" not in (final := await outbox_statuses(pool))
    assert "waiting" not in final
    assert portal_versions(sandbox) == await database_versions(pool)


async def test_sigterm_stops_a_running_worker_promptly_and_hands_back_what_it_held(
    pool: Pool, start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    await seed_certifications(pool, 40)
    worker = start_worker("--concurrency", "4")
    await wait_until(pool, lambda s: s.get("in_flight", 0) > 0)

    stopped_at = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(timeout=15)

    assert code == 0
    assert time.monotonic() - stopped_at < 5.0
    statuses = await outbox_statuses(pool)
    assert "in_flight" not in statuses
    assert statuses.get("delivered", 0) + statuses.get("waiting", 0) == 40


async def test_metrics_port_serves_prometheus_metrics_while_the_worker_runs(
    pool: Pool, start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    await seed_certifications(pool, 3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = start_worker("--metrics-port", str(port))
    await wait_until(pool, lambda s: s.get("delivered", 0) == 3)
    body = ""
    async with httpx.AsyncClient(timeout=2.0) as http:
        for _ in range(100):
            try:
                body = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                break
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0
    assert "certsync_breaker_state" in body, body[:2000]
    assert "certsync_outbox_events" in body
    assert "certsync_worker_events" in body
