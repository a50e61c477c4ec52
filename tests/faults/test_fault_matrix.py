"""The fault matrix: every way the portal can fail, against the real sandbox and real PostgreSQL.

For each fault: the documented end state (docs/contract-v1.md, interface section 4), the log events the
worker emits (its JSON log, captured), and then recovery — the portal heals, the outbox drains, the
retry queue is replayed — after which nothing is lost (``assert_nothing_lost``) and no log line leaked a
name, an email, a token or a secret. Every request is signed, so the signing secret is checked too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from certsync.app import Runtime, open_runtime
from certsync.resilience.breaker import CircuitState
from certsync.sandbox.faults import FaultScript, FaultStep, Latency
from certsync.sandbox.server import SandboxServer
from certsync.sandbox.state import RecordedRequest, SandboxConfig
from certsync.store.pool import Pool
from certsync.store.retry_queue import RetryEntrySummary
from certsync.worker import SyncWorker, WorkerOptions, WorkerStats
from tests.faults.conftest import (
    CLIENT_SECRET,
    SIGNING_SECRET,
    STATIC_TOKEN,
    JsonLogCapture,
    RecordingTransport,
    assert_no_leaks,
    assert_nothing_lost,
    personal_data,
    seed_mentors,
)
from tests.support.runtime import puts, settings_for, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ONE_AT_A_TIME = WorkerOptions(
    concurrency=1, poll_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=10, shutdown_grace_seconds=10
)
SEVERAL = WorkerOptions(
    concurrency=4, poll_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=10, shutdown_grace_seconds=10
)
COOLDOWN = 0.5


@pytest.fixture
def signed_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(signing_secret=SIGNING_SECRET)) as server:
        yield server


@dataclass
class FaultRun:
    """One runtime against the sandbox, its HTTP recorded and its JSON log captured."""

    pool: Pool
    runtime: Runtime
    portal: SandboxServer
    transport: RecordingTransport
    logs: JsonLogCapture

    async def deliver(self, options: WorkerOptions = SEVERAL) -> WorkerStats:
        return await self.runtime.worker(options, listen=False).run(once=True)

    def puts(self) -> list[RecordedRequest]:
        return puts(self.portal)

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.logs.events(event) if all(e.get(k) == v for k, v in fields.items())]

    async def queue(self) -> list[RetryEntrySummary]:
        return await self.runtime.queue.list_entries(limit=1000)

    async def recover_and_verify(self) -> None:
        """The portal heals; the outbox drains and the retry queue is replayed; then nothing is lost and
        no log line leaks."""
        self.portal.sandbox.load_faults(FaultScript())
        self.portal.sandbox.set_contract_versions((1,))
        if (await self.runtime.breaker.snapshot()).state is not CircuitState.CLOSED:
            await asyncio.sleep(COOLDOWN + 0.1)
        await self.deliver()
        replay = self.runtime.replay_service()
        for status in ("pending", "requires_investigation"):
            summary = await replay.replay_all(status=status, by="fault-suite")
            assert summary.failed == 0, summary
        await assert_nothing_lost(self.pool, self.portal)
        forbidden = await personal_data(self.pool) | self.transport.tokens
        assert_no_leaks(self.logs.lines, forbidden | {STATIC_TOKEN, CLIENT_SECRET, SIGNING_SECRET})


OpenRun = Callable[..., AbstractAsyncContextManager[FaultRun]]


@pytest.fixture
def fault_run(
    pool: Pool, database_url: str, signed_sandbox: SandboxServer, json_logs: JsonLogCapture
) -> OpenRun:
    @asynccontextmanager
    async def open_run(**overrides: Any) -> AsyncIterator[FaultRun]:
        values: dict[str, Any] = {
            "dynamics_signing_secret": SIGNING_SECRET,
            "breaker_failure_threshold": 50,  # tests of other faults keep the circuit closed
            "breaker_cooldown": COOLDOWN,
        }
        settings = settings_for(database_url, signed_sandbox, **(values | overrides))
        transport = RecordingTransport()
        async with open_runtime(settings, transport=transport) as runtime:
            yield FaultRun(pool, runtime, signed_sandbox, transport, json_logs)

    return open_run


async def test_a_503_storm_opens_the_circuit_after_three_calls_and_the_backlog_waits_in_the_outbox(
    fault_run: OpenRun,
) -> None:
    async with fault_run(breaker_failure_threshold=3) as run:
        run.portal.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=None, scope="put"),)))
        await seed_mentors(run.pool, mentors=5, certifications_each=2)

        stats = await run.deliver(ONE_AT_A_TIME)

        assert len(run.puts()) == 3, "no call is made once the circuit is open"
        assert (await run.runtime.breaker.snapshot()).state is CircuitState.OPEN
        assert (stats.delivered, stats.queued_pending) == (0, 1)
        [entry] = await run.queue()
        assert (entry.status, entry.attempt_count) == ("pending", 3)
        assert "circuit opened after 3 attempt(s)" in entry.failure_reason
        assert len(run.logged("dynamics_attempt", status=503)) == 3
        assert run.logged("circuit_transition", new_state="open")
        assert run.logged("delivery_queued", queue_status="pending")
        await run.recover_and_verify()
        assert run.logged("circuit_transition", new_state="closed")


async def test_a_429_with_retry_after_pauses_all_sending_for_that_long_then_everything_is_delivered(
    fault_run: OpenRun,
) -> None:
    async with fault_run() as run:
        script = FaultScript(steps=(FaultStep(status=429, retry_after=1, times=1, scope="put"),))
        run.portal.sandbox.load_faults(script)
        await seed_mentors(run.pool, mentors=3)

        stats = await run.deliver(ONE_AT_A_TIME)

        assert (stats.delivered, stats.queued_pending) == (3, 0)
        limited, *rest = run.puts()
        assert limited.status == 429
        assert (rest[0].at - limited.at).total_seconds() >= 1.0, "the next call waits for Retry-After"
        assert run.logged("dynamics_attempt", status=429, outcome="RateLimitedError")
        assert [e["seconds"] for e in run.logged("sending_paused")] == [1.0]
        assert not run.logged("retry_scheduled"), "a 429 pauses its attempt; it uses up no retry"
        assert await run.queue() == []
        await run.recover_and_verify()


async def test_timeouts_are_retried_then_queued_pending_and_delivered_by_replay(fault_run: OpenRun) -> None:
    async with fault_run(http_timeout=0.3, retry_max_retries=1) as run:
        run.portal.sandbox.load_faults(FaultScript(latency=Latency(min_ms=900, scope="put")))
        await seed_mentors(run.pool, mentors=1, certifications_each=2)

        stats = await run.deliver()

        assert (stats.delivered, stats.queued_pending) == (0, 2)
        entries = await run.queue()
        assert {(e.status, e.attempt_count) for e in entries} == {("pending", 2)}
        assert all("timeout: ReadTimeout" in e.failure_reason for e in entries)
        assert len(run.logged("dynamics_request", error="ReadTimeout")) == 4
        assert len(run.logged("delivery_queued", queue_status="pending")) == 2
        await run.recover_and_verify()


async def test_dropped_connections_are_retried_and_the_change_is_delivered(fault_run: OpenRun) -> None:
    async with fault_run() as run:
        run.portal.sandbox.load_faults(FaultScript(steps=(FaultStep(drop=True, times=2, scope="put"),)))
        await seed_mentors(run.pool, mentors=1)

        stats = await run.deliver(ONE_AT_A_TIME)

        assert stats.delivered == 1
        assert [r.fault for r in run.puts()] == ["drop", "drop", None]
        dropped = [e for e in run.logs.events("dynamics_request") if "error" in e]
        assert len(dropped) == 2
        assert {e["error"] for e in dropped} <= {"RemoteProtocolError", "ReadError"}
        assert len(run.logged("retry_scheduled")) == 2
        await run.recover_and_verify()


async def test_an_empty_or_malformed_2xx_body_is_a_delivery_because_any_2xx_is_delivered(
    fault_run: OpenRun,
) -> None:
    # The sandbox only answers well-formed bodies; the transport replaces what the real server sent.
    async with fault_run() as run:
        run.transport.success_bodies = [(200, b""), (200, b"<html>oops"), (204, b""), (200, b'{"applied":')]
        await seed_mentors(run.pool, mentors=4)

        stats = await run.deliver()

        assert run.transport.replaced == 4
        assert (stats.delivered, stats.crashed) == (4, 0)
        delivered = [e for e in run.logged("dynamics_request", method="PUT") if e.get("status") in (200, 204)]
        assert len(delivered) == 4
        assert await run.queue() == []
        await run.recover_and_verify()


async def test_an_expired_oauth2_token_is_refetched_once_and_nothing_fails(
    fault_run: OpenRun, signed_sandbox: SandboxServer
) -> None:
    oauth2 = {
        "dynamics_token_url": f"{signed_sandbox.url}/oauth2/token",
        "dynamics_client_id": "certsync",
        "dynamics_client_secret": CLIENT_SECRET,
    }
    async with fault_run(**oauth2) as run:
        # One worker throughout: a new one would fetch a token of its own and never see the 401.
        stop = asyncio.Event()
        worker = run.runtime.worker(SEVERAL, listen=False)
        running = asyncio.create_task(worker.run(stop))
        await seed_mentors(run.pool, mentors=2)
        await wait_until(lambda: _delivered(worker, 2), "the first two deliveries", 10, every=0.05)
        assert run.portal.sandbox.expire_tokens() == 1
        await seed_mentors(run.pool, mentors=2)
        await wait_until(lambda: _delivered(worker, 4), "two more after the token expired", 10, every=0.05)
        stop.set()
        stats = await running

        assert (stats.delivered, stats.queued_pending) == (4, 0)
        outcomes = [r.outcome for r in run.portal.sandbox.requests()]
        assert outcomes.count("token_issued") == 2, "one token, then exactly one refetch"
        assert "invalid_token" in outcomes
        assert run.logged("dynamics_request", status=401)
        assert (await run.runtime.breaker.snapshot()).consecutive_failures == 0
        assert len(run.transport.tokens) == 2
        await run.recover_and_verify()


async def _delivered(worker: SyncWorker, count: int) -> bool:
    return worker.stats.delivered >= count


async def test_a_permanent_4xx_goes_to_requires_investigation_without_a_retry(fault_run: OpenRun) -> None:
    async with fault_run() as run:
        run.portal.sandbox.load_faults(FaultScript(steps=(FaultStep(status=422, times=1, scope="put"),)))
        await seed_mentors(run.pool, mentors=3)

        stats = await run.deliver(ONE_AT_A_TIME)

        assert (stats.delivered, stats.queued_investigation) == (2, 1)
        [entry] = await run.queue()
        assert (entry.status, entry.attempt_count) == ("requires_investigation", 1)
        assert len(run.puts()) == 3, "the refused request is not retried"
        assert run.logged("dynamics_attempt", status=422, outcome="PermanentDynamicsError")
        assert run.logged("delivery_queued", queue_status="requires_investigation")
        assert not run.logged("retry_scheduled")
        await run.recover_and_verify()


async def test_a_contract_version_change_sends_every_change_to_investigation_and_keeps_the_circuit_closed(
    fault_run: OpenRun,
) -> None:
    async with fault_run() as run:
        run.portal.sandbox.set_contract_versions((2,))
        await seed_mentors(run.pool, mentors=3)

        stats = await run.deliver()

        assert (stats.delivered, stats.queued_investigation) == (0, 3)
        entries = await run.queue()
        assert {e.status for e in entries} == {"requires_investigation"}
        assert all("contract v1 not accepted (portal accepts 2)" in e.failure_reason for e in entries)
        assert (await run.runtime.breaker.snapshot()).state is CircuitState.CLOSED
        assert len(run.logged("dynamics_attempt", status=409, outcome="ContractMismatchError")) == 3
        await run.recover_and_verify()
