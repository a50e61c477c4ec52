"""Bulk delivery throughput at zero latency: N outbox events → the Dataverse emulator with no limits.

The emulator runs in its own process with every service-protection limit off and no latency, and is
reset between runs, so each contender is bounded only by its own work, the emulator's and the
database's (all on this machine). The same N waiting events, the same concurrency:

* **certsync bulk** — ``Runtime.worker(...).run(once=True)`` with ``CERTSYNC_DATAVERSE_BATCH_SIZE=100``:
  claims from the outbox, sends 100 certifications per ``UpsertMultiple``, closes the events;
* **raw httpx** — the ceiling of a hand-written loop of single requests: the pre-built bodies, one
  ``PATCH {api}/hlf_certifications(hlf_certsyncid='<id>')`` each, no database at all; run first and last;
* **procrastinate + tenacity** — one procrastinate job per event, each building its body and sending the
  same single ``PATCH`` inside a tenacity retry loop (``bench_throughput``'s peer, on Dataverse's wire).

Delivered = rows the emulator holds at the end (its admin state), so every run also checks that all
N rows arrived.
"""

from __future__ import annotations

import asyncio
import json
import os

from bench import Options, certsync_settings, dataverse_process, fresh_database
from bench._report import Report
from bench.bench_throughput import (
    CONCURRENCY,
    Request,
    Run,
    Wire,
    certsync_worker,
    prebuilt,
    procrastinate_tenacity,
    ratio_target,
    raw_httpx,
    runs_table,
    seed,
    timed,
)
from certsync.dynamics.contract import CertificationUpsert
from certsync.dynamics.dataverse import API_PATH, KEY_COLUMN, row_for
from certsync.logs import configure_logging
from certsync.sandbox.state import DEFAULT_TOKEN

BATCH_SIZE = 100
TIME_LIMIT = 300.0  # seconds per run: the single-request peers need ~60–140 s for 20,000 here
NO_LIMITS = {"requests": None, "execution_seconds": None, "max_concurrent": None}
ENTITY_SET = "hlf_certifications"
HEADERS = {
    # What certsync's Dataverse adapter sends with a write, so that no contender does less HTTP work.
    "Authorization": f"Bearer {DEFAULT_TOKEN}",
    "Accept": "application/json",
    "OData-MaxVersion": "4.0",
    "OData-Version": "4.0",
    "Content-Type": "application/json; charset=utf-8",
}


def _single_patch(body: CertificationUpsert) -> Request:
    path = f"{API_PATH}/{ENTITY_SET}({KEY_COLUMN}='{body.certification.id}')"
    return path, json.dumps(row_for(body), separators=(",", ":")).encode(), HEADERS


DATAVERSE_SINGLE = Wire("PATCH", _single_patch, lambda state: len(state["rows"]))
"""Dataverse, one certification per request: ``PATCH`` by alternate key (an upsert), as certsync's
adapter sends it with batch size 1."""


def run(options: Options) -> Report:
    count = 2_000 if options.quick else 20_000
    configure_logging("json", "info", stream=open(os.devnull, "w"))  # noqa: SIM115
    runs: list[Run] = []
    with (
        fresh_database(options, "certsync_bench_bulk_throughput") as database_url,
        dataverse_process(NO_LIMITS) as portal,
    ):
        events = seed(database_url, count)
        requests = prebuilt(DATAVERSE_SINGLE, events)
        defer, procrastinate_work = procrastinate_tenacity(database_url, portal, events, DATAVERSE_SINGLE)
        ours = certsync_worker(
            certsync_settings(database_url, portal, dynamics_api="dataverse", dataverse_batch_size=BATCH_SIZE)
        )
        raw = raw_httpx(portal, requests, DATAVERSE_SINGLE.method)

        contenders = (
            ("raw httpx single PATCHes", raw),
            (f"certsync worker, bulk ({BATCH_SIZE} per call)", ours),
            ("procrastinate + tenacity, single PATCHes", procrastinate_work),
            ("raw httpx single PATCHes (again)", raw),
        )

        async def all_runs() -> None:
            for name, work in contenders:
                if work is procrastinate_work:
                    await defer()  # its jobs exist before its clock starts, as the outbox events do
                runs.append(await timed(name, portal, work, DATAVERSE_SINGLE, TIME_LIMIT))

        asyncio.run(all_runs())
    raw_rate = max(r.rate for r in runs if r.name.startswith("raw"))
    mine = next(r for r in runs if r.name.startswith("certsync"))
    peer = next(r for r in runs if r.name.startswith("procrastinate"))
    complete = all(r.delivered == count and r.finished for r in runs)
    report = Report(
        issue=14,
        name="bulk_throughput",
        title=f"Bulk throughput: {count:,} outbox events → Dataverse emulator (no limits, zero latency), "
        f"concurrency {CONCURRENCY}",
        method=(
            f"{count:,} certifications inserted by plain SQL (the capture trigger writes their events); the "
            "Dataverse emulator in its own process with every service-protection limit off and no latency, "
            f"reset between runs; every contender at concurrency {CONCURRENCY} with httpx limits of 64 "
            f"connections. certsync sends {BATCH_SIZE} certifications per UpsertMultiple "
            f"(CERTSYNC_DATAVERSE_BATCH_SIZE={BATCH_SIZE}); the peers send one PATCH by alternate key per "
            "event. Rate = rows the emulator holds at the end ÷ wall time of the run (each bounded to "
            f"{TIME_LIMIT:.0f} s). One run each; the raw loop runs first and last and its better rate is "
            "the reference."
        ),
    )
    runs_table(report, runs, raw_rate)
    ratio_target(
        report, "bulk vs raw httpx single PATCHes", "≥ 10× the raw rate", mine, raw_rate, 10, digits=1
    )
    ratio_target(
        report,
        "bulk vs procrastinate + tenacity",
        "≥ 3× procrastinate+tenacity",
        mine,
        peer.rate,
        3,
        digits=1,
    )
    report.target(
        "every run leaves all rows in the emulator",
        f"{count:,} rows",
        ", ".join(f"{r.delivered:,}" for r in runs),
        complete,
    )
    report.notes += [
        "All contenders share two cores with PostgreSQL and the emulator process: each rate is a "
        "whole-system rate. The single-request rates are bounded by the emulator (FastAPI, one request "
        "each), the bulk rate by the database work per event (claim, close) and the emulator's per-row work.",
        "certsync logs one line per portal call at info, rendered as JSON to /dev/null; procrastinate logs "
        "through stdlib logging at its default (warning).",
    ]
    return report
