"""HLFDynamicsSyncService: the seed's scenarios, over the real client (respx), breaker and ManualClock."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from certsync.delivery.sync_service import DeliveryFailure, HLFDynamicsSyncService, Outcome
from certsync.dynamics.auth import StaticTokenProvider
from certsync.dynamics.client import DynamicsClient
from certsync.dynamics.contract import CertificationState, CertificationUpsert
from certsync.resilience.breaker import CircuitState, DynamicsCircuitBreaker, InMemoryBreakerStore
from certsync.resilience.gate import SendGate
from certsync.resilience.retry import RetryPolicy
from certsync.resilience.testing import ManualClock

BASE = "https://portal.test"


class ListSink:
    """The failure sink as a list: what the retry queue would have received."""

    def __init__(self) -> None:
        self.failures: list[DeliveryFailure] = []

    async def record(self, failure: DeliveryFailure) -> None:
        self.failures.append(failure)


class BrokenSink:
    async def record(self, failure: DeliveryFailure) -> None:
        raise RuntimeError("retry queue unreachable")


def upsert(status: str = "expired") -> CertificationUpsert:
    state = CertificationState(
        id=uuid.uuid4(),
        peer_mentor_id=uuid.uuid4(),
        certification_type="peer_mentor",
        status=status,
        valid_from=date(2025, 11, 1),
        valid_until=date(2026, 11, 1),
        version=7,
    )
    return CertificationUpsert.for_state(
        uuid.uuid4(), datetime(2026, 11, 29, tzinfo=UTC), state, date(2026, 11, 29)
    )


class Harness:
    def __init__(
        self,
        *,
        threshold: int = 3,
        cooldown: float = 30.0,
        policy: RetryPolicy | None = None,
        while_sleeping: Callable[[Harness], Awaitable[None]] | None = None,
    ) -> None:
        self.clock = ManualClock()
        self.store = InMemoryBreakerStore()
        self.breaker = DynamicsCircuitBreaker(
            "dynamics", self.store, self.clock, failure_threshold=threshold, cooldown=cooldown
        )
        self.sink = ListSink()
        self.http = httpx.AsyncClient()
        self.gate = SendGate(self.clock, self.clock.sleep)
        self.service = HLFDynamicsSyncService(
            DynamicsClient(self.http, BASE, StaticTokenProvider("t0k3n"), clock=self.clock),
            policy or RetryPolicy(),
            self.breaker,
            self.sink,
            clock=self.clock,
            sleep=self.sleep,
            gate=self.gate,
        )
        self._while_sleeping = while_sleeping

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)
        if self._while_sleeping is not None:
            await self._while_sleeping(self)

    async def state(self) -> CircuitState:
        return (await self.breaker.snapshot()).state


def put_route(mock: respx.MockRouter, *responses: httpx.Response) -> respx.Route:
    return mock.put(url__regex=rf"{BASE}/api/v1/certifications/.*").mock(side_effect=list(responses))


def throttled_then_ok(count: int, retry_after: int) -> list[httpx.Response]:
    """``count`` answers 429 with ``Retry-After``, then a 200."""
    return [
        *[httpx.Response(429, headers={"Retry-After": str(retry_after)})] * count,
        httpx.Response(200, json={}),
    ]


@respx.mock
async def test_all_retries_exhausted_creates_a_pending_queue_entry() -> None:
    h = Harness(threshold=10)
    route = put_route(respx.mock, *[httpx.Response(503)] * 4)
    request = upsert()
    outcome = await h.service.deliver(request, operation_type="certification.status_changed")
    assert outcome.outcome is Outcome.QUEUED
    assert route.call_count == 4
    [failure] = h.sink.failures
    assert failure.status == "pending"
    assert failure.attempt_count == 4
    assert failure.payload == request.to_json_dict()
    assert failure.event_id == request.event_id
    assert "503" in failure.failure_reason
    assert "retries exhausted" in failure.failure_reason


@respx.mock
async def test_retry_delays_are_exactly_2_4_8_seconds_on_the_injected_clock() -> None:
    h = Harness(threshold=10)
    put_route(respx.mock, *[httpx.Response(503)] * 4)
    await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert h.clock.sleeps == [2.0, 4.0, 8.0]


@respx.mock
async def test_failure_on_attempt_1_then_success_on_attempt_2_creates_no_queue_entry() -> None:
    h = Harness()
    route = put_route(respx.mock, httpx.Response(503), httpx.Response(200, json={}))
    outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert outcome.outcome is Outcome.DELIVERED
    assert outcome.attempts == 2
    assert route.call_count == 2
    assert h.sink.failures == []
    assert h.clock.sleeps == [2.0]


@respx.mock
async def test_a_4xx_is_queued_immediately_as_requires_investigation_without_retry() -> None:
    h = Harness()
    route = put_route(respx.mock, httpx.Response(400, json={"error": "bad"}))
    outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert route.call_count == 1
    assert h.clock.sleeps == []
    assert outcome.queue_status == "requires_investigation"
    [failure] = h.sink.failures
    assert (failure.status, failure.attempt_count) == ("requires_investigation", 1)


@respx.mock
async def test_a_4xx_does_not_count_toward_opening_the_circuit() -> None:
    h = Harness(threshold=1)
    put_route(respx.mock, httpx.Response(422))
    await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert await h.state() is CircuitState.CLOSED


@respx.mock
async def test_circuit_closed_open_half_open_closed() -> None:
    h = Harness(threshold=3, cooldown=30.0)
    route = put_route(respx.mock, *[httpx.Response(503)] * 3, httpx.Response(200, json={}))
    first = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert await h.state() is CircuitState.OPEN
    assert first.queue_status == "pending"
    assert "circuit opened after 3 attempt(s)" in (first.reason or "")
    h.clock.advance(30.0)
    with capture_logs() as logs:
        second = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert second.outcome is Outcome.DELIVERED
    assert await h.state() is CircuitState.CLOSED
    assert route.call_count == 4
    transitions = [(e["old_state"], e["new_state"]) for e in logs if e["event"] == "circuit_transition"]
    assert transitions == [("open", "half_open"), ("half_open", "closed")]


@respx.mock
async def test_circuit_closed_open_half_open_open() -> None:
    h = Harness(threshold=3, cooldown=30.0)
    route = put_route(respx.mock, *[httpx.Response(503)] * 4)
    await h.service.deliver(upsert(), operation_type="certification.status_changed")
    h.clock.advance(30.0)
    probe = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert route.call_count == 4  # exactly one probe
    assert probe.attempts == 1
    assert await h.state() is CircuitState.OPEN
    snapshot = await h.breaker.snapshot()
    assert snapshot.opened_at == h.clock.now()  # a fresh cool-down from the failed probe


@respx.mock
async def test_open_circuit_blocks_calls_without_any_http_request() -> None:
    h = Harness(threshold=1)
    route = put_route(respx.mock, httpx.Response(503))
    await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert route.call_count == 1
    route.reset()
    queued = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    held = await h.service.deliver(upsert(), operation_type="certification.status_changed", when_open="hold")
    assert route.call_count == 0
    assert queued.queue_status == "pending"
    assert queued.reason == "circuit open: not attempted"
    assert held.outcome is Outcome.HELD
    assert len(h.sink.failures) == 2  # the held one is not recorded: it waits in the outbox


@respx.mock
async def test_retry_after_is_honoured_instead_of_the_schedule() -> None:
    h = Harness(threshold=10)
    put_route(
        respx.mock,
        httpx.Response(429, headers={"Retry-After": "7"}),
        httpx.Response(503, headers={"Retry-After": "3"}),
        httpx.Response(200, json={}),
    )
    outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert outcome.outcome is Outcome.DELIVERED
    assert h.clock.sleeps == [7.0, 3.0]


@respx.mock
async def test_retry_after_beyond_the_cap_queues_instead_of_sleeping() -> None:
    h = Harness(threshold=10, policy=RetryPolicy(max_retry_after=60.0))
    route = put_route(respx.mock, httpx.Response(503, headers={"Retry-After": "600"}))
    outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert route.call_count == 1
    assert h.clock.sleeps == []
    assert outcome.queue_status == "pending"
    assert "exceeds the 60s cap" in (outcome.reason or "")


@respx.mock
async def test_a_429_pauses_all_sending_for_its_retry_after() -> None:
    h = Harness(threshold=10)
    put_route(respx.mock, httpx.Response(429, headers={"Retry-After": "5"}), httpx.Response(200, json={}))
    started = h.clock.now()
    await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert h.gate.paused_until is not None
    assert (h.gate.paused_until - started).total_seconds() == 5.0


@respx.mock
async def test_a_sink_that_fails_is_not_swallowed() -> None:
    h = Harness(threshold=10)
    put_route(respx.mock, httpx.Response(400))
    with pytest.raises(RuntimeError, match="retry queue unreachable"):
        await h.service.deliver(upsert(), operation_type="x", sink=BrokenSink())


@respx.mock
async def test_every_attempt_and_retry_is_logged_without_personal_data() -> None:
    h = Harness(threshold=10)
    put_route(respx.mock, httpx.Response(503), httpx.Response(200, json={}))
    request = upsert()
    with capture_logs() as logs:
        await h.service.deliver(request, operation_type="certification.status_changed")
    attempts = [e for e in logs if e["event"] == "dynamics_attempt"]
    assert [(e["attempt"], e["outcome"], e["status"]) for e in attempts] == [
        (1, "TransientDynamicsError", 503)
    ]
    [retry] = [e for e in logs if e["event"] == "retry_scheduled"]
    assert retry["delay"] == 2.0
    # A success adds no line of the service's own: the client's one line per exchange records it.
    puts = [(e["status"], e["event_id"]) for e in logs if e["event"] == "dynamics_request"]
    assert puts == [(503, str(request.event_id)), (200, str(request.event_id))]
    for line in (*attempts, retry):
        assert line["event_id"] == str(request.event_id)
        assert line["certification_id"] == str(request.certification.id)
        assert (line["operation"], line["version"]) == ("certification.status_changed", 7)
    assert all("t0k3n" not in str(e) for e in logs)


@respx.mock
async def test_a_timeout_is_transient_and_retried() -> None:
    h = Harness(threshold=10)
    route = respx.mock.put(url__regex=rf"{BASE}/api/v1/certifications/.*").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(204)]
    )
    outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert outcome.outcome is Outcome.DELIVERED
    assert route.call_count == 2


@respx.mock
async def test_retries_cut_short_when_another_worker_opens_the_circuit_are_queued_as_pending() -> None:
    async def another_worker_fails(h: Harness) -> None:
        await h.breaker.record_failure("another worker's 503")  # the shared circuit opens meanwhile

    h = Harness(threshold=2, while_sleeping=another_worker_fails)
    route = put_route(respx.mock, httpx.Response(503), httpx.Response(200, json={}))
    outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert route.call_count == 1
    assert outcome.queue_status == "pending"
    assert outcome.reason == "circuit opened after 1 attempt(s); last: HTTP 503 Service Unavailable"
    assert h.service.breaker is h.breaker


@respx.mock
async def test_429s_pause_sending_but_never_open_the_circuit() -> None:
    h = Harness(threshold=1)
    put_route(respx.mock, *throttled_then_ok(3, retry_after=1))
    outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert outcome.outcome is Outcome.DELIVERED
    assert await h.state() is CircuitState.CLOSED
    assert h.clock.sleeps == [1.0, 1.0, 1.0]


@respx.mock
async def test_a_burst_of_429s_longer_than_the_retries_uses_none_of_them() -> None:
    """A 429 pauses the same attempt (as a bulk call's does): five in a row, more than the policy's
    three retries, still end in one delivered attempt, with no retry scheduled and nothing queued."""
    h = Harness(threshold=1)
    route = put_route(respx.mock, *throttled_then_ok(5, retry_after=2))
    with capture_logs() as logs:
        outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert (outcome.outcome, outcome.attempts) == (Outcome.DELIVERED, 1)
    assert route.call_count == 6
    assert h.clock.sleeps == [2.0] * 5  # the gate's pauses, and no retry schedule on top
    assert [e["attempt"] for e in logs if e["event"] == "dynamics_attempt"] == [1] * 5
    assert not [e for e in logs if e["event"] == "retry_scheduled"]
    assert h.sink.failures == []


@respx.mock
async def test_twenty_429s_in_a_row_count_as_one_failed_attempt() -> None:
    """The pauses of one attempt are bounded: after the twentieth 429 it is one retry used up (the
    portal may be refusing us for good), then the next attempt starts afresh."""
    h = Harness(threshold=10)
    route = put_route(respx.mock, *throttled_then_ok(20, retry_after=1))
    with capture_logs() as logs:
        outcome = await h.service.deliver(upsert(), operation_type="certification.status_changed")
    assert (outcome.outcome, outcome.attempts) == (Outcome.DELIVERED, 2)
    assert route.call_count == 21
    [retry] = [e for e in logs if e["event"] == "retry_scheduled"]
    assert retry["after"] == "still rate limited after 20 pauses"


# --- the probe of a half-open circuit with nothing to send ------------------------------------------


async def open_circuit(h: Harness) -> None:
    for _ in range(3):
        await h.breaker.record_failure("HTTP 503 Service Unavailable")
    assert await h.state() is CircuitState.OPEN


@respx.mock
async def test_the_probe_waits_for_the_cool_down_then_heals_the_circuit_with_one_read() -> None:
    h = Harness(cooldown=30.0)
    await open_circuit(h)
    route = respx.mock.get(f"{BASE}/api/v1/contract").respond(200, json={"contract_versions": [1]})

    early = await h.service.probe()
    h.clock.advance(30)
    healed = await h.service.probe()

    assert (early, healed) == (None, True)
    assert route.call_count == 1
    assert await h.state() is CircuitState.CLOSED


@respx.mock
async def test_a_failed_probe_reopens_the_circuit_for_another_cool_down() -> None:
    h = Harness(cooldown=30.0)
    await open_circuit(h)
    h.clock.advance(30)
    respx.mock.get(f"{BASE}/api/v1/contract").respond(503)

    assert await h.service.probe() is False
    assert await h.state() is CircuitState.OPEN
    assert await h.service.probe() is None  # a new cool-down began


@respx.mock
async def test_a_probe_answered_with_a_4xx_or_429_still_shows_the_portal_is_up() -> None:
    for status in (404, 429):
        h = Harness(cooldown=30.0)
        await open_circuit(h)
        h.clock.advance(30)
        respx.mock.get(f"{BASE}/api/v1/contract").respond(status, headers={"Retry-After": "1"})

        assert await h.service.probe() is True
        assert await h.state() is CircuitState.CLOSED
