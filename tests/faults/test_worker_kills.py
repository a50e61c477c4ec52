"""SIGKILL the worker again and again while certifications keep changing: nothing lost, nothing goes back.

Real PostgreSQL, the real sandbox (in this process, so its history and request log can be read) and
``certsync worker`` as a subprocess with 2 s leases (``CERTSYNC_WORKER_LEASE_SECONDS``), so that a
killed worker's claims come back within seconds. Each round starts a worker, waits for its first
delivery, changes some certifications, kills it at a random moment (every PUT takes 20–120 ms, so most
kills land mid-delivery) and changes some more while no worker runs. Then one last worker drains.

Scale: ``CERTSYNC_FAULT_KILLS`` rounds (20) over ``CERTSYNC_FAULT_EVENTS`` outbox events (2000);
``CERTSYNC_FAULT_SEED`` replays a run (the seed is in every failure message).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter, defaultdict
from functools import partial

import pytest

from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from tests.faults.conftest import (
    EVENTS,
    KILLS,
    SEED,
    SIGNING_SECRET,
    STATIC_TOKEN,
    JsonLogCapture,
    WorkerProcesses,
    assert_no_leaks,
    assert_nothing_lost,
    drained,
    outbox_events,
    personal_data,
    seed_mentors,
    worker_env,
)
from tests.support.runtime import puts, wait_until
from tests.support.seed import change_some, outbox_statuses

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_a_worker_killed_at_random_again_and_again_loses_nothing_and_never_sends_an_older_state(
    pool: Pool,
    database_url: str,
    slow_sandbox: SandboxServer,
    workers: WorkerProcesses,
    json_logs: JsonLogCapture,
) -> None:
    sandbox = slow_sandbox
    rng = random.Random(SEED)
    env = worker_env(database_url, sandbox.url)
    certifications = await seed_mentors(pool, mentors=max(EVENTS // 20, 10), certifications_each=4)
    changes = len(certifications)
    per_round = math.ceil(max(EVENTS - changes, 0) / KILLS)
    kills_mid_delivery = 0

    for _ in range(KILLS):
        before = len(puts(sandbox))
        worker = workers.start(env, "--concurrency", "8")
        await wait_until(
            partial(_sent_since, sandbox, before),
            f"the worker's first delivery (seed {SEED})",
            60,
            every=0.05,
        )
        changes += await change_some(pool, certifications, rng, per_round // 2)
        await asyncio.sleep(rng.uniform(0.0, 0.6))
        workers.kill(worker)
        kills_mid_delivery += (await outbox_statuses(pool)).get("in_flight", 0) > 0
        # Changes keep coming while no worker runs.
        changes += await change_some(pool, certifications, rng, per_round - per_round // 2)

    last = workers.start(env, "--concurrency", "8")
    await wait_until(
        lambda: drained(pool), f"the last worker to drain the outbox (seed {SEED})", 120, every=0.05
    )
    assert workers.stop(last) == 0

    events = await outbox_events(pool)
    assert len(events) == changes >= EVENTS, f"every change is one event (seed {SEED})"
    assert kills_mid_delivery >= KILLS // 2, f"kills should land mid-delivery (seed {SEED})"
    await assert_nothing_lost(pool, sandbox)
    duplicates = assert_every_send_is_keyed_by_its_event(sandbox, events)
    forbidden = await personal_data(pool) | {STATIC_TOKEN, SIGNING_SECRET}
    assert_no_leaks(workers.lines() + json_logs.lines, forbidden)
    print(
        f"\nkills={KILLS} mid-delivery={kills_mid_delivery} events={len(events)} puts={len(puts(sandbox))}"
        f" duplicates={duplicates} seed={SEED}"
    )


def assert_every_send_is_keyed_by_its_event(sandbox: SandboxServer, events: list[dict[str, object]]) -> int:
    """Each PUT's Idempotency-Key is the outbox event it carries, so a resend after a kill reuses the key;
    one certification version is never sent under two keys. Returns how many PUTs were resends."""
    of_event = {str(e["id"]): (str(e["certification_id"]), e["certification_version"]) for e in events}
    keys: list[str] = []
    for request in sandbox.sandbox.requests():
        if request.method != "PUT":
            continue
        key = (request.idempotency_key or "").lower()
        assert key in of_event, f"a PUT keyed by no outbox event: {request}"
        assert request.path.rsplit("/", 1)[1].lower() == of_event[key][0], (
            f"key of another certification: {request}"
        )
        keys.append(key)
    keys_of_version: defaultdict[tuple[str, object], set[str]] = defaultdict(set)
    for key in keys:
        keys_of_version[of_event[key]].add(key)
    assert all(len(k) == 1 for k in keys_of_version.values())
    return sum(n - 1 for n in Counter(keys).values())


async def _sent_since(sandbox: SandboxServer, before: int) -> bool:
    return len(puts(sandbox)) > before
