"""Prometheus metrics: the shared truth read from the database at scrape time, plus this process's rates.

Two sources, so that N workers and a console never disagree about the state of the system:

* ``SystemStatusCollector`` — gauges read from PostgreSQL when scraped (breaker state, outbox depth
  and oldest event age, retry-queue size by status and oldest ``pending`` age, deliveries in the last
  hour, time of the last delivery). Every process reports the same numbers; alert on any one of them.
* ``ProcessMetrics`` — counters and a latency histogram of what *this* process did, fed by the
  delivery events of ``certsync.resilience.instrumentation`` (a hook on the runtime's
  ``Instrumentation``: every HTTP exchange, failed attempt, retry, finished delivery and circuit
  transition); sum them across processes with PromQL. They count whatever the log level.
  The last finished reconcile's verdict (``certsync_reconcile_mismatches{kind}``, its finish time)
  comes from ``reconcile_runs`` the same way.
* ``WorkerStatsCollector`` — the worker's own tallies (superseded, held, rescued, …) from ``WorkerStats``.

``/metrics`` on the console serves all of them; ``start_worker_metrics`` serves them for a worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from certsync.app import Runtime
from certsync.delivery.queue import QUEUE_STATUSES
from certsync.delivery.reconcile import KINDS
from certsync.delivery.status import SystemStatus, read_system_status
from certsync.resilience.breaker import CircuitState
from certsync.resilience.instrumentation import (
    AttemptFailed,
    AutoReplayFinished,
    CircuitTransitioned,
    DeliveryEvent,
    DeliveryFinished,
    RequestFinished,
    RetryScheduled,
)
from certsync.worker import SyncWorker, WorkerStats

__all__ = [
    "CONTENT_TYPE",
    "MetricsServer",
    "ProcessMetrics",
    "SystemStatusCollector",
    "WorkerStatsCollector",
    "render_metrics",
    "start_worker_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = structlog.get_logger(__name__)

# Seconds: a healthy portal answers in tens of milliseconds; the tail reaches the request timeout.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_ATTEMPT_OUTCOMES = {
    "TransientDynamicsError": "transient",
    "RateLimitedError": "rate_limited",
    "AuthenticationError": "unauthorized",
    "PermanentDynamicsError": "refused",
}


class ProcessMetrics:
    """What this process did, counted from its delivery events (``observe`` is an instrumentation hook).

    Each instance owns its registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.deliveries = Counter(
            "certsync_deliveries",
            "Delivery operations finished by this process, by outcome"
            " (delivered, pending, requires_investigation); replays included.",
            ["outcome"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "certsync_dynamics_attempts",
            "Calls to the portal made by this process, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "certsync_dynamics_retries", "Retries scheduled by this process.", registry=self.registry
        )
        self.request_seconds = Histogram(
            "certsync_dynamics_request_duration_seconds",
            "Time to an answer (or a transport failure) from the portal or its token endpoint.",
            ["method", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.transitions = Counter(
            "certsync_breaker_transitions",
            "Circuit breaker transitions observed by this process.",
            ["from_state", "to_state"],
            registry=self.registry,
        )
        self.auto_replays = Counter(
            "certsync_auto_replays",
            "Pending retry-queue entries this worker replayed by itself, by outcome (replayed, failed,"
            " exhausted, requires_investigation, refused, skipped).",
            ["outcome"],
            registry=self.registry,
        )

    def observe(self, event: DeliveryEvent) -> None:
        """Count one delivery event: the hook this process's ``Instrumentation`` calls."""
        match event:
            case AttemptFailed(error=error):
                self.attempts.labels(_ATTEMPT_OUTCOMES.get(error, "error")).inc()
            case DeliveryFinished(outcome=outcome):
                self.deliveries.labels(outcome).inc()
                if outcome == "delivered":
                    self.attempts.labels("delivered").inc()
            case RetryScheduled():
                self.retries.inc()
            case RequestFinished(method=method, status=status, seconds=seconds):
                status_class = f"{status // 100}xx" if status is not None else "error"
                self.request_seconds.labels(method, status_class).observe(seconds)
            case CircuitTransitioned(old=old, new=new):
                self.transitions.labels(old, new).inc()
            case AutoReplayFinished(outcome=outcome):
                self.auto_replays.labels(outcome).inc()


def _seconds(value: Any) -> float:
    return float(value.total_seconds())


class SystemStatusCollector(Collector):
    """Gauges from the database, read when scraped. ``certsync_database_up`` is 0 when that read fails."""

    def __init__(self, read: Callable[[], SystemStatus]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("certsync_database_up", "1 when the scrape could read the shared state.")
        try:
            status = self._read()
        except Exception as exc:  # any failure to read is what this gauge reports
            log.warning("metrics_status_unavailable", error=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _status_metrics(status)


def _status_metrics(status: SystemStatus) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "certsync_breaker_state", "1 for the shared circuit breaker's current state.", labels=["state"]
    )
    for candidate in CircuitState:
        state.add_metric([candidate.value], 1 if status.breaker.state is candidate else 0)
    yield state
    yield _gauge(
        "certsync_breaker_consecutive_failures",
        "Consecutive failed calls counted by the breaker.",
        status.breaker.consecutive_failures,
    )
    if status.breaker.opened_at is not None:
        yield _gauge(
            "certsync_breaker_opened_timestamp_seconds",
            "When the current outage opened the circuit.",
            status.breaker.opened_at.timestamp(),
        )
    outbox = GaugeMetricFamily(
        "certsync_outbox_events", "Outbox events not yet delivered, by status.", labels=["status"]
    )
    outbox.add_metric(["waiting"], status.outbox.waiting)
    outbox.add_metric(["in_flight"], status.outbox.in_flight)
    yield outbox
    yield _gauge(
        "certsync_outbox_oldest_event_age_seconds",
        "Age of the oldest undelivered outbox event; 0 if none.",
        _seconds(status.oldest_outbox_age) if status.oldest_outbox_age else 0.0,
    )
    queue = GaugeMetricFamily(
        "certsync_retry_queue_entries", "Retry queue entries by status.", labels=["status"]
    )
    for queue_status in QUEUE_STATUSES:
        queue.add_metric([queue_status], status.queue_count(queue_status).entries)
    yield queue
    yield _gauge(
        "certsync_retry_queue_oldest_pending_age_seconds",
        "Age of the oldest entry waiting for manual replay; 0 if none.",
        _seconds(status.oldest_pending_age) if status.oldest_pending_age else 0.0,
    )
    yield _gauge(
        "certsync_deliveries_last_hour",
        "Outbox events delivered in the hour before the scrape.",
        status.delivered_last_hour,
    )
    if status.last_delivered_at is not None:
        yield _gauge(
            "certsync_last_delivery_timestamp_seconds",
            "When the last outbox event was delivered (absent until the first delivery).",
            status.last_delivered_at.timestamp(),
        )
    yield from _reconcile_metrics(status)
    yield from _worker_metrics(status)


def _reconcile_metrics(status: SystemStatus) -> Iterator[Metric]:
    """The last finished reconcile's verdict, from ``reconcile_runs``: absent until one has finished."""
    run = status.last_reconcile
    if run is None:
        return
    mismatches = GaugeMetricFamily(
        "certsync_reconcile_mismatches",
        "Mismatches between the portal's listing and the database's found by the last finished reconcile,"
        " by kind.",
        labels=["kind"],
    )
    for kind in KINDS:
        mismatches.add_metric([str(kind)], run.counts.get(str(kind), 0))
    yield mismatches
    yield _gauge(
        "certsync_reconcile_last_finished_timestamp_seconds",
        "When the last reconcile that reached a verdict finished (a failed one does not count).",
        run.finished_at.timestamp(),
    )


def _worker_metrics(status: SystemStatus) -> Iterator[Metric]:
    """Is any worker alive? From ``worker_heartbeats``, so a process that is not a worker (the console)
    can say so when every worker is down."""
    workers = status.workers
    if workers is None:
        return
    yield _gauge(
        "certsync_workers_alive",
        "Workers whose heartbeat is under a minute old (and that did not stop).",
        workers.alive,
    )
    if workers.last_beat_at is not None:
        yield _gauge(
            "certsync_worker_last_heartbeat_timestamp_seconds",
            "The most recent heartbeat of a running worker (absent when none runs or ever ran).",
            workers.last_beat_at.timestamp(),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """One unlabelled gauge with its value."""
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


class WorkerStatsCollector(Collector):
    """One worker's tallies since it started, as counters labelled by kind."""

    def __init__(self, stats: Callable[[], WorkerStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        family = CounterMetricFamily(
            "certsync_worker_events", "What this worker did since it started, by kind.", labels=["kind"]
        )
        for field in fields(stats):
            value = getattr(stats, field.name)
            if isinstance(value, int):
                family.add_metric([field.name], value)
        yield family
        yield _gauge(
            "certsync_worker_start_timestamp_seconds",
            "When this worker started.",
            stats.started_at.timestamp(),
        )


def render_metrics(*registries: Collector) -> bytes:
    """The text exposition of several registries (their metric names do not overlap)."""
    return b"".join(generate_latest(registry) for registry in registries)


@dataclass(slots=True)
class MetricsServer:
    """The worker's metrics endpoint, served by prometheus-client in a daemon thread."""

    port: int
    _stop: Callable[[], None]

    def stop(self) -> None:
        self._stop()


def start_worker_metrics(
    port: int,
    runtime: Runtime,
    worker: SyncWorker,
    *,
    host: str = "0.0.0.0",  # noqa: S104  (an exporter is scraped from another host or container)
    read_timeout: float = 5.0,
) -> MetricsServer:
    """Serve ``/metrics`` for ``certsync worker --metrics-port``; call from the worker's event loop.

    The gauges are read on the worker's own loop and pool (the scrape thread waits for them at most
    ``read_timeout`` seconds), so the numbers are the database's, as every other process reports them.
    """
    loop = asyncio.get_running_loop()
    metrics = ProcessMetrics()
    runtime.instrumentation.add(metrics.observe)

    def read() -> SystemStatus:
        future = asyncio.run_coroutine_threadsafe(
            read_system_status(runtime.pool, runtime.breaker, runtime.clock.now()), loop
        )
        return future.result(timeout=read_timeout)

    metrics.registry.register(SystemStatusCollector(read))
    metrics.registry.register(WorkerStatsCollector(lambda: worker.stats))
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5.0)

    log.info("metrics_listening", host=host, port=server.server_port)
    return MetricsServer(port=int(server.server_port), _stop=stop)
