"""Retry wrapper overhead on the success path: ``HLFDynamicsSyncService.deliver`` against tenacity
(for-loop and decorator), stamina and backoff, each around the same no-op async call.

Ours is the production wrapper, so its figure includes what the peers do not do: the shared send gate,
the circuit breaker (in-process store) before and after the attempt, and the structured log line of
the attempt. It is measured twice: with the production log level (info, rendered to /dev/null) and
with info filtered out (warning), so the cost of logging is visible on its own.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, date, datetime
from time import perf_counter

import backoff
import stamina
from tenacity import AsyncRetrying, retry, stop_after_attempt, wait_exponential

from bench import Options, best, calls_of, interleaved, median, micro, ratio
from bench._report import Report
from certsync.dynamics.client import DeliveryReceipt
from certsync.dynamics.contract import CertificationState, CertificationUpsert
from certsync.dynamics.sync_service import DeliveryFailure, HLFDynamicsSyncService
from certsync.logs import configure_logging
from certsync.resilience.breaker import DynamicsCircuitBreaker, InMemoryBreakerStore
from certsync.resilience.clock import SystemClock, real_sleep
from certsync.resilience.retry import RetryPolicy

TARGET_SECONDS = 1e-6
ATTEMPTS = 4  # the first attempt and CERTSYNC_RETRY_MAX_RETRIES=3, for every contender


async def noop() -> None:
    return None


class NoopPortal:
    """A ``PortalClient`` whose upsert returns at once: only the wrapper's cost remains."""

    def __init__(self) -> None:
        self._receipt = DeliveryReceipt(status=200, elapsed_seconds=0.0)

    async def upsert_certification(self, body: CertificationUpsert) -> DeliveryReceipt:
        return self._receipt


class NoFailures:
    async def record(self, failure: DeliveryFailure) -> None:
        raise AssertionError("the success path records no failure")


def request() -> CertificationUpsert:
    state = CertificationState(
        id=uuid.uuid4(),
        peer_mentor_id=uuid.uuid4(),
        certification_type="peer_mentor",
        status="active",
        valid_from=date(2025, 11, 1),
        valid_until=date(2026, 11, 1),
        version=7,
    )
    return CertificationUpsert.for_state(
        uuid.uuid4(), datetime(2026, 11, 29, tzinfo=UTC), state, date(2026, 11, 29)
    )


def certsync_service() -> HLFDynamicsSyncService:
    clock = SystemClock()
    return HLFDynamicsSyncService(
        NoopPortal(),
        RetryPolicy(max_retries=ATTEMPTS - 1),
        DynamicsCircuitBreaker("bench", InMemoryBreakerStore(), clock),
        NoFailures(),
        clock=clock,
        sleep=real_sleep,
    )


def certsync_body(level: str) -> object:
    service = certsync_service()
    body_request = request()
    devnull = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the benchmark)

    async def body(n: int) -> float:
        configure_logging("json", level, stream=devnull)
        started = perf_counter()
        for _ in range(n):
            await service.deliver(body_request, operation_type="certification.updated")
        return perf_counter() - started

    return body


def portal_call_body() -> object:
    portal, body_request = NoopPortal(), request()
    return calls_of(lambda: portal.upsert_certification(body_request))


async def tenacity_loop(n: int) -> float:
    started = perf_counter()
    for _ in range(n):
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS), wait=wait_exponential(multiplier=2), reraise=True
        ):
            with attempt:
                await noop()
    return perf_counter() - started


@retry(stop=stop_after_attempt(ATTEMPTS), wait=wait_exponential(multiplier=2), reraise=True)
async def tenacity_decorated() -> None:
    return None


@stamina.retry(on=Exception, attempts=ATTEMPTS, wait_initial=2.0)
async def stamina_decorated() -> None:
    return None


@backoff.on_exception(backoff.expo, Exception, max_tries=ATTEMPTS)
async def backoff_decorated() -> None:
    return None


OURS_INFO = "certsync deliver(), log level info (production)"
OURS_WARNING = "certsync deliver(), info filtered (warning)"


def run(options: Options) -> Report:
    rounds, calls = (5, 5_000) if options.quick else (11, 30_000)
    bodies = {
        "bare await noop()": calls_of(noop),
        "bare await portal.upsert_certification()": portal_call_body(),
        OURS_INFO: certsync_body("info"),
        OURS_WARNING: certsync_body("warning"),
        "tenacity AsyncRetrying (async for)": tenacity_loop,
        "tenacity @retry": calls_of(tenacity_decorated),
        "stamina @retry": calls_of(stamina_decorated),
        "backoff @on_exception": calls_of(backoff_decorated),
    }
    samples = interleaved(bodies, rounds=rounds, calls=calls, warmup=1_000)  # type: ignore[arg-type]
    configure_logging("json", "info", stream=open(os.devnull, "w"))  # noqa: SIM115
    noop_base = best(samples["bare await noop()"])
    portal_base = best(samples["bare await portal.upsert_certification()"])
    contenders = [name for name in bodies if not name.startswith("bare")]
    overhead = {
        name: best(samples[name]) - (portal_base if name.startswith("certsync") else noop_base)
        for name in contenders
    }
    ours = overhead[OURS_INFO]
    rows = [
        (
            name,
            micro(best(samples[name])),
            micro(median(samples[name])),
            micro(overhead[name]),
            ratio(overhead[name], ours),
        )
        for name in sorted(contenders, key=overhead.__getitem__)
    ]
    rows += [
        ("bare await noop() (peers' baseline)", micro(noop_base), "", "", ""),
        ("bare await portal.upsert_certification() (ours)", micro(portal_base), "", "", ""),
    ]
    report = Report(
        name="retry",
        title="Retry wrapper overhead, success path",
        method=(
            f"Each contender wraps a no-op async call with {ATTEMPTS} attempts allowed and exponential "
            f"waits; {rounds} interleaved rounds of {calls:,} calls in one event loop. Per call: best "
            "round (and median round) in µs; overhead = best minus the bare call's best. certsync is "
            "`HLFDynamicsSyncService.deliver` with a PortalClient whose upsert returns at once, an "
            "InMemoryBreakerStore and the real clock. Ratios are overhead relative to certsync's "
            "production configuration, measured in the same run."
        ),
    )
    report.table("Per wrapped call (µs)", ("contender", "best", "median", "overhead", "vs certsync"), rows)
    peers = {name: value for name, value in overhead.items() if not name.startswith("certsync")}
    fastest_peer = min(peers, key=peers.__getitem__)
    for label, name in (("production logging", OURS_INFO), ("info filtered", OURS_WARNING)):
        report.target(
            f"retry wrapper overhead, success path ({label})",
            "≤ 1 µs per call and below every peer",
            f"{micro(overhead[name])} µs; fastest peer {fastest_peer} {micro(peers[fastest_peer])} µs",
            overhead[name] <= TARGET_SECONDS and all(overhead[name] < value for value in peers.values()),
        )
    report.notes += [
        "What certsync's figure includes and the peers' do not: `log.bind` of four fields per operation, "
        "`SendGate.wait()` (one clock read), the breaker's `before_call` and `record_success` (two store "
        "calls, two clock reads), two more clock reads to time the attempt, and the `dynamics_attempt` "
        "log line (rendered as JSON at info; a filtered no-op at warning).",
        "stamina's decorator runs tenacity underneath; backoff and tenacity build their retry state "
        "per call.",
        "The machine is shared with other engineers' test runs: best-of-rounds is the figure least "
        "disturbed by them; medians are shown to expose the spread.",
    ]
    return report
