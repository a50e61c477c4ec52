"""DynamicsClient against a respx-mocked portal: the wire of contract v1 and the one error classification."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from uuid import UUID

import httpx
import pytest
import respx
from jsonschema import Draft202012Validator, FormatChecker
from standardwebhooks import Webhook
from structlog.testing import capture_logs

from certsync.dynamics.auth import StaticTokenProvider
from certsync.dynamics.client import DynamicsClient
from certsync.dynamics.contract import CertificationState, CertificationUpsert, contract_schema
from certsync.dynamics.errors import (
    AuthenticationError,
    ContractMismatchError,
    DynamicsError,
    PermanentDynamicsError,
    RateLimitedError,
    TransientDynamicsError,
)
from certsync.dynamics.http import remaining_budget
from certsync.dynamics.port import DeliveryReceipt
from certsync.dynamics.signing import RequestSigner
from certsync.resilience.gate import SendGate
from certsync.resilience.testing import ManualClock

BASE = "https://portal.hlf.example"
TOKEN = "static-token-abc"
SECRET = "whsec_" + base64.b64encode(b"certsync-unit-test-signing-key!!").decode()
EVENT_ID = UUID("6f1c2a34-0b1d-4c5e-9f00-1234567890ab")
CERT_ID = UUID("11111111-2222-4333-8444-555555555555")
MENTOR_ID = UUID("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee")
UPSERT_URL = f"{BASE}/api/v1/certifications/{CERT_ID}"


def make_upsert(status: str = "expired") -> CertificationUpsert:
    state = CertificationState(
        id=CERT_ID,
        peer_mentor_id=MENTOR_ID,
        certification_type="peer_mentor",
        status=status,
        valid_from=date(2025, 11, 1),
        valid_until=date(2026, 11, 1),
        version=7,
    )
    return CertificationUpsert.for_state(
        EVENT_ID, datetime(2026, 11, 29, 10, 0, tzinfo=UTC), state, today=date(2026, 11, 29)
    )


class RotatingTokens:
    """A hand-written TokenProvider fake: a new token after each invalidation, and a record of both calls."""

    def __init__(self) -> None:
        self.issued = 1
        self.invalidated: list[str] = []

    async def token(self) -> str:
        return f"token-{self.issued}"

    async def invalidate(self, rejected: str) -> None:
        self.invalidated.append(rejected)
        self.issued += 1


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=BASE, assert_all_called=False)


@pytest.fixture
def client(http: httpx.AsyncClient, clock: ManualClock) -> DynamicsClient:
    return DynamicsClient(http, BASE, StaticTokenProvider(TOKEN), clock=clock, timeout=3.0)


def sent(route: respx.Route) -> httpx.Request:
    return route.calls.last.request


def answering_after(
    clock: ManualClock, seconds: float, status: int
) -> Callable[[httpx.Request], httpx.Response]:
    """A portal that takes ``seconds`` on the injected clock to answer ``status``."""

    def answer(request: httpx.Request) -> httpx.Response:
        clock.advance(seconds)
        return httpx.Response(status)

    return answer


# --- the request on the wire ---------------------------------------------------------------------


async def test_upsert_puts_to_the_certification_url_with_bearer_json_and_idempotency_key(
    client: DynamicsClient, router: respx.Router
) -> None:
    route = router.put(UPSERT_URL).respond(200)

    await client.upsert_certification(make_upsert())

    request = sent(route)
    assert request.method == "PUT"
    assert str(request.url) == UPSERT_URL
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == str(EVENT_ID)


async def test_unsigned_upsert_carries_no_webhook_headers(
    client: DynamicsClient, router: respx.Router
) -> None:
    route = router.put(UPSERT_URL).respond(200)

    await client.upsert_certification(make_upsert())

    assert not [name for name in sent(route).headers if name.lower().startswith("webhook-")]


async def test_upsert_body_validates_against_the_contract_v1_json_schema(
    client: DynamicsClient, router: respx.Router
) -> None:
    route = router.put(UPSERT_URL).respond(200)

    await client.upsert_certification(make_upsert())

    body = json.loads(sent(route).content)
    validator = Draft202012Validator(contract_schema(), format_checker=FormatChecker())
    assert list(validator.iter_errors(body)) == []


async def test_upsert_body_is_the_contract_json_of_the_upsert(
    client: DynamicsClient, router: respx.Router
) -> None:
    route = router.put(UPSERT_URL).respond(200)
    upsert = make_upsert()

    await client.upsert_certification(upsert)

    assert json.loads(sent(route).content) == {
        "contract_version": 1,
        "event_id": str(EVENT_ID),
        "occurred_at": "2026-11-29T10:00:00Z",
        "certification": {
            "id": str(CERT_ID),
            "peer_mentor_id": str(MENTOR_ID),
            "certification_type": "peer_mentor",
            "status": "expired",
            "valid_from": "2025-11-01",
            "valid_until": "2026-11-01",
            "version": 7,
        },
        "publicly_listed": False,
    }


async def test_requests_use_the_configured_timeout(client: DynamicsClient, router: respx.Router) -> None:
    route = router.put(UPSERT_URL).respond(200)

    await client.upsert_certification(make_upsert())

    assert sent(route).extensions["timeout"] == {"connect": 3.0, "read": 3.0, "write": 3.0, "pool": 3.0}


async def test_a_trailing_slash_on_the_base_url_does_not_double_the_path_separator(
    http: httpx.AsyncClient, router: respx.Router
) -> None:
    route = router.put(UPSERT_URL).respond(200)
    client = DynamicsClient(http, BASE + "/", StaticTokenProvider(TOKEN))

    await client.upsert_certification(make_upsert())

    assert str(sent(route).url) == UPSERT_URL


async def test_signed_upsert_verifies_with_standard_webhooks_over_the_bytes_sent(
    http: httpx.AsyncClient, router: respx.Router
) -> None:
    route = router.put(UPSERT_URL).respond(200)
    # The library's verifier compares against the real wall clock, so sign "now".
    clock = ManualClock(datetime.now(UTC))
    client = DynamicsClient(http, BASE, StaticTokenProvider(TOKEN), signer=RequestSigner(SECRET), clock=clock)

    await client.upsert_certification(make_upsert())

    request = sent(route)
    verified = Webhook(SECRET).verify(request.content, dict(request.headers))
    assert verified == json.loads(request.content)


async def test_signed_upsert_uses_the_event_id_as_webhook_id_and_the_clock_for_the_timestamp(
    http: httpx.AsyncClient, router: respx.Router, clock: ManualClock
) -> None:
    route = router.put(UPSERT_URL).respond(200)
    client = DynamicsClient(http, BASE, StaticTokenProvider(TOKEN), signer=RequestSigner(SECRET), clock=clock)

    await client.upsert_certification(make_upsert())

    headers = sent(route).headers
    assert headers["webhook-id"] == str(EVENT_ID) == headers["Idempotency-Key"]
    assert headers["webhook-timestamp"] == str(int(clock.now().timestamp()))


# --- classification: delivered -------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 204])
async def test_any_2xx_is_delivered_with_its_status(
    client: DynamicsClient, router: respx.Router, status: int
) -> None:
    router.put(UPSERT_URL).respond(status)

    receipt = await client.upsert_certification(make_upsert())

    assert receipt.status == status


async def test_receipt_carries_the_elapsed_seconds_of_the_call_on_the_injected_clock(
    client: DynamicsClient, router: respx.Router, clock: ManualClock
) -> None:
    router.put(UPSERT_URL).mock(side_effect=answering_after(clock, 0.25, 200))

    receipt = await client.upsert_certification(make_upsert())

    assert receipt == DeliveryReceipt(status=200, elapsed_seconds=0.25)


# --- classification: transient -------------------------------------------------------------------


async def upsert_error(
    client: DynamicsClient, router: respx.Router, answer: httpx.Response | type[Exception]
) -> DynamicsError:
    """What ``upsert_certification`` raises when the portal answers (or the transport fails) so, once."""
    router.put(UPSERT_URL).mock(side_effect=[answer])
    with pytest.raises(DynamicsError) as raised:
        await client.upsert_certification(make_upsert())
    return raised.value


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (408, "HTTP 408 Request Timeout"),
        (500, "HTTP 500 Internal Server Error"),
        (502, "HTTP 502 Bad Gateway"),
        (503, "HTTP 503 Service Unavailable"),
    ],
)
async def test_408_and_5xx_are_transient_with_the_status_as_reason(
    client: DynamicsClient, router: respx.Router, status: int, reason: str
) -> None:
    error = await upsert_error(client, router, httpx.Response(status))

    assert type(error) is TransientDynamicsError
    assert (error.reason, error.status, error.retry_after) == (reason, status, None)


async def test_429_is_rate_limited_with_retry_after_in_seconds(
    client: DynamicsClient, router: respx.Router
) -> None:
    error = await upsert_error(client, router, httpx.Response(429, headers={"Retry-After": "30"}))

    assert isinstance(error, RateLimitedError)
    assert (error.reason, error.status, error.retry_after) == ("HTTP 429 Too Many Requests", 429, 30.0)


async def test_429_with_an_http_date_retry_after_waits_until_that_date_on_the_injected_clock(
    client: DynamicsClient, router: respx.Router, clock: ManualClock
) -> None:
    until = format_datetime(clock.now() + timedelta(seconds=90), usegmt=True)

    error = await upsert_error(client, router, httpx.Response(429, headers={"Retry-After": until}))

    assert isinstance(error, RateLimitedError)
    assert error.retry_after == 90.0


async def test_429_without_retry_after_has_none(client: DynamicsClient, router: respx.Router) -> None:
    error = await upsert_error(client, router, httpx.Response(429))

    assert isinstance(error, RateLimitedError)
    assert error.retry_after is None


async def test_503_with_retry_after_is_transient_and_carries_it(
    client: DynamicsClient, router: respx.Router
) -> None:
    error = await upsert_error(client, router, httpx.Response(503, headers={"Retry-After": "120"}))

    assert type(error) is TransientDynamicsError
    assert error.retry_after == 120.0


async def test_retry_after_on_other_5xx_is_not_part_of_the_contract_and_ignored(
    client: DynamicsClient, router: respx.Router
) -> None:
    error = await upsert_error(client, router, httpx.Response(500, headers={"Retry-After": "120"}))

    assert isinstance(error, TransientDynamicsError)
    assert error.retry_after is None


async def test_a_timeout_is_transient_naming_the_httpx_error(
    client: DynamicsClient, router: respx.Router
) -> None:
    error = await upsert_error(client, router, httpx.ReadTimeout)

    assert type(error) is TransientDynamicsError
    assert (error.reason, error.status) == ("timeout: ReadTimeout", None)
    assert isinstance(error.__cause__, httpx.ReadTimeout)


async def test_a_connection_error_is_transient_naming_the_httpx_error(
    client: DynamicsClient, router: respx.Router
) -> None:
    error = await upsert_error(client, router, httpx.ConnectError)

    assert type(error) is TransientDynamicsError
    assert (error.reason, error.status) == ("transport: ConnectError", None)


# --- classification: permanent -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "HTTP 400 Bad Request"),
        (404, "HTTP 404 Not Found"),
        (422, "HTTP 422 Unprocessable Entity"),
        (301, "HTTP 301 Moved Permanently"),
    ],
)
async def test_other_statuses_are_permanent_with_the_status_as_reason(
    client: DynamicsClient, router: respx.Router, status: int, reason: str
) -> None:
    error = await upsert_error(client, router, httpx.Response(status, json={"error": "invalid"}))

    assert type(error) is PermanentDynamicsError
    assert (error.reason, error.status) == (reason, status)


async def test_a_refusal_listing_accepted_versions_without_ours_is_a_contract_mismatch(
    client: DynamicsClient, router: respx.Router
) -> None:
    refusal = {"error": "unsupported_contract_version", "accepted_contract_versions": [2, 3]}

    error = await upsert_error(client, router, httpx.Response(409, json=refusal))

    assert isinstance(error, ContractMismatchError)
    assert error.reason == "HTTP 409 Conflict: contract v1 not accepted (portal accepts 2, 3)"
    assert error.status == 409


async def test_a_refusal_listing_our_version_among_the_accepted_is_an_ordinary_permanent_error(
    client: DynamicsClient, router: respx.Router
) -> None:
    error = await upsert_error(
        client, router, httpx.Response(400, json={"accepted_contract_versions": [1, 2]})
    )

    assert type(error) is PermanentDynamicsError


# --- 401: one fresh token, one retry ---------------------------------------------------------------


async def test_401_then_200_invalidates_the_token_and_delivers_with_a_fresh_one(
    http: httpx.AsyncClient, router: respx.Router
) -> None:
    tokens = RotatingTokens()
    route = router.put(UPSERT_URL).mock(side_effect=[httpx.Response(401), httpx.Response(200)])
    client = DynamicsClient(http, BASE, tokens)

    receipt = await client.upsert_certification(make_upsert())

    assert receipt.status == 200
    assert tokens.invalidated == ["token-1"]
    assert [call.request.headers["Authorization"] for call in route.calls] == [
        "Bearer token-1",
        "Bearer token-2",
    ]


async def test_the_retry_after_401_resends_the_identical_body_and_idempotency_key(
    http: httpx.AsyncClient, router: respx.Router
) -> None:
    route = router.put(UPSERT_URL).mock(side_effect=[httpx.Response(401), httpx.Response(200)])
    client = DynamicsClient(http, BASE, RotatingTokens())

    await client.upsert_certification(make_upsert())

    first, second = (call.request for call in route.calls)
    assert first.content == second.content
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]


async def test_401_twice_is_an_authentication_error_after_exactly_two_requests(
    http: httpx.AsyncClient, router: respx.Router
) -> None:
    tokens = RotatingTokens()
    route = router.put(UPSERT_URL).respond(401)
    client = DynamicsClient(http, BASE, tokens)

    with pytest.raises(AuthenticationError) as raised:
        await client.upsert_certification(make_upsert())

    assert (raised.value.reason, raised.value.status) == ("HTTP 401 Unauthorized", 401)
    assert route.call_count == 2
    assert tokens.invalidated == ["token-1"]


async def test_401_on_a_get_also_gets_one_fresh_token(http: httpx.AsyncClient, router: respx.Router) -> None:
    router.get("/api/v1/contract").mock(
        side_effect=[httpx.Response(401), httpx.Response(200, json={"contract_versions": [1]})]
    )
    tokens = RotatingTokens()
    client = DynamicsClient(http, BASE, tokens)

    assert await client.contract_versions() == (1,)
    assert tokens.invalidated == ["token-1"]


# --- the two GET endpoints -----------------------------------------------------------------------


async def test_contract_versions_reads_the_accepted_versions(
    client: DynamicsClient, router: respx.Router
) -> None:
    route = router.get("/api/v1/contract").respond(200, json={"contract_versions": [1, 2]})

    assert await client.contract_versions() == (1, 2)
    assert sent(route).headers["Authorization"] == f"Bearer {TOKEN}"


async def test_the_probe_is_an_authorised_get_of_the_contract(
    client: DynamicsClient, router: respx.Router
) -> None:
    route = router.get("/api/v1/contract").respond(200, json={"contract_versions": [1]})

    await client.probe()

    assert sent(route).headers["Authorization"] == f"Bearer {TOKEN}"
    router.get("/api/v1/contract").respond(502)
    with pytest.raises(TransientDynamicsError):
        await client.probe()


async def test_public_listing_reads_the_listed_peer_mentor_ids(
    client: DynamicsClient, router: respx.Router
) -> None:
    other = UUID("99999999-8888-4777-8666-555555555555")
    router.get("/api/v1/public-listing").respond(
        200, json={"peer_mentor_ids": [str(MENTOR_ID), str(other), str(MENTOR_ID)]}
    )

    assert await client.public_listing() == frozenset({MENTOR_ID, other})


async def test_a_malformed_contract_answer_is_a_permanent_error(
    client: DynamicsClient, router: respx.Router
) -> None:
    router.get("/api/v1/contract").respond(200, text="<html>maintenance</html>")

    with pytest.raises(PermanentDynamicsError) as raised:
        await client.contract_versions()

    assert raised.value.reason == "malformed response: HTTP 200 from /api/v1/contract"


async def test_a_get_answered_503_is_classified_like_any_request(
    client: DynamicsClient, router: respx.Router
) -> None:
    router.get("/api/v1/public-listing").respond(503)

    with pytest.raises(TransientDynamicsError):
        await client.public_listing()


# --- logging -------------------------------------------------------------------------------------


async def test_each_http_exchange_is_logged_once_with_method_path_status_and_duration(
    client: DynamicsClient, router: respx.Router, clock: ManualClock
) -> None:
    router.put(UPSERT_URL).mock(side_effect=answering_after(clock, 0.125, 204))

    with capture_logs() as logs:
        await client.upsert_certification(make_upsert())

    assert logs == [
        {
            "event": "dynamics_request",
            "log_level": "info",
            "method": "PUT",
            "path": f"/api/v1/certifications/{CERT_ID}",
            "status": 204,
            "duration_ms": 125.0,
            "event_id": str(EVENT_ID),
        }
    ]


async def test_a_refused_request_is_logged_as_a_warning_without_the_token(
    client: DynamicsClient, router: respx.Router
) -> None:
    router.put(UPSERT_URL).respond(401)

    with capture_logs() as logs, pytest.raises(AuthenticationError):
        await client.upsert_certification(make_upsert())

    assert [(entry["log_level"], entry["status"]) for entry in logs] == [("warning", 401), ("warning", 401)]
    assert TOKEN not in repr(logs)


async def test_a_transport_failure_is_logged_with_the_error_class(
    client: DynamicsClient, router: respx.Router
) -> None:
    router.get("/api/v1/contract").mock(side_effect=httpx.ConnectTimeout)

    with capture_logs() as logs, pytest.raises(TransientDynamicsError):
        await client.contract_versions()

    assert logs == [
        {
            "event": "dynamics_request",
            "log_level": "warning",
            "method": "GET",
            "path": "/api/v1/contract",
            "error": "ConnectTimeout",
            "duration_ms": 0.0,
        }
    ]


# --- pacing: each exchange goes through the gate and reports the portal's remaining budget ----------

BUDGET = "x-ms-ratelimit-burst-remaining-xrm-requests"


@pytest.mark.parametrize(
    ("value", "budget"),
    [("7999", 7999), ("0", 0), ("1,200", 1200), (" 12.0 ", 12), ("-3", 0), ("many", None), ("inf", None)],
)
def test_the_remaining_budget_is_read_from_dataverses_header(value: str, budget: int | None) -> None:
    assert remaining_budget(httpx.Response(200, headers={BUDGET: value})) == budget


def test_no_header_is_no_budget() -> None:
    assert remaining_budget(httpx.Response(200)) is None


@pytest.fixture
def gate(clock: ManualClock) -> SendGate:
    return SendGate(clock, clock.sleep, window_seconds=60)


@pytest.fixture
def paced_client(http: httpx.AsyncClient, clock: ManualClock, gate: SendGate) -> DynamicsClient:
    return DynamicsClient(http, BASE, StaticTokenProvider(TOKEN), clock=clock, timeout=3.0, gate=gate)


async def test_an_answer_hands_its_budget_to_the_gate(
    paced_client: DynamicsClient, router: respx.Router, gate: SendGate
) -> None:
    router.put(UPSERT_URL).mock(return_value=httpx.Response(200, headers={BUDGET: "41"}))

    await paced_client.upsert_certification(make_upsert())

    assert (gate.available(), gate.in_flight) == (41, 0)


async def test_a_spent_budget_holds_the_next_request_until_the_window_frees(
    paced_client: DynamicsClient, router: respx.Router, gate: SendGate, clock: ManualClock
) -> None:
    route = router.put(UPSERT_URL).mock(return_value=httpx.Response(200, headers={BUDGET: "0"}))

    await paced_client.upsert_certification(make_upsert())
    await paced_client.upsert_certification(make_upsert())

    assert route.call_count == 2
    assert clock.sleeps == [pytest.approx(60.001)]


async def test_a_refusal_and_a_transport_failure_give_the_permit_back(
    paced_client: DynamicsClient, router: respx.Router, gate: SendGate, clock: ManualClock
) -> None:
    router.put(UPSERT_URL).mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "2", BUDGET: "0"}), httpx.ConnectError("x")]
    )

    for _ in range(2):
        with pytest.raises(TransientDynamicsError):
            await paced_client.upsert_certification(make_upsert())

    assert gate.in_flight == 0
    # The 429 took no slot and nothing of ours is in the window: the next request is a probe, not a wait.
    await gate.acquire()
    assert clock.sleeps == []


async def test_the_401_retry_is_a_second_exchange_through_the_gate(
    http: httpx.AsyncClient, router: respx.Router, gate: SendGate, clock: ManualClock
) -> None:
    tokens = RotatingTokens()
    client = DynamicsClient(http, BASE, tokens, clock=clock, gate=gate)
    router.put(UPSERT_URL).mock(
        side_effect=[httpx.Response(401, headers={BUDGET: "9"}), httpx.Response(200, headers={BUDGET: "8"})]
    )

    await client.upsert_certification(make_upsert())

    assert (gate.available(), gate.in_flight) == (8, 0)
