"""The contract v1 adapter's side of the portal port beyond the upsert: delete, the paged read that
reconcile uses, and the contract check (respx-mocked portal; the wire pinned in interface section 4)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from uuid import UUID

import httpx
import pytest
import respx
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from certsync.dynamics.auth import StaticTokenProvider
from certsync.dynamics.client import DynamicsClient
from certsync.dynamics.errors import PermanentDynamicsError, TransientDynamicsError
from certsync.dynamics.port import CertificationDelete, Portal, PortalHolding
from certsync.dynamics.signing import RequestSigner
from certsync.resilience.testing import ManualClock

BASE = "https://portal.hlf.example"
TOKEN = "static-token-abc"
SECRET = "whsec_" + base64.b64encode(b"certsync-unit-test-signing-key!!").decode()
EVENT_ID = UUID("6f1c2a34-0b1d-4c5e-9f00-1234567890ab")
CERT_ID = UUID("11111111-2222-4333-8444-555555555555")
DELETE = CertificationDelete(EVENT_ID, CERT_ID, datetime(2026, 12, 1, 10, 0, tzinfo=UTC))


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=BASE, assert_all_called=False)


@pytest.fixture
def client(http: httpx.AsyncClient, clock: ManualClock) -> DynamicsClient:
    return DynamicsClient(http, BASE, StaticTokenProvider(TOKEN), clock=clock, timeout=3.0)


def test_the_contract_v1_client_is_a_portal(client: DynamicsClient) -> None:
    portal: Portal = client  # the type checker holds the adapter to the port
    assert callable(portal.delete_certification)


@pytest.mark.parametrize("status", [200, 204, 404])
async def test_a_delete_is_done_on_2xx_or_404(
    router: respx.Router, client: DynamicsClient, status: int
) -> None:
    route = router.delete(f"/api/v1/certifications/{CERT_ID}").respond(status)
    receipt = await client.delete_certification(DELETE)
    assert receipt.status == status
    request = route.calls.last.request
    assert request.content == b""
    assert request.headers["Idempotency-Key"] == str(EVENT_ID)
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Content-Type" not in request.headers


async def test_a_delete_refused_or_failing_is_classified_as_an_upsert_is(
    router: respx.Router, client: DynamicsClient
) -> None:
    router.delete(f"/api/v1/certifications/{CERT_ID}").mock(
        side_effect=[httpx.Response(503), httpx.Response(400)]
    )
    with pytest.raises(TransientDynamicsError):
        await client.delete_certification(DELETE)
    with pytest.raises(PermanentDynamicsError):
        await client.delete_certification(DELETE)


async def test_a_signed_delete_is_signed_over_an_empty_body(
    router: respx.Router, http: httpx.AsyncClient
) -> None:
    clock = ManualClock(datetime.now(UTC))  # the verifier checks the timestamp against the real time
    route = router.delete(f"/api/v1/certifications/{CERT_ID}").respond(204)
    signed = DynamicsClient(http, BASE, StaticTokenProvider(TOKEN), signer=RequestSigner(SECRET), clock=clock)
    await signed.delete_certification(DELETE)
    request = route.calls.last.request
    assert request.headers["webhook-id"] == str(EVENT_ID)
    # Standard Webhooks' own verifier: the signature matches the empty body that was sent (it then fails
    # only to parse "" as JSON, which it does after checking), and does not match any other body.
    with pytest.raises(json.JSONDecodeError):
        Webhook(SECRET).verify(b"", dict(request.headers))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b"{}", dict(request.headers))


async def test_holdings_follow_next_until_it_is_null(router: respx.Router, client: DynamicsClient) -> None:
    second = UUID("22222222-2222-4333-8444-555555555555")
    route = router.get("/api/v1/certifications").mock(
        side_effect=[
            httpx.Response(
                200,
                json={
                    "certifications": [
                        {"id": str(CERT_ID), "version": 3, "status": "active", "publicly_listed": True}
                    ],
                    "next": str(CERT_ID),
                },
            ),
            httpx.Response(
                200,
                json={
                    "certifications": [
                        {"id": str(second), "version": 1, "status": "revoked", "publicly_listed": False}
                    ],
                    "next": None,
                },
            ),
        ]
    )
    held = [h async for h in client.holdings(page_size=1)]
    assert held == [PortalHolding(CERT_ID, 3, "active", True), PortalHolding(second, 1, "revoked", False)]
    first_page, second_page = (call.request.url.params for call in route.calls)
    assert dict(first_page) == {"limit": "1"}
    assert dict(second_page) == {"limit": "1", "after": str(CERT_ID)}


async def test_a_holdings_page_the_client_cannot_read_is_the_portals_fault(
    router: respx.Router, client: DynamicsClient
) -> None:
    router.get("/api/v1/certifications").respond(200, json={"items": []})
    with pytest.raises(PermanentDynamicsError, match="malformed response"):
        [h async for h in client.holdings()]


async def test_the_contract_check_accepts_a_portal_that_lists_v1(
    router: respx.Router, client: DynamicsClient
) -> None:
    router.get("/api/v1/contract").respond(200, json={"contract_versions": [1, 2]})
    check = await client.check_contract()
    assert check.accepted
    assert check.problems == ()
    assert check.summary == "accepts contract v1 (accepted: v1, v2)"


async def test_the_contract_check_names_the_mismatch(router: respx.Router, client: DynamicsClient) -> None:
    router.get("/api/v1/contract").respond(200, json={"contract_versions": [2]})
    check = await client.check_contract()
    assert not check.accepted
    assert check.summary.startswith("CONTRACT MISMATCH: accepts v2, but certsync sends v1")
    assert len(check.problems) == 1
