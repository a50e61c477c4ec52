"""Prometheus metrics: gauges read from the database at scrape time (the same from every process),
counters of this process fed from its log events, and the worker's own endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from certsync.app import Runtime, open_runtime
from certsync.console import create_console_app
from certsync.logs import configure_logging
from certsync.metrics import (
    ProcessMetrics,
    SystemStatusCollector,
    start_worker_metrics,
)
from certsync.resilience.instrumentation import (
    AttemptFailed,
    CircuitTransitioned,
    DeliveryFinished,
    RequestFinished,
    RetryScheduled,
)
from certsync.sandbox.faults import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from certsync.worker import WorkerOptions
from tests.support.console import BASE, console_settings, failed_deliveries
from tests.support.runtime import FAST
from tests.support.seed import seed_certifications

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from an exposition, via the official parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For a test that reconfigures the process's logging: put it back afterwards."""
    before = structlog.get_config()
    yield
    structlog.configure(**before)


@pytest.fixture
async def runtime(database_url: str, sandbox: SandboxServer) -> AsyncIterator[Runtime]:
    async with open_runtime(console_settings(database_url, sandbox)) as rt:
        yield rt


async def scrape_console(runtime: Runtime) -> str:
    app = create_console_app(runtime, runtime.settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


async def test_the_console_reports_queue_sizes_by_status_and_the_oldest_pending_age(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    await failed_deliveries(pool, runtime, sandbox, count=2)
    text = await scrape_console(runtime)
    assert value(text, "certsync_retry_queue_entries", status="pending") == 2
    assert value(text, "certsync_retry_queue_entries", status="replayed") == 0
    age = value(text, "certsync_retry_queue_oldest_pending_age_seconds")
    assert age is not None
    assert 0 <= age < 120
    assert value(text, "certsync_database_up") == 1


async def test_the_console_reports_the_outbox_backlog_and_its_oldest_event_age(
    pool: Pool, runtime: Runtime
) -> None:
    await seed_certifications(pool, 4)
    text = await scrape_console(runtime)
    assert value(text, "certsync_outbox_events", status="waiting") == 4
    assert value(text, "certsync_outbox_events", status="in_flight") == 0
    assert (value(text, "certsync_outbox_oldest_event_age_seconds") or -1) >= 0


async def test_the_time_of_the_last_delivery_is_the_last_delivered_events(
    pool: Pool, runtime: Runtime
) -> None:
    assert value(await scrape_console(runtime), "certsync_last_delivery_timestamp_seconds") is None
    await seed_certifications(pool, 3)
    await runtime.worker(FAST, listen=False).run(once=True)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select extract(epoch from max(closed_at))::float8 as at from public.certification_sync_events"
        )
        row = await cur.fetchone()
    assert row is not None
    text = await scrape_console(runtime)
    assert value(text, "certsync_last_delivery_timestamp_seconds") == pytest.approx(row["at"])
    assert value(text, "certsync_deliveries_last_hour") == 3


async def test_the_breaker_state_is_the_shared_one(runtime: Runtime) -> None:
    for _ in range(runtime.breaker.failure_threshold):
        await runtime.breaker.record_failure("503 Service Unavailable")
    text = await scrape_console(runtime)
    assert value(text, "certsync_breaker_state", state="open") == 1
    assert value(text, "certsync_breaker_state", state="closed") == 0
    assert value(text, "certsync_breaker_consecutive_failures") == runtime.breaker.failure_threshold
    assert value(text, "certsync_breaker_opened_timestamp_seconds") is not None


async def test_two_processes_report_the_same_shared_gauges(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, database_url: str
) -> None:
    await failed_deliveries(pool, runtime, sandbox)
    await seed_certifications(pool, 2)
    async with open_runtime(console_settings(database_url, sandbox)) as other:
        first, second = await scrape_console(runtime), await scrape_console(other)
    shared = (
        "certsync_retry_queue_entries",
        "certsync_outbox_events",
        "certsync_breaker_state",
        "certsync_deliveries_last_hour",
    )

    def gauges(text: str) -> dict[Any, float]:
        return {k: v for k, v in samples(text).items() if k[0] in shared}

    assert gauges(first) == gauges(second)
    assert gauges(first)


def test_a_scrape_that_cannot_read_the_database_says_so_instead_of_failing() -> None:
    def unreachable() -> Any:
        raise OSError("connection refused")

    registry = CollectorRegistry()
    registry.register(SystemStatusCollector(unreachable))
    text = generate_latest(registry).decode()
    assert value(text, "certsync_database_up") == 0
    assert "certsync_retry_queue_entries" not in text


async def test_attempts_retries_latency_and_outcomes_are_counted_from_delivery_events(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    metrics = ProcessMetrics()
    runtime.instrumentation.add(metrics.observe)
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=2, scope="put"),)))
    await seed_certifications(pool, 1)
    await runtime.worker(FAST, listen=False).run(once=True)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "certsync_dynamics_attempts_total", outcome="transient") == 2
    assert value(text, "certsync_dynamics_attempts_total", outcome="delivered") == 1
    assert value(text, "certsync_dynamics_retries_total") == 2
    assert value(text, "certsync_deliveries_total", outcome="delivered") == 1
    assert (
        value(text, "certsync_dynamics_request_duration_seconds_count", method="PUT", status_class="5xx") == 2
    )
    assert (
        value(text, "certsync_dynamics_request_duration_seconds_count", method="PUT", status_class="2xx") == 1
    )


async def test_queued_deliveries_and_breaker_transitions_are_counted(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    metrics = ProcessMetrics()
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=None, scope="put"),)))
    await seed_certifications(pool, 1)
    settings = console_settings(database_url, sandbox, breaker_failure_threshold=3)
    async with open_runtime(settings) as rt:
        rt.instrumentation.add(metrics.observe)
        await rt.worker(FAST, listen=False).run(once=True)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "certsync_deliveries_total", outcome="pending") == 1
    assert value(text, "certsync_breaker_transitions_total", from_state="closed", to_state="open") == 1


async def test_adding_the_hook_twice_counts_each_event_once(pool: Pool, runtime: Runtime) -> None:
    metrics = ProcessMetrics()
    runtime.instrumentation.add(metrics.observe)
    runtime.instrumentation.add(metrics.observe)
    await seed_certifications(pool, 1)
    await runtime.worker(FAST, listen=False).run(once=True)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "certsync_dynamics_attempts_total", outcome="delivered") == 1


async def test_the_worker_serves_shared_gauges_and_its_own_tallies_on_its_port(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    await failed_deliveries(pool, runtime, sandbox)
    await seed_certifications(pool, 2)
    worker = runtime.worker(WorkerOptions(poll_seconds=0.1), listen=False)
    server = start_worker_metrics(0, runtime, worker, host="127.0.0.1")
    try:
        await worker.run(once=True)
        # The scrape runs in its own thread and waits for the worker's loop: never block that loop.
        response = await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{server.port}/metrics", timeout=10)
    finally:
        server.stop()
    text = response.text
    assert value(text, "certsync_database_up") == 1
    assert value(text, "certsync_retry_queue_entries", status="pending") == 1
    assert value(text, "certsync_worker_events_total", kind="delivered") == 2
    assert value(text, "certsync_dynamics_attempts_total", outcome="delivered") == 2


async def test_metrics_still_count_when_logging_is_at_warning_level(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, restore_logging: None
) -> None:
    """Nothing is counted from log lines: at warning level the info lines are dropped, the counts are not."""
    configure_logging("json", "warning")
    metrics = ProcessMetrics()
    runtime.instrumentation.add(metrics.observe)
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=1, scope="put"),)))
    await seed_certifications(pool, 2)
    await runtime.worker(FAST, listen=False).run(once=True)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "certsync_deliveries_total", outcome="delivered") == 2
    assert value(text, "certsync_dynamics_attempts_total", outcome="delivered") == 2
    assert value(text, "certsync_dynamics_retries_total") == 1  # retry_scheduled is an info line
    count = value(text, "certsync_dynamics_request_duration_seconds_count", method="PUT", status_class="2xx")
    assert count == 2


def test_each_delivery_event_is_counted_under_its_own_metric() -> None:
    metrics = ProcessMetrics()
    for event in (
        RequestFinished("PUT", 204, 0.005),
        RequestFinished("PUT", 503, 0.005),
        RequestFinished("POST", 200, 0.005),
        RequestFinished("PUT", None, 0.001),
        AttemptFailed("TransientDynamicsError"),
        AttemptFailed("RateLimitedError"),
        AttemptFailed("SomethingElse"),
        RetryScheduled(1, 2.0),
        DeliveryFinished("delivered", 2),
        DeliveryFinished("pending", 4),
        CircuitTransitioned("closed", "open"),
    ):
        metrics.observe(event)
    text = generate_latest(metrics.registry).decode()
    assert value(text, "certsync_dynamics_attempts_total", outcome="delivered") == 1
    assert value(text, "certsync_dynamics_attempts_total", outcome="transient") == 1
    assert value(text, "certsync_dynamics_attempts_total", outcome="rate_limited") == 1
    assert value(text, "certsync_dynamics_attempts_total", outcome="error") == 1
    assert value(text, "certsync_deliveries_total", outcome="delivered") == 1
    assert value(text, "certsync_deliveries_total", outcome="pending") == 1
    assert value(text, "certsync_dynamics_retries_total") == 1
    assert value(text, "certsync_breaker_transitions_total", from_state="closed", to_state="open") == 1
    histogram = "certsync_dynamics_request_duration_seconds_count"
    for method, status_class in (("PUT", "2xx"), ("PUT", "5xx"), ("POST", "2xx"), ("PUT", "error")):
        assert value(text, histogram, method=method, status_class=status_class) == 1
