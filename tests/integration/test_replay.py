"""Manual replay of the retry queue against the real sandbox: current state, outcome recorded, streamed."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any, TextIO

import pytest

from certsync.app import Runtime, open_runtime
from certsync.logs import configure_logging
from certsync.sandbox.faults import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from certsync.sandbox.state import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, SandboxConfig
from certsync.store.pool import Pool
from certsync.store.retry_queue import RetryEntry
from tests.support.memory import traced_bytes_of_all_entries
from tests.support.runtime import FAST, puts, settings_for
from tests.support.seed import seed_certifications, seed_pending_entries, set_status

pytestmark = pytest.mark.integration

OPERATOR = "ops-on-call"


def portal_answers(sandbox: SandboxServer, status: int | None) -> None:
    """Every certification PUT answers ``status`` from now on (``None``: the portal has recovered)."""
    steps = () if status is None else (FaultStep(status=status, times=None, scope="put"),)
    sandbox.sandbox.load_faults(FaultScript(steps=steps))


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig()) as server:
        yield server


@pytest.fixture
async def runtime(database_url: str, sandbox: SandboxServer) -> AsyncIterator[Runtime]:
    # A threshold above one operation's four calls keeps the circuit out of these tests: each entry
    # fails because its own retries ran out, and a replay is not refused by an open circuit.
    settings = settings_for(database_url, sandbox, breaker_failure_threshold=50)
    async with open_runtime(settings) as rt:
        yield rt


async def failed_delivery(pool: Pool, runtime: Runtime, sandbox: SandboxServer, status: int) -> RetryEntry:
    """One certification whose delivery failed with ``status``: its retry queue entry."""
    portal_answers(sandbox, status)
    await seed_certifications(pool, 1)
    await runtime.worker(FAST).run(once=True)
    [row] = await runtime.queue.list_entries()
    return await runtime.queue.get(row.id)


async def test_one_process_fetches_one_oauth_token_for_every_replay_it_makes(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    settings = settings_for(
        database_url,
        sandbox,
        breaker_failure_threshold=50,
        dynamics_token=None,
        dynamics_token_url=f"{sandbox.url}/oauth2/token",
        dynamics_client_id=DEFAULT_CLIENT_ID,
        dynamics_client_secret=DEFAULT_CLIENT_SECRET,
    )
    async with open_runtime(settings) as rt:
        portal_answers(sandbox, 503)
        await seed_certifications(pool, 3)
        await rt.worker(FAST).run(once=True)
        portal_answers(sandbox, None)
        entries = await rt.queue.list_entries()
        assert len(entries) == 3
        for entry in entries:  # as the console does: one replay per request, over one runtime
            assert (await rt.queue_service().replay(entry.id, by=OPERATOR)).status == "replayed"
    token_fetches = [r for r in sandbox.sandbox.requests() if r.path == "/oauth2/token"]
    assert len(token_fetches) == 1


async def test_replaying_a_pending_entry_after_the_portal_recovers_sends_the_current_state(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    entry = await failed_delivery(pool, runtime, sandbox, 503)
    assert entry.status == "pending"
    assert entry.payload_json["certification"]["status"] == "active"
    # Between the failure and the replay a coordinator suspends the certification.
    assert entry.certification_id is not None
    await set_status(pool, [entry.certification_id], "suspended")
    portal_answers(sandbox, None)

    result = await runtime.replay_service().replay(int(entry.id), by=OPERATOR)

    assert result.status == "replayed"
    replayed = await runtime.queue.get(int(entry.id))
    assert replayed.status == "replayed"
    assert replayed.replay_count == 1
    assert replayed.last_replayed_by == OPERATOR
    # It no longer reads as failing: the reason says it was delivered, and which failure it recovered from.
    assert replayed.failure_reason == f"delivered by replay; last failure: {entry.failure_reason}"
    held = sandbox.sandbox.snapshot()["certifications"][str(entry.certification_id)]["certification"]
    assert (held["status"], held["version"]) == ("suspended", 2)


async def test_a_replay_while_the_portal_still_fails_goes_back_to_pending_with_the_new_reason(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    entry = await failed_delivery(pool, runtime, sandbox, 503)
    assert "503" in entry.failure_reason
    portal_answers(sandbox, 502)

    result = await runtime.replay_service().replay(int(entry.id), by=OPERATOR)

    assert result.status == "pending"
    after = await runtime.queue.get(int(entry.id))
    assert after.status == "pending"
    assert "502" in after.failure_reason
    assert after.replay_count == 1
    assert after.attempt_count == entry.attempt_count + 4
    assert [item["status"] for item in after.failure_history] == ["pending", "pending"]


async def test_discarding_keeps_the_entry_with_its_reason_and_who_discarded_it(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    entry = await failed_delivery(pool, runtime, sandbox, 400)

    discarded = await runtime.queue.discard(
        int(entry.id), reason="duplicate mentor, merged by HLF", by=OPERATOR, now=runtime.clock.now()
    )

    assert discarded
    after = await runtime.queue.get(int(entry.id))
    assert (after.status, after.discarded_reason, after.discarded_by) == (
        "discarded",
        "duplicate mentor, merged by HLF",
        OPERATOR,
    )
    assert after.payload_json == entry.payload_json


async def test_a_discarded_entry_is_not_replayed(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    entry = await failed_delivery(pool, runtime, sandbox, 400)
    await runtime.queue.discard(int(entry.id), reason="obsolete", by=OPERATOR, now=runtime.clock.now())
    portal_answers(sandbox, None)
    sent_before = len(puts(sandbox))

    result = await runtime.replay_service().replay(int(entry.id), by=OPERATOR)

    assert result.status == "skipped"
    assert len(puts(sandbox)) == sent_before
    assert (await runtime.queue.get(int(entry.id))).status == "discarded"


# Bounded memory -------------------------------------------------------------------------------------------

ENTRIES = 10_000


@pytest.fixture
def devnull() -> Iterator[TextIO]:
    with open(os.devnull, "w") as sink:
        yield sink


@pytest.fixture
def sandbox_process(tmp_path: Any) -> Iterator[str]:
    """The sandbox in its own process, so that what it stores is not traced as the replay's memory."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CERTSYNC_LOG_LEVEL": "error"}
    process = subprocess.Popen(
        [sys.executable, "-m", "certsync", "sandbox", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            found = re.search(r"CERTSYNC_DYNAMICS_BASE_URL=(\S+)", line)
            if found:
                yield found.group(1)
                break
        else:
            pytest.fail("the sandbox process did not start")
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.slow
async def test_replaying_ten_thousand_entries_runs_in_bounded_memory(
    pool: Pool, database_url: str, sandbox_process: str, devnull: TextIO
) -> None:
    """A bulk replay holds one page of entries at a time, never the whole queue.

    Measured: the peak of traced memory over the whole replay. It was once 4.9 MB, from no fault of the
    replay: httpcore runs ``import sniffio`` each time it sets up a lock (several times a request), and
    while sniffio was not installed each import failed after walking the import finders, pytest's
    assertion-rewrite finder among them, whose ``pathlib`` interns path parts that are freed again; their
    deleted slots filled the interpreter's table of interned strings until, ~9,600 replays in, it was
    rebuilt as one 3.84 MB block (traceback: httpcore ``_synchronization.py`` ``import sniffio`` ->
    ``importlib`` -> pytest ``_early_rewrite_bailout`` -> ``pathlib`` -> ``sys.intern``). certsync
    depends on sniffio since, which also saves ~15 % of a delivery's CPU; the SendGate keeps no request
    log while no budget limits sending (it held ~1 MB here).
    """
    await seed_pending_entries(pool, ENTRIES)
    # Production's JSON logging, written to /dev/null: pytest's in-memory capture of 10k replays' log
    # lines would otherwise be measured too (and structlog's development renderer, which imports
    # Rich's traceback machinery on the first warning, is not what runs in production).
    configure_logging("json", "info", stream=devnull)
    settings = settings_for(database_url, SimpleNamespace(url=sandbox_process))  # type: ignore[arg-type]
    async with open_runtime(settings) as runtime:
        all_at_once = await traced_bytes_of_all_entries(runtime.queue, ENTRIES)
        service = runtime.replay_service()
        gc.collect()
        tracemalloc.start()
        try:
            summary = await service.replay_all(status="pending", by=OPERATOR)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        counts = await runtime.queue.counts()

    assert summary.results == {"replayed": ENTRIES}
    assert counts["replayed"][0] == ENTRIES
    print(f"replay_all traced peak {peak / 1e6:.2f} MB; all rows at once {all_at_once / 1e6:.2f} MB")
    # A page is 500 of the 10,000 rows (5 %) plus one replay's working memory; loading every row first
    # would hold all_at_once and more.
    assert peak < all_at_once / 4


async def test_bulk_replay_stops_while_the_circuit_is_open_and_leaves_the_rest_unchanged(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer
) -> None:
    for _ in range(3):
        await failed_delivery_keep(pool, runtime, sandbox)
    for _ in range(runtime.settings.breaker_failure_threshold):
        await runtime.breaker.record_failure("portal down")  # another worker saw the portal fail
    before = len(puts(sandbox))

    summary = await runtime.replay_service().replay_all(status="pending", by=OPERATOR)

    assert summary.total == 0
    assert summary.stopped_because is not None
    assert "circuit is open" in summary.stopped_because
    assert len(puts(sandbox)) == before  # no request was sent
    rows = await runtime.queue.list_entries(status="pending")
    assert len(rows) == 3
    assert all(r.replay_count == 0 for r in rows)


async def failed_delivery_keep(pool: Pool, runtime: Runtime, sandbox: SandboxServer) -> None:
    """One more failed delivery, leaving earlier entries in place."""
    portal_answers(sandbox, 503)
    await seed_certifications(pool, 1)
    await runtime.worker(FAST).run(once=True)
