"""A mass expiry drained into Dataverse under its service-protection limits, scaled: bulk vs one PATCH each.

Dataverse allows 6000 requests per user per 300 s sliding window and 52 concurrent; an UpsertMultiple
of up to 1000 targets counts as one request. The emulator (own process) plays the limits scaled to
``REQUESTS`` per ``WINDOW`` s and 52 concurrent, answering 429 with Retry-After beyond them. 10,000
changes wait (31 December's mass expiry); one certsync worker with production settings drains them:

* bulk: ``CERTSYNC_DATAVERSE_BATCH_SIZE=100`` — 100 UpsertMultiple calls, inside the first window;
* single: ``CERTSYNC_DATAVERSE_BATCH_SIZE=1`` — one PATCH per change, so the limit allows
  ``REQUESTS`` per window: 10,000 would take ~500 s. It runs for ``SINGLE_SECONDS`` in the same
  process and session, and the ratio compares delivered changes per second.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx

from bench import Options, dataverse_process, fresh_database
from bench._report import Report
from bench.bench_rate_limit import runtime_depth
from bench.bench_throughput import seed
from certsync.app import open_runtime
from certsync.logs import configure_logging
from certsync.sandbox.state import DEFAULT_TOKEN
from certsync.settings import Settings
from certsync.worker import WorkerOptions, WorkerStats

REQUESTS, WINDOW, MAX_CONCURRENT = 120, 6.0, 52
SINGLE_SECONDS = 20.0
TIME_LIMIT = 120.0


def settings(database_url: str, portal: str, batch_size: int) -> Settings:
    return Settings(
        _env_file=None,
        database_url=database_url,
        dynamics_api="dataverse",
        dynamics_base_url=portal,
        dynamics_token=DEFAULT_TOKEN,
        dataverse_batch_size=batch_size,
        dynamics_rate_window_seconds=WINDOW,
        log_format="json",
    )


async def drain(
    database_url: str, portal: str, batch_size: int, limit: float
) -> tuple[float, int, WorkerStats]:
    """Run one worker until nothing waits (or ``limit`` seconds); seconds taken and events left."""
    async with open_runtime(settings(database_url, portal, batch_size)) as runtime:
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(runtime.worker(WorkerOptions()).run(stop))
        left = -1
        while time.perf_counter() - started < limit and not task.done():
            await asyncio.sleep(0.05)
            left = await runtime_depth(runtime)
            if left == 0:
                break
        seconds = time.perf_counter() - started
        stop.set()
        stats = await task
        return seconds, left, stats


def portal_calls(portal: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{portal}/_sandbox/requests", timeout=30.0).json()["requests"])


def run(options: Options) -> Report:
    count = 2_000 if options.quick else 10_000
    configure_logging("json", "warning", stream=open(os.devnull, "w"))  # noqa: SIM115
    limits = {
        "requests": REQUESTS,
        "window_seconds": WINDOW,
        "max_concurrent": MAX_CONCURRENT,
        "execution_seconds": None,
    }
    results: dict[str, tuple[float, int, WorkerStats, list[dict[str, Any]]]] = {}
    for name, batch_size, limit in (("bulk", 100, TIME_LIMIT), ("single", 1, SINGLE_SECONDS)):
        with (
            fresh_database(options, f"certsync_bench_bulk_{name}") as database_url,
            dataverse_process(limits) as portal,
        ):
            seed(database_url, count)
            seconds, left, stats = asyncio.run(drain(database_url, portal, batch_size, limit))
            results[name] = (seconds, left, stats, portal_calls(portal))

    bulk_seconds, bulk_left, bulk_stats, bulk_calls = results["bulk"]
    single_seconds, _, single_stats, single_calls = results["single"]
    bulk_rate = bulk_stats.delivered / bulk_seconds
    single_rate = single_stats.delivered / single_seconds
    ratio = bulk_rate / single_rate if single_rate else float("inf")
    throttled = sum(1 for c in bulk_calls if c["status"] == 429)
    single_throttled = sum(1 for c in single_calls if c["status"] == 429)
    writes = [c for c in bulk_calls if c["method"] == "POST"]
    report = Report(
        issue=14,
        name="bulk",
        title="A mass expiry into Dataverse under its service-protection limits (scaled): bulk vs single",
        method=(
            f"{count:,} changes waiting; the Dataverse emulator (own process) admits {REQUESTS} requests per "
            f"sliding {WINDOW:g} s window and {MAX_CONCURRENT} concurrent (Dataverse: 6000 per 300 s, 52), "
            "else 429 with Retry-After. One certsync worker, production settings, told the window "
            f"(CERTSYNC_DYNAMICS_RATE_WINDOW_SECONDS={WINDOW:g}). Bulk: batch size 100 until nothing waits. "
            f"Single: batch size 1 for {SINGLE_SECONDS:g} s (a full drain would take "
            f"~{count / (REQUESTS / WINDOW):.0f} s); "
            "the ratio compares changes delivered per second, both runs in one session."
        ),
    )
    report.table(
        "Drain",
        ("measure", "bulk (100 per call)", "single (1 per call)"),
        [
            ("changes delivered", f"{bulk_stats.delivered:,}", f"{single_stats.delivered:,}"),
            ("time", f"{bulk_seconds:.2f} s", f"{single_seconds:.1f} s (bounded)"),
            ("delivered per second", f"{bulk_rate:,.0f}", f"{single_rate:,.1f}"),
            (
                "portal calls",
                f"{len(bulk_calls):,} ({len(writes):,} UpsertMultiple)",
                f"{len(single_calls):,}",
            ),
            ("answered 429", f"{throttled:,}", f"{single_throttled:,}"),
            ("left waiting at the end", f"{bulk_left:,}", "(bounded run)"),
        ],
    )
    report.target(
        "bulk drains 10,000 within one window + 10 %",
        f"≤ {WINDOW * 1.1:.1f} s, nothing left",
        f"{bulk_seconds:.2f} s, {bulk_left} left",
        bulk_seconds <= WINDOW * 1.1 and bulk_left == 0,
    )
    report.target("bulk vs batch size 1 (delivered per second)", "≥ 50×", f"{ratio:.0f}×", ratio >= 50)
    report.target("bulk answers 429", "0", f"{throttled}", throttled == 0)
    return report
