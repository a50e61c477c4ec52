"""Every failed call of a delivery is noted with its time and the portal's answer (for the history),
and a delivery without an ``AttemptLog`` notes nothing. HTTP mocked with respx; time injected."""

from __future__ import annotations

from datetime import timedelta

import httpx
import respx

from certsync.delivery.attempts import AttemptLog, outcome_of
from certsync.delivery.sync_service import Outcome
from certsync.dynamics.errors import (
    AuthenticationError,
    DynamicsError,
    PermanentDynamicsError,
    RateLimitedError,
    TransientDynamicsError,
)
from tests.unit.test_sync_service import Harness, put_route, upsert


@respx.mock
async def test_each_failed_call_is_noted_with_its_time_answer_and_number() -> None:
    h = Harness(threshold=10)
    started = h.clock.now()
    put_route(
        respx.mock,
        httpx.Response(503),
        httpx.Response(429, headers={"Retry-After": "1"}),
        httpx.Response(400),
    )
    log = AttemptLog(claim=2)
    outcome = await h.service.deliver(upsert(), operation_type="certification.updated", attempts=log)

    assert outcome.outcome is Outcome.QUEUED
    assert [(e["claim"], e["attempt"], e["outcome"], e["status"]) for e in log.entries] == [
        (2, 1, "transient", 503),
        (2, 2, "rate_limited", 429),
        (2, 3, "refused", 400),
    ]
    # The injected clock: the retries slept 2 s, then the 429's 1 s.
    assert [e["at"] for e in log.entries] == [
        started.isoformat(),
        (started + timedelta(seconds=2)).isoformat(),
        (started + timedelta(seconds=3)).isoformat(),
    ]
    assert all(str(e["reason"]).startswith("HTTP ") for e in log.entries)


@respx.mock
async def test_a_delivery_after_one_failure_notes_only_the_failure() -> None:
    h = Harness()
    put_route(respx.mock, httpx.Response(502), httpx.Response(200, json={}))
    log = AttemptLog(claim=1)
    outcome = await h.service.deliver(upsert(), operation_type="certification.updated", attempts=log)
    assert (outcome.outcome, outcome.attempts) == (Outcome.DELIVERED, 2)
    assert [(e["attempt"], e["status"]) for e in log.entries] == [(1, 502)]


def test_the_answer_in_one_word() -> None:
    cases: list[tuple[DynamicsError, str]] = [
        (TransientDynamicsError("HTTP 503", status=503), "transient"),
        (TransientDynamicsError("connection refused"), "transient"),
        (RateLimitedError("HTTP 429", status=429), "rate_limited"),
        (PermanentDynamicsError("HTTP 422", status=422), "refused"),
        (AuthenticationError("HTTP 401", status=401), "unauthorised"),
        (DynamicsError("odd"), "failed"),
    ]
    assert [outcome_of(error) for error, _ in cases] == [word for _, word in cases]
