"""The sandbox portal over real HTTP on loopback: contract v1, auth, signatures, faults, the request log."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID, uuid4

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from certsync.dynamics.contract import CertificationState, CertificationUpsert
from certsync.resilience.testing import ManualClock
from certsync.sandbox import FaultScript, FaultStep, Latency, RateLimit, SandboxConfig, SandboxServer

TOKEN = "integration-token"
SIGNING_SECRET = "whsec_" + "c2FuZGJveC1zaWduaW5nLXNlY3JldC1mb3ItdGVzdHM="
TODAY = date(2026, 11, 29)


def upsert_body(
    certification_id: UUID,
    version: int,
    *,
    status: str = "active",
    peer_mentor_id: UUID | None = None,
    valid_until: date = date(2027, 11, 1),
) -> dict[str, Any]:
    state = CertificationState(
        id=certification_id,
        peer_mentor_id=peer_mentor_id or uuid4(),
        certification_type="peer_mentor",
        status=status,
        valid_from=date(2025, 11, 1),
        valid_until=valid_until,
        version=version,
    )
    occurred = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
    return CertificationUpsert.for_state(uuid4(), occurred, state, TODAY).to_json_dict()


def put(
    client: httpx.Client, body: dict[str, Any], *, token: str | None = TOKEN, **headers: str
) -> httpx.Response:
    # No token: an empty Authorization replaces the client's default one.
    sent = {"Idempotency-Key": body["event_id"], "Authorization": "", **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return client.put(f"/api/v1/certifications/{body['certification']['id']}", json=body, headers=sent)


def recorded(client: httpx.Client) -> list[dict[str, Any]]:
    return list(client.get("/_sandbox/requests").json()["requests"])


DEFAULT_CONFIG = SandboxConfig(static_tokens=(TOKEN,))
BUDGET = "x-ms-ratelimit-burst-remaining-xrm-requests"


@pytest.fixture(scope="module")
def shared_server() -> Iterator[SandboxServer]:
    with SandboxServer(DEFAULT_CONFIG) as running:
        yield running


@pytest.fixture
def server_config() -> SandboxConfig:
    """Overridden by ``parametrize`` in the tests that need another start configuration."""
    return DEFAULT_CONFIG


@pytest.fixture
def server(request: pytest.FixtureRequest, server_config: SandboxConfig) -> Iterator[SandboxServer]:
    # One server for every test on the default configuration, reset between them: starting and
    # stopping uvicorn costs ~0.2 s each time.
    if server_config is DEFAULT_CONFIG:
        shared: SandboxServer = request.getfixturevalue("shared_server")
        httpx.post(f"{shared.url}/_sandbox/reset").raise_for_status()
        yield shared
        return
    with SandboxServer(server_config) as running:
        yield running


@pytest.fixture
def client(server: SandboxServer) -> Iterator[httpx.Client]:
    """A client that sends the test token on every request, as certsync does (``put`` may override it)."""
    with httpx.Client(base_url=server.url, timeout=5, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield http


# the upsert ---------------------------------------------------------------------------------------


def test_a_valid_upsert_is_stored_and_answered_200(client: httpx.Client) -> None:
    body = upsert_body(uuid4(), 1)

    response = put(client, body)

    assert response.status_code == 200
    assert response.json() == {"certification_id": body["certification"]["id"], "applied": True, "version": 1}
    assert client.get("/_sandbox/state").json()["certifications"][body["certification"]["id"]] == body


def test_the_portal_keeps_the_highest_version_and_the_history_only_grows(client: httpx.Client) -> None:
    certification_id = uuid4()
    for version in (1, 3, 2, 5, 4):
        assert put(client, upsert_body(certification_id, version)).status_code == 200

    state = client.get("/_sandbox/state").json()

    assert state["certifications"][str(certification_id)]["certification"]["version"] == 5
    assert state["history"][str(certification_id)] == [1, 3, 5]


def test_an_older_version_is_acknowledged_but_ignored_and_recorded(client: httpx.Client) -> None:
    certification_id = uuid4()
    put(client, upsert_body(certification_id, 7, status="active"))
    older = upsert_body(certification_id, 6, status="revoked")

    response = put(client, older)

    state = client.get("/_sandbox/state").json()
    assert response.status_code == 200
    assert response.json()["applied"] is False
    assert state["certifications"][str(certification_id)]["certification"]["status"] == "active"
    assert state["ignored"] == [
        {
            "certification_id": str(certification_id),
            "event_id": older["event_id"],
            "version": 6,
            "held_version": 7,
        }
    ]
    assert recorded(client)[-1]["outcome"] == "ignored_not_newer"


def test_resending_the_same_event_is_harmless(client: httpx.Client) -> None:
    body = upsert_body(uuid4(), 2)

    first, again = put(client, body), put(client, body)

    assert (first.status_code, again.status_code) == (200, 200)
    assert (first.json()["applied"], again.json()["applied"]) == (True, True)
    state = client.get("/_sandbox/state").json()
    assert state["certifications"][body["certification"]["id"]] == body
    assert state["ignored"] == []


def test_an_equal_version_replaces_what_is_held(client: httpx.Client) -> None:
    """Contract v1: only older versions are ignored, so a repair of the same version corrects it."""
    held = upsert_body(uuid4(), 3)
    put(client, held)
    corrected = {**held, "event_id": str(uuid4()), "publicly_listed": not held["publicly_listed"]}

    response = put(client, corrected)

    assert response.json()["applied"] is True
    certification_id = held["certification"]["id"]
    state = client.get("/_sandbox/state").json()
    assert state["certifications"][certification_id]["publicly_listed"] is corrected["publicly_listed"]


def delete(client: httpx.Client, certification_id: str, event_id: UUID | None = None) -> httpx.Response:
    return client.delete(
        f"/api/v1/certifications/{certification_id}",
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": str(event_id or uuid4())},
    )


def test_a_delete_forgets_the_certification_and_a_second_one_is_404(client: httpx.Client) -> None:
    body = upsert_body(uuid4(), 1)
    put(client, body)
    certification_id = body["certification"]["id"]

    first, again = delete(client, certification_id), delete(client, certification_id)

    assert (first.status_code, again.status_code) == (204, 404)
    state = client.get("/_sandbox/state").json()
    assert certification_id not in state["certifications"]
    assert state["deleted"] == [certification_id]
    assert [r["outcome"] for r in recorded(client)[-2:]] == ["deleted", "not_found"]


def test_a_delete_needs_the_token_and_an_idempotency_key(client: httpx.Client) -> None:
    certification_id = str(uuid4())
    anonymous = client.delete(f"/api/v1/certifications/{certification_id}", headers={"Authorization": ""})
    unkeyed = client.delete(f"/api/v1/certifications/{certification_id}")

    assert anonymous.status_code == 401
    assert (unkeyed.status_code, unkeyed.json()["error"]) == (400, "idempotency_key_missing")


def test_the_listing_pages_by_id_until_next_is_null(client: httpx.Client) -> None:
    bodies = [upsert_body(uuid4(), n) for n in range(1, 8)]
    for body in bodies:
        put(client, body)
    delete(client, bodies[3]["certification"]["id"])
    expected = sorted(
        (b["certification"]["id"], b["certification"]["version"]) for i, b in enumerate(bodies) if i != 3
    )

    seen: list[tuple[str, int]] = []
    pages, after = 0, None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if after:
            params["after"] = after
        page = client.get(
            "/api/v1/certifications", params=params, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert page.status_code == 200
        seen += [(row["id"], row["version"]) for row in page.json()["certifications"]]
        pages += 1
        after = page.json()["next"]
        if after is None:
            break

    assert seen == expected
    assert pages == 3
    row = client.get(
        "/api/v1/certifications", params={"limit": 1}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert set(row.json()["certifications"][0]) == {"id", "version", "status", "publicly_listed"}


def test_the_listing_needs_the_token_and_a_sane_limit(client: httpx.Client) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/v1/certifications", headers={"Authorization": ""}).status_code == 401
    assert client.get("/api/v1/certifications", params={"limit": 0}, headers=auth).status_code == 422
    assert client.get("/api/v1/certifications", params={"after": "x"}, headers=auth).status_code == 422


def test_a_body_against_the_schema_is_422_naming_the_field(client: httpx.Client) -> None:
    body = upsert_body(uuid4(), 1)
    body["certification"]["status"] = "lapsed"

    response = put(client, body)

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_body"
    assert [error["path"] for error in response.json()["errors"]] == ["/certification/status"]


def test_a_malformed_date_is_422(client: httpx.Client) -> None:
    body = upsert_body(uuid4(), 1)
    body["certification"]["valid_until"] = "2026-02-30"

    assert put(client, body).status_code == 422


def test_a_body_that_is_not_json_is_422(client: httpx.Client) -> None:
    response = client.put(
        f"/api/v1/certifications/{uuid4()}",
        content=b"{not json",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )

    assert (response.status_code, response.json()["error"]) == (422, "invalid_body")


def test_a_path_id_other_than_the_body_id_is_422(client: httpx.Client) -> None:
    body = upsert_body(uuid4(), 1)

    response = client.put(
        f"/api/v1/certifications/{uuid4()}",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": body["event_id"]},
    )

    assert (response.status_code, response.json()["error"]) == (422, "certification_id_mismatch")


def test_the_idempotency_key_must_be_the_event_id(client: httpx.Client) -> None:
    body = upsert_body(uuid4(), 1)

    response = put(client, body, **{"Idempotency-Key": str(uuid4())})

    assert (response.status_code, response.json()["error"]) == (400, "idempotency_key_mismatch")


def test_the_public_listing_follows_each_certifications_latest_state(client: httpx.Client) -> None:
    listed_mentor, expiring_mentor = uuid4(), uuid4()
    expiring = uuid4()
    put(client, upsert_body(uuid4(), 1, peer_mentor_id=listed_mentor))
    put(client, upsert_body(expiring, 1, peer_mentor_id=expiring_mentor))
    before = client.get("/api/v1/public-listing").json()["peer_mentor_ids"]

    put(client, upsert_body(expiring, 2, status="expired", peer_mentor_id=expiring_mentor))
    after = client.get("/api/v1/public-listing").json()["peer_mentor_ids"]

    assert sorted(before) == sorted([str(listed_mentor), str(expiring_mentor)])
    assert after == [str(listed_mentor)]


# tokens and signatures ----------------------------------------------------------------------------


def test_a_request_without_a_bearer_token_is_401(client: httpx.Client) -> None:
    response = put(client, upsert_body(uuid4(), 1), token=None)

    assert response.status_code == 401
    assert response.json() == {"error": "invalid_token"}
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_an_issued_token_is_accepted_until_the_admin_expires_it(client: httpx.Client) -> None:
    issued = client.post(
        "/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "certsync",
            "client_secret": "sandbox-secret",
            "scope": "https://portal.example/.default",
        },
    )
    token = issued.json()["access_token"]
    accepted = put(client, upsert_body(uuid4(), 1), token=token)

    expired = client.post("/_sandbox/expire-tokens").json()
    refused = put(client, upsert_body(uuid4(), 1), token=token)

    assert issued.status_code == 200
    assert issued.json()["token_type"] == "Bearer"
    assert issued.json()["expires_in"] == 3599
    assert accepted.status_code == 200
    assert expired == {"expired": 1}
    assert refused.status_code == 401


def test_an_issued_token_expires_after_its_lifetime_on_the_sandbox_clock() -> None:
    clock = ManualClock()
    config = SandboxConfig(token_ttl_seconds=60, monotonic=lambda: clock.now().timestamp())
    with SandboxServer(config) as server, httpx.Client(base_url=server.url) as http:
        token = http.post(
            "/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "certsync",
                "client_secret": "sandbox-secret",
            },
        ).json()["access_token"]
        clock.advance(59)
        still_valid = put(http, upsert_body(uuid4(), 1), token=token)
        clock.advance(1)
        expired = put(http, upsert_body(uuid4(), 1), token=token)

    assert (still_valid.status_code, expired.status_code) == (200, 401)


def test_wrong_client_credentials_are_invalid_client_401(client: httpx.Client) -> None:
    response = client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": "certsync", "client_secret": "guess"},
    )

    assert (response.status_code, response.json()) == (401, {"error": "invalid_client"})


@pytest.mark.parametrize(
    "server_config", [SandboxConfig(static_tokens=(TOKEN,), signing_secret=SIGNING_SECRET)]
)
def test_when_a_signing_secret_is_configured_only_signed_requests_are_accepted(client: httpx.Client) -> None:
    def signed_put(secret: str) -> httpx.Response:
        body = upsert_body(uuid4(), 1)
        content = httpx.Request("PUT", "http://x", json=body).content.decode()
        now = datetime.now(UTC)
        signature = Webhook(secret).sign(body["event_id"], now, content)
        headers = {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
            "Idempotency-Key": body["event_id"],
            "webhook-id": body["event_id"],
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature,
        }
        return client.put(
            f"/api/v1/certifications/{body['certification']['id']}", content=content, headers=headers
        )

    unsigned = put(client, upsert_body(uuid4(), 1))
    signed = signed_put(SIGNING_SECRET)
    wrong_key = signed_put("whsec_" + "b3RoZXItc2VjcmV0LW9mLWVub3VnaC1sZW5ndGg=")

    assert (unsigned.status_code, unsigned.json()["error"]) == (401, "invalid_signature")
    assert signed.status_code == 200
    assert (wrong_key.status_code, wrong_key.json()["error"]) == (401, "invalid_signature")


# contract versions --------------------------------------------------------------------------------


def test_the_contract_endpoint_says_which_versions_are_accepted(client: httpx.Client) -> None:
    assert client.get("/api/v1/contract").json() == {"contract_versions": [1]}


def test_after_a_contract_switch_a_v1_upsert_is_refused_with_409(client: httpx.Client) -> None:
    switched = client.post("/_sandbox/contract-versions", json={"contract_versions": [2]})

    response = put(client, upsert_body(uuid4(), 1))

    assert switched.status_code == 200
    assert client.get("/api/v1/contract").json() == {"contract_versions": [2]}
    assert response.status_code == 409
    assert response.json() == {"error": "unsupported_contract_version", "accepted_contract_versions": [2]}


# faults -------------------------------------------------------------------------------------------


def test_a_script_of_three_503s_answers_them_in_order_then_200(client: httpx.Client) -> None:
    client.post("/_sandbox/faults", json={"steps": [{"status": 503, "times": 3}]})
    body = upsert_body(uuid4(), 1)

    codes = [put(client, body).status_code for _ in range(4)]

    assert codes == [503, 503, 503, 200]
    assert [(entry["status"], entry["fault"]) for entry in recorded(client)] == [
        (503, "status:503"),
        (503, "status:503"),
        (503, "status:503"),
        (200, None),
    ]


def test_a_scripted_429_carries_retry_after(client: httpx.Client) -> None:
    client.post("/_sandbox/faults", json={"steps": [{"status": 429, "retry_after": 7}]})

    response = put(client, upsert_body(uuid4(), 1))

    assert (response.status_code, response.headers["retry-after"]) == (429, "7")


def test_a_dropped_connection_is_a_transport_error_for_httpx(client: httpx.Client) -> None:
    client.post("/_sandbox/faults", json={"steps": [{"drop": True}]})

    with pytest.raises(httpx.TransportError) as raised:
        put(client, upsert_body(uuid4(), 1))
    after = put(client, upsert_body(uuid4(), 1))

    assert isinstance(raised.value, (httpx.RemoteProtocolError, httpx.ReadError))
    assert after.status_code == 200
    assert [(entry["status"], entry["fault"]) for entry in recorded(client)] == [(None, "drop"), (200, None)]


def test_a_client_that_hangs_up_mid_body_is_recorded_not_logged_as_a_server_error(
    client: httpx.Client, server: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    with socket.create_connection((host, port), timeout=5) as hanging_up:
        hanging_up.sendall(
            f"PUT /api/v1/certifications/{uuid4()} HTTP/1.1\r\nHost: {host}\r\n"
            'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"contract'.encode()
        )
    for _ in range(100):
        if recorded(client):
            break
        time.sleep(0.02)

    assert [(e["status"], e["outcome"]) for e in recorded(client)] == [(499, "client_disconnected")]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no traceback for a hang-up"


def test_faults_scoped_to_the_put_leave_the_token_endpoint_alone(client: httpx.Client) -> None:
    client.post("/_sandbox/faults", json={"steps": [{"status": 500, "scope": "put"}]})

    token = client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": "certsync", "client_secret": "sandbox-secret"},
    )

    assert token.status_code == 200
    assert put(client, upsert_body(uuid4(), 1)).status_code == 500


def test_admin_requests_are_never_subject_to_faults(client: httpx.Client) -> None:
    client.post("/_sandbox/faults", json={"steps": [{"status": 503, "times": None}]})

    assert client.get("/_sandbox/state").status_code == 200
    assert client.get("/api/v1/contract").status_code == 503
    assert client.post("/_sandbox/faults", json={}).status_code == 200
    assert client.get("/api/v1/contract").status_code == 200


def test_an_invalid_fault_script_is_422_and_changes_nothing(client: httpx.Client) -> None:
    response = client.post("/_sandbox/faults", json={"steps": [{"status": 503, "drop": True}]})

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_fault_script"
    assert client.get("/api/v1/contract").status_code == 200


@pytest.mark.parametrize(
    "server_config",
    [
        SandboxConfig(
            static_tokens=(TOKEN,), faults=FaultScript(rate_limit=RateLimit(requests=2, window_seconds=60))
        )
    ],
)
def test_the_service_protection_window_answers_429_beyond_its_limit(client: httpx.Client) -> None:
    codes = [put(client, upsert_body(uuid4(), 1)) for _ in range(3)]

    assert [response.status_code for response in codes] == [200, 200, 429]
    assert 59 <= int(codes[2].headers["retry-after"]) <= 60
    assert recorded(client)[-1]["fault"] == "rate_limit:window"


@pytest.mark.parametrize(
    "server_config",
    [
        SandboxConfig(
            static_tokens=(TOKEN,),
            faults=FaultScript(rate_limit=RateLimit(max_concurrent=1), latency=Latency(min_ms=300)),
        )
    ],
)
async def test_concurrent_requests_beyond_the_cap_answer_429(server: SandboxServer) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=5) as http:
        responses = await asyncio.gather(*(http.get("/api/v1/contract") for _ in range(2)))

    assert sorted(response.status_code for response in responses) == [200, 429]


@pytest.mark.parametrize(
    "server_config", [SandboxConfig(static_tokens=(TOKEN,), faults=FaultScript(latency=Latency(min_ms=150)))]
)
def test_configured_latency_delays_the_answer(client: httpx.Client) -> None:
    started = time.monotonic()
    client.get("/api/v1/contract")

    assert time.monotonic() - started >= 0.15
    assert recorded(client)[-1]["delay_ms"] == 150.0


# the request log and reset ------------------------------------------------------------------------


def test_the_contract_and_the_listing_need_the_token_too(client: httpx.Client) -> None:
    """Contract v1: every portal route takes the bearer token, the two reads included."""
    anonymous = {"Authorization": ""}
    for path in ("/api/v1/contract", "/api/v1/public-listing"):
        assert client.get(path, headers=anonymous).status_code == 401
        assert client.get(path).status_code == 200


def test_the_request_log_records_the_exact_sequence_without_the_token(client: httpx.Client) -> None:
    body = upsert_body(uuid4(), 1)
    client.get("/api/v1/contract")
    put(client, body, token=None)
    put(client, body)

    log = recorded(client)

    assert [(entry["method"], entry["status"], entry["outcome"]) for entry in log] == [
        ("GET", 200, None),
        ("PUT", 401, "invalid_token"),
        ("PUT", 200, "stored"),
    ]
    assert [entry["seq"] for entry in log] == [1, 2, 3]
    assert log[2]["idempotency_key"] == body["event_id"]
    assert [entry["has_authorization"] for entry in log] == [True, False, True]
    assert TOKEN not in client.get("/_sandbox/requests").text
    assert [
        entry["seq"] for entry in client.get("/_sandbox/requests", params={"since": 2}).json()["requests"]
    ] == [3]


@pytest.mark.parametrize("server_config", [SandboxConfig(static_tokens=(TOKEN,), request_log_size=3)])
def test_the_request_log_keeps_only_the_newest_entries(client: httpx.Client) -> None:
    for _ in range(5):
        client.get("/api/v1/contract")

    assert [entry["seq"] for entry in recorded(client)] == [3, 4, 5]


@pytest.mark.parametrize(
    "server_config",
    [SandboxConfig(static_tokens=(TOKEN,), faults=FaultScript(steps=(FaultStep(status=503, times=1),)))],
)
def test_reset_forgets_everything_and_restores_the_start_configuration(client: httpx.Client) -> None:
    assert client.get("/api/v1/contract").status_code == 503
    client.post("/_sandbox/contract-versions", json={"contract_versions": [2]})
    put(client, upsert_body(uuid4(), 1))

    client.post("/_sandbox/reset")

    assert client.get("/_sandbox/state").json()["certifications"] == {}
    assert client.get("/api/v1/contract").status_code == 503
    assert client.get("/api/v1/contract").json() == {"contract_versions": [1]}
    assert [entry["seq"] for entry in recorded(client)] == [1, 2]
