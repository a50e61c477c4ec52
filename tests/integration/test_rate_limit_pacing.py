"""The worker against the sandbox's Dataverse-style limit over loopback: paced by the reported budget,
it delivers every event while hardly any request is answered 429."""

from __future__ import annotations

from collections import Counter

from certsync.app import open_runtime
from certsync.sandbox import FaultScript, RateLimit, SandboxServer
from certsync.store.pool import Pool
from certsync.worker import WorkerOptions
from tests.support.runtime import puts, settings_for
from tests.support.seed import outbox_statuses, seed_certifications

REQUESTS, WINDOW = 40, 1.0
EVENTS = 200  # five windows' worth


async def test_paced_by_the_reported_budget_every_event_is_delivered_with_at_most_1_percent_429(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    sandbox.sandbox.load_faults(
        FaultScript(
            rate_limit=RateLimit(requests=REQUESTS, window_seconds=WINDOW, max_concurrent=52, scope="put")
        )
    )
    await seed_certifications(pool, EVENTS)
    settings = settings_for(database_url, sandbox, dynamics_rate_window_seconds=WINDOW)

    async with open_runtime(settings) as runtime:
        stats = await runtime.worker(WorkerOptions(concurrency=16, poll_seconds=0.2)).run(once=True)

    sent = puts(sandbox)
    statuses = Counter(request.status for request in sent)
    assert stats.delivered == EVENTS
    assert statuses[200] == EVENTS
    assert statuses[429] <= 0.01 * len(sent), statuses
    assert await outbox_statuses(pool) == {"delivered": EVENTS}
    # The limit set the pace: the drain took the windows it had to (four more after the first).
    first, last = sent[0].at, sent[-1].at
    assert (last - first).total_seconds() >= (EVENTS // REQUESTS - 1) * WINDOW
