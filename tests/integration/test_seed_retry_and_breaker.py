"""The seed's two promises, each asserted by name over loopback against the sandbox portal:

- a 503 is retried 3 times, 2 s, 4 s and 8 s apart (each attempt's time as the portal saw it, on a
  scaled clock shared by certsync and the sandbox), and then the operation waits as ``pending``;
- the shared circuit breaker opens on exactly the 3rd consecutive failed call, not the 2nd.

Real PostgreSQL (the breaker's state and the retry queue), real HTTP; only time is scaled: sleeping on
the ManualClock moves it at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from uuid import uuid4

import pytest

from certsync.app import open_runtime
from certsync.dynamics.contract import CertificationState, CertificationUpsert
from certsync.resilience.breaker import CircuitState
from certsync.resilience.testing import ManualClock
from certsync.sandbox import FaultScript, FaultStep, SandboxConfig, SandboxServer
from tests.support.runtime import portal_settings, puts

pytestmark = pytest.mark.integration

START = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def timed_sandbox(clock: ManualClock) -> Iterator[SandboxServer]:
    """A sandbox whose request log is stamped by the test's clock."""
    with SandboxServer(SandboxConfig(clock=clock)) as server:
        yield server


def upsert() -> CertificationUpsert:
    state = CertificationState(
        id=uuid4(),
        peer_mentor_id=uuid4(),
        certification_type="peer_mentor",
        status="expired",
        valid_from=date(2025, 12, 1),
        valid_until=date(2026, 12, 1),
        version=2,
    )
    return CertificationUpsert.for_state(uuid4(), START, state, date(2026, 12, 2))


async def test_a_503_is_retried_after_2_4_and_8_seconds_then_waits_as_pending(
    database_url: str, timed_sandbox: SandboxServer, clock: ManualClock
) -> None:
    timed_sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=None, scope="put"),)))
    # The seed's policy as shipped (3 retries, 2 s base); a threshold the four calls cannot reach.
    settings = portal_settings(database_url, timed_sandbox.url, breaker_failure_threshold=10)

    async with open_runtime(settings, clock=clock, sleep=clock.sleep) as runtime:
        outcome = await runtime.sync_service().deliver(
            upsert(), operation_type="certification.status_changed"
        )
        [entry] = await runtime.queue.list_entries()

    seen = [(r.at - START).total_seconds() for r in puts(timed_sandbox)]
    assert seen == [0.0, 2.0, 6.0, 14.0]  # attempts 1-4: 2 s, then 4 s, then 8 s apart
    assert [r.status for r in puts(timed_sandbox)] == [503, 503, 503, 503]
    assert clock.sleeps == [2.0, 4.0, 8.0]
    assert (outcome.attempts, outcome.queue_status) == (4, "pending")
    assert (entry.status, entry.attempt_count) == ("pending", 4)
    assert entry.failure_reason == "retries exhausted after 4 attempt(s); last: HTTP 503 Service Unavailable"


async def test_the_circuit_opens_on_exactly_the_third_consecutive_failure(
    database_url: str, timed_sandbox: SandboxServer, clock: ManualClock
) -> None:
    timed_sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=None, scope="put"),)))
    # One retry per operation: the first operation makes two failed calls, the second one more.
    settings = portal_settings(database_url, timed_sandbox.url, retry_max_retries=1)

    async with open_runtime(settings, clock=clock, sleep=clock.sleep) as runtime:
        service = runtime.sync_service()
        first = await service.deliver(upsert(), operation_type="certification.updated")
        after_two = await runtime.breaker.status()
        second = await service.deliver(upsert(), operation_type="certification.updated")
        after_three = await runtime.breaker.status()
        third = await service.deliver(upsert(), operation_type="certification.updated")

    assert (after_two.state, after_two.snapshot.consecutive_failures) == (CircuitState.CLOSED, 2)
    assert first.attempts == 2
    assert after_three.state is CircuitState.OPEN
    assert second.attempts == 1
    assert second.reason == "circuit opened after 1 attempt(s); last: HTTP 503 Service Unavailable"
    # Open: the next operation is not even attempted.
    assert (third.attempts, third.reason) == (0, "circuit open: not attempted")
    assert len(puts(timed_sandbox)) == 3
