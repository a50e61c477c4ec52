"""HLFDynamicsSyncService.deliver_bulk over the Dataverse adapter (respx): one UpsertMultiple for the
batch, one retry schedule and one breaker failure per call, 429s that pause without using a retry, and
a refused batch split until only the refused rows are left for investigation."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import httpx
import pytest
import respx

from certsync.delivery.attempts import AttemptLog
from certsync.delivery.sync_service import BulkItem, DeliveryFailure, HLFDynamicsSyncService, Outcome
from certsync.dynamics.auth import StaticTokenProvider
from certsync.dynamics.client import DynamicsClient
from certsync.dynamics.contract import CertificationState, CertificationUpsert
from certsync.dynamics.dataverse import DataverseClient
from certsync.resilience.breaker import CircuitState, DynamicsCircuitBreaker, InMemoryBreakerStore
from certsync.resilience.gate import SendGate
from certsync.resilience.retry import RetryPolicy
from certsync.resilience.testing import ManualClock

BASE = "https://hlf.crm4.dynamics.com"
API = f"{BASE}/api/data/v9.2"
BULK = f"{API}/hlf_certifications/Microsoft.Dynamics.CRM.UpsertMultiple"
KEY = re.compile(r"hlf_certsyncid='([0-9a-f-]{36})'")


class ListSink:
    def __init__(self) -> None:
        self.failures: list[DeliveryFailure] = []

    async def record(self, failure: DeliveryFailure) -> None:
        self.failures.append(failure)


def upsert() -> CertificationUpsert:
    state = CertificationState(
        id=uuid.uuid4(),
        peer_mentor_id=uuid.uuid4(),
        certification_type="peer_mentor",
        status="expired",
        valid_from=date(2025, 12, 1),
        valid_until=date(2026, 12, 1),
        version=3,
    )
    return CertificationUpsert.for_state(
        uuid.uuid4(), datetime(2026, 12, 2, tzinfo=UTC), state, date(2026, 12, 2)
    )


class Harness:
    def __init__(self, *, threshold: int = 10) -> None:
        self.clock = ManualClock()
        self.breaker = DynamicsCircuitBreaker(
            "dynamics", InMemoryBreakerStore(), self.clock, failure_threshold=threshold, cooldown=30.0
        )
        self.sink = ListSink()
        portal = DataverseClient(httpx.AsyncClient(), BASE, StaticTokenProvider("t"), clock=self.clock)
        self.service = HLFDynamicsSyncService(
            portal,
            RetryPolicy(),
            self.breaker,
            self.sink,
            clock=self.clock,
            sleep=self.clock.sleep,
            gate=SendGate(self.clock, self.clock.sleep),
        )

    def items(self, n: int) -> list[BulkItem]:
        return [
            BulkItem(upsert(), "certification.status_changed", self.sink, AttemptLog(claim=1))
            for _ in range(n)
        ]


def calls_noted(item: BulkItem) -> list[tuple[int, str, int | None, object]]:
    """(number, outcome, status, targets) of each failed call noted in an item's history."""
    assert item.attempts is not None
    return [(e["attempt"], e["outcome"], e["status"], e.get("targets")) for e in item.attempts.entries]  # type: ignore[misc]


def refusing(refused: set[UUID], calls: list[tuple[str, int]]) -> respx.Route:
    """Dataverse as it behaves: a bulk call with a refused row fails whole (400), a PATCH of one too."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            ids = [UUID(KEY.search(t["@odata.id"]).group(1)) for t in json.loads(request.content)["Targets"]]  # type: ignore[union-attr]
        else:
            ids = [UUID(KEY.search(request.url.path).group(1))]  # type: ignore[union-attr]
        calls.append((request.method, len(ids)))
        if refused & set(ids):
            return httpx.Response(
                400, json={"error": {"code": "0x80040265", "message": "refused by a plug-in"}}
            )
        return httpx.Response(
            200 if request.method == "POST" else 204, json={} if request.method == "POST" else None
        )

    return respx.route(url__startswith=f"{API}/hlf_certifications").mock(side_effect=answer)


@respx.mock
async def test_a_batch_is_one_upsert_multiple_and_every_item_is_delivered() -> None:
    h = Harness()
    calls: list[tuple[str, int]] = []
    refusing(set(), calls)

    outcomes = await h.service.deliver_bulk(h.items(25))

    assert calls == [("POST", 25)]
    assert [o.outcome for o in outcomes] == [Outcome.DELIVERED] * 25
    assert h.sink.failures == []


@respx.mock
async def test_a_refused_batch_is_split_until_only_the_refused_row_is_left_for_investigation() -> None:
    h = Harness()
    items = h.items(8)
    refused = items[5].request.certification.id
    calls: list[tuple[str, int]] = []
    refusing({refused}, calls)

    outcomes = await h.service.deliver_bulk(items)

    # 8 refused → items 0-3 delivered, 4-7 refused → 4-5 refused (4 and 5 alone: PATCHes), 6-7 delivered.
    assert calls == [
        ("POST", 8),
        ("POST", 4),
        ("POST", 4),
        ("POST", 2),
        ("PATCH", 1),
        ("PATCH", 1),
        ("POST", 2),
    ]
    assert [o.outcome for o in outcomes].count(Outcome.DELIVERED) == 7
    assert outcomes[5].queue_status == "requires_investigation"
    [failure] = h.sink.failures
    assert (failure.certification_id, failure.status) == (refused, "requires_investigation")
    assert "0x80040265" in failure.failure_reason
    assert (await h.breaker.snapshot()).consecutive_failures == 0  # refusals are answers, not outages


@respx.mock
async def test_a_transient_failure_is_one_call_one_schedule_and_then_every_item_is_pending() -> None:
    h = Harness(threshold=10)
    route = respx.post(BULK).mock(return_value=httpx.Response(503))

    outcomes = await h.service.deliver_bulk(h.items(5))

    assert route.call_count == 4
    assert h.clock.sleeps == [2.0, 4.0, 8.0]
    assert (await h.breaker.snapshot()).consecutive_failures == 4
    assert [o.queue_status for o in outcomes] == ["pending"] * 5
    assert len(h.sink.failures) == 5
    assert {f.attempt_count for f in h.sink.failures} == {4}
    assert len({f.certification_id for f in h.sink.failures}) == 5


@respx.mock
async def test_a_429_pauses_the_batch_and_uses_up_no_retry() -> None:
    h = Harness()
    throttled = httpx.Response(
        429,
        headers={"Retry-After": "7"},
        json={"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit"}},
    )
    route = respx.post(BULK).mock(side_effect=[throttled, throttled, httpx.Response(200, json={})])

    outcomes = await h.service.deliver_bulk(h.items(3))

    assert route.call_count == 3
    assert [o.outcome for o in outcomes] == [Outcome.DELIVERED] * 3
    assert {o.attempts for o in outcomes} == {1}
    assert h.clock.sleeps == [7.0, 7.0]
    assert (await h.breaker.snapshot()).consecutive_failures == 0


@respx.mock
async def test_twenty_429s_in_a_row_count_as_one_failed_call_for_the_whole_batch() -> None:
    h = Harness()
    throttled = httpx.Response(429, headers={"Retry-After": "1"})
    route = respx.post(BULK).mock(side_effect=[*[throttled] * 20, httpx.Response(200, json={})])

    outcomes = await h.service.deliver_bulk(h.items(3))

    assert route.call_count == 21
    assert [(o.outcome, o.attempts) for o in outcomes] == [(Outcome.DELIVERED, 2)] * 3
    assert (await h.breaker.snapshot()).consecutive_failures == 0


@respx.mock
async def test_the_circuit_opening_mid_batch_queues_every_item_as_pending() -> None:
    h = Harness(threshold=2)
    respx.post(BULK).mock(return_value=httpx.Response(502))

    outcomes = await h.service.deliver_bulk(h.items(4))

    assert (await h.breaker.snapshot()).state is CircuitState.OPEN
    assert [o.queue_status for o in outcomes] == ["pending"] * 4
    assert {f.failure_reason for f in h.sink.failures} == {
        "circuit opened after 2 attempt(s); last: HTTP 502 Bad Gateway"
    }


@respx.mock
async def test_an_open_circuit_holds_the_whole_batch_for_the_worker() -> None:
    h = Harness(threshold=1)
    await h.breaker.record_failure("HTTP 503 Service Unavailable")
    route = respx.post(BULK).mock(return_value=httpx.Response(200, json={}))

    outcomes = await h.service.deliver_bulk(h.items(3), when_open="hold")

    assert [o.outcome for o in outcomes] == [Outcome.HELD] * 3
    assert route.call_count == 0
    assert h.sink.failures == []


async def test_a_portal_without_bulk_upserts_is_refused() -> None:
    h = Harness()
    contract_v1 = DynamicsClient(httpx.AsyncClient(), BASE, StaticTokenProvider("t"), clock=h.clock)
    service = HLFDynamicsSyncService(
        contract_v1, RetryPolicy(), h.breaker, h.sink, clock=h.clock, sleep=h.clock.sleep
    )
    with pytest.raises(TypeError, match="no bulk upserts"):
        await service.deliver_bulk(h.items(2))


@respx.mock
async def test_each_failed_bulk_call_is_noted_in_the_history_of_every_certification_it_carried() -> None:
    h = Harness(threshold=10)
    started = h.clock.now()
    throttled = httpx.Response(429, headers={"Retry-After": "3"})
    respx.post(BULK).mock(side_effect=[httpx.Response(503), throttled, httpx.Response(200, json={})])
    items = h.items(3)

    outcomes = await h.service.deliver_bulk(items)

    assert [o.outcome for o in outcomes] == [Outcome.DELIVERED] * 3
    for item in items:
        assert calls_noted(item) == [(1, "transient", 503, 3), (2, "rate_limited", 429, 3)]
        assert item.attempts is not None
        # Injected clock: the 503 at the start, the 429 after the 2 s back-off.
        assert [e["at"] for e in item.attempts.entries] == [
            started.isoformat(),
            (started + timedelta(seconds=2)).isoformat(),
        ]


@respx.mock
async def test_a_split_notes_each_refused_call_so_the_refused_row_shows_how_it_was_isolated() -> None:
    h = Harness()
    items = h.items(4)
    refused = items[3].request.certification.id
    refusing({refused}, [])

    await h.service.deliver_bulk(items)

    # 4 refused → 0-1 delivered, 2-3 refused → 2 alone delivered, 3 alone refused (a single PATCH).
    assert calls_noted(items[0]) == [(1, "refused", 400, 4)]
    assert calls_noted(items[2]) == [(1, "refused", 400, 4), (2, "refused", 400, 2)]
    assert calls_noted(items[3]) == [
        (1, "refused", 400, 4),
        (2, "refused", 400, 2),
        (3, "refused", 400, None),
    ]
