"""DataverseClient against a respx-mocked Web API: the wire of interface section 5, the OData error
bodies kept in the reason, service-protection 429s, paging by @odata.nextLink, and the table check."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
import respx

from certsync.dynamics.auth import StaticTokenProvider
from certsync.dynamics.contract import CertificationState, CertificationUpsert
from certsync.dynamics.dataverse import COLUMNS, STATUS_CHOICES, DataverseClient, row_for
from certsync.dynamics.errors import (
    AuthenticationError,
    PermanentDynamicsError,
    RateLimitedError,
    TransientDynamicsError,
)
from certsync.dynamics.port import CertificationDelete
from certsync.resilience.testing import ManualClock

BASE = "https://hlf.crm4.dynamics.com"
API = f"{BASE}/api/data/v9.2"
TOKEN = "dataverse-token"
CERT_ID = UUID("11111111-2222-4333-8444-555555555555")
MENTOR_ID = UUID("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee")
BY_KEY = f"{API}/hlf_certifications(hlf_certsyncid='{CERT_ID}')"


def upsert(certification_id: UUID = CERT_ID, status: str = "active", version: int = 7) -> CertificationUpsert:
    state = CertificationState(
        id=certification_id,
        peer_mentor_id=MENTOR_ID,
        certification_type="peer_mentor",
        status=status,
        valid_from=date(2025, 11, 1),
        valid_until=date(2027, 11, 1),
        version=version,
    )
    return CertificationUpsert.for_state(
        uuid4(), datetime(2026, 11, 29, 10, 0, 5, 123456, tzinfo=UTC), state, today=date(2026, 11, 29)
    )


@pytest.fixture
def client() -> DataverseClient:
    return DataverseClient(httpx.AsyncClient(), BASE + "/", StaticTokenProvider(TOKEN), clock=ManualClock())


def odata_error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}}, headers=headers)


@respx.mock
async def test_an_upsert_is_a_patch_by_alternate_key_with_every_column_but_the_key(
    client: DataverseClient,
) -> None:
    route = respx.patch(BY_KEY).mock(return_value=httpx.Response(204))

    receipt = await client.upsert_certification(upsert())

    assert receipt.status == 204
    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["odata-version"] == "4.0"
    assert request.headers["odata-maxversion"] == "4.0"
    assert request.headers["accept"] == "application/json"
    assert "if-match" not in request.headers  # an upsert, not an update of an existing row only
    body = json.loads(request.content)
    assert body == {
        "hlf_peermentorid": str(MENTOR_ID),
        "hlf_certificationtype": "peer_mentor",
        "hlf_status": 100000000,
        "hlf_validfrom": "2025-11-01",
        "hlf_validuntil": "2027-11-01",
        "hlf_sourceversion": 7,
        "hlf_publiclylisted": True,
        "hlf_changedat": "2026-11-29T10:00:05Z",
    }
    assert set(body) == set(COLUMNS) - {"hlf_certsyncid"}


@pytest.mark.parametrize("status", sorted(STATUS_CHOICES))
def test_each_status_is_its_choice_value(status: str) -> None:
    assert row_for(upsert(status=status))["hlf_status"] == STATUS_CHOICES[status]  # type: ignore[index]


@respx.mock
async def test_upsert_multiple_sends_one_target_per_certification_with_the_key_only_in_odata_id(
    client: DataverseClient,
) -> None:
    route = respx.post(f"{API}/hlf_certifications/Microsoft.Dynamics.CRM.UpsertMultiple").mock(
        return_value=httpx.Response(200, json={"Ids": []})
    )
    first, second = upsert(uuid4()), upsert(uuid4(), status="expired")

    await client.upsert_many([first, second])

    targets = json.loads(route.calls.last.request.content)["Targets"]
    assert [t["@odata.id"] for t in targets] == [
        f"hlf_certifications(hlf_certsyncid='{first.certification.id}')",
        f"hlf_certifications(hlf_certsyncid='{second.certification.id}')",
    ]
    assert {t["@odata.type"] for t in targets} == {"Microsoft.Dynamics.CRM.hlf_certification"}
    assert all("hlf_certsyncid" not in t for t in targets)
    assert targets[1]["hlf_status"] == STATUS_CHOICES["expired"]


async def test_upsert_multiple_refuses_a_certification_twice(client: DataverseClient) -> None:
    body = upsert()
    with pytest.raises(ValueError, match="at most once"):
        await client.upsert_many([body, body])


@pytest.mark.parametrize("status", [204, 404])
@respx.mock
async def test_a_delete_by_key_is_done_on_204_or_404(client: DataverseClient, status: int) -> None:
    route = respx.delete(BY_KEY).mock(return_value=httpx.Response(status))

    receipt = await client.delete_certification(CertificationDelete(uuid4(), CERT_ID, datetime.now(UTC)))

    assert receipt.status == status
    assert route.calls.last.request.content == b""


@respx.mock
async def test_a_refusal_keeps_dataverses_code_and_message_in_the_reason(client: DataverseClient) -> None:
    respx.patch(BY_KEY).mock(return_value=odata_error(400, "0x80040265", "A plug-in refused\\nthe  change."))

    with pytest.raises(PermanentDynamicsError) as raised:
        await client.upsert_certification(upsert())

    assert raised.value.reason == "HTTP 400 Bad Request: 0x80040265 A plug-in refused\\nthe change."
    assert raised.value.status == 400


@pytest.mark.parametrize(
    ("code", "meaning"),
    [("0x80072322", "requests"), ("0x80072321", "execution time"), ("0x80072326", "concurrency")],
)
@respx.mock
async def test_each_service_protection_429_is_rate_limited_with_its_retry_after(
    client: DataverseClient, code: str, meaning: str
) -> None:
    respx.patch(BY_KEY).mock(
        return_value=odata_error(
            429, code, f"Number of {meaning} exceeded the limit", **{"Retry-After": "17"}
        )
    )

    with pytest.raises(RateLimitedError) as raised:
        await client.upsert_certification(upsert())

    assert raised.value.retry_after == 17
    assert code in raised.value.reason


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
@respx.mock
async def test_server_failures_are_transient(client: DataverseClient, status: int) -> None:
    respx.patch(BY_KEY).mock(return_value=odata_error(status, "0x80040216", "An unexpected error occurred."))

    with pytest.raises(TransientDynamicsError) as raised:
        await client.upsert_certification(upsert())

    assert not isinstance(raised.value, RateLimitedError)
    assert raised.value.reason.startswith(f"HTTP {status}")


@respx.mock
async def test_a_401_fetches_a_new_token_once_then_fails_as_authentication() -> None:
    class Counting(StaticTokenProvider):
        invalidated = 0

        async def invalidate(self, rejected: str) -> None:
            Counting.invalidated += 1

    route = respx.patch(BY_KEY).mock(return_value=httpx.Response(401))
    client = DataverseClient(httpx.AsyncClient(), BASE, Counting(TOKEN), clock=ManualClock())

    with pytest.raises(AuthenticationError):
        await client.upsert_certification(upsert())

    assert (route.call_count, Counting.invalidated) == (2, 1)


@respx.mock
async def test_holdings_follow_the_next_link_with_the_page_size_asked(client: DataverseClient) -> None:
    ids = sorted(str(uuid4()) for _ in range(3))

    def row(i: int) -> dict[str, Any]:
        return {
            "@odata.etag": 'W/"1"',
            "hlf_certsyncid": ids[i],
            "hlf_sourceversion": i + 1,
            "hlf_status": [100000000, 100000002, 100000003][i],
            "hlf_publiclylisted": i == 0,
        }

    next_link = f"{API}/hlf_certifications?$skiptoken=page2"

    def answer(request: httpx.Request) -> httpx.Response:
        if "$skiptoken" in request.url.params:
            return httpx.Response(200, json={"value": [row(2)]})
        return httpx.Response(200, json={"value": [row(0), row(1)], "@odata.nextLink": next_link})

    route = respx.get(url__startswith=f"{API}/hlf_certifications").mock(side_effect=answer)

    held = [h async for h in client.holdings(page_size=2)]

    assert [(str(h.certification_id), h.version, h.status, h.publicly_listed) for h in held] == [
        (ids[0], 1, "active", True),
        (ids[1], 2, "expired", False),
        (ids[2], 3, "revoked", False),
    ]
    first, second = (call.request for call in route.calls)
    request = first
    assert request.headers["prefer"] == "odata.maxpagesize=2"
    assert request.url.params["$select"] == "hlf_certsyncid,hlf_sourceversion,hlf_status,hlf_publiclylisted"
    assert request.url.params["$orderby"] == "hlf_certsyncid asc"
    assert str(second.url) == next_link
    assert second.headers["prefer"] == "odata.maxpagesize=2"


@respx.mock
async def test_a_row_with_a_status_certsync_does_not_write_is_a_malformed_answer(
    client: DataverseClient,
) -> None:
    respx.get(f"{API}/hlf_certifications").mock(
        return_value=httpx.Response(
            200,
            json={
                "value": [
                    {
                        "hlf_certsyncid": str(CERT_ID),
                        "hlf_sourceversion": 1,
                        "hlf_status": 5,
                        "hlf_publiclylisted": False,
                    }
                ]
            },
        )
    )

    with pytest.raises(PermanentDynamicsError, match="hlf_status 5"):
        [h async for h in client.holdings()]


PRIMARY_ID = {"LogicalName": "hlf_certificationid", "AttributeType": "Uniqueidentifier"}


def definition(**changes: Any) -> dict[str, Any]:
    attributes = [{"LogicalName": name, "AttributeType": kind} for name, kind in COLUMNS.items()]
    body: dict[str, Any] = {
        "LogicalName": "hlf_certification",
        "EntitySetName": "hlf_certifications",
        "Attributes": [*attributes, PRIMARY_ID],
        "Keys": [{"KeyAttributes": ["hlf_certsyncid"], "EntityKeyIndexStatus": "Active"}],
    }
    return body | changes


ENTITY_DEFINITION = f"{API}/EntityDefinitions(LogicalName='hlf_certification')"


@respx.mock
async def test_the_table_check_accepts_the_pinned_table(client: DataverseClient) -> None:
    route = respx.get(url__startswith=ENTITY_DEFINITION).mock(
        return_value=httpx.Response(200, json=definition())
    )

    check = await client.check_contract()

    assert (check.accepted, check.problems) == (True, ())
    params = route.calls.last.request.url.params
    assert params["$select"] == "LogicalName,EntitySetName"
    assert params["$expand"] == (
        "Attributes($select=LogicalName,AttributeType),Keys($select=KeyAttributes,EntityKeyIndexStatus)"
    )


@respx.mock
async def test_the_table_check_names_every_missing_or_mistyped_column_and_the_key(
    client: DataverseClient,
) -> None:
    attributes = [
        {"LogicalName": name, "AttributeType": "Memo" if name == "hlf_certificationtype" else kind}
        for name, kind in COLUMNS.items()
        if name != "hlf_changedat"
    ]
    keys = [{"KeyAttributes": ["hlf_certsyncid"], "EntityKeyIndexStatus": "Pending"}]
    respx.get(url__startswith=ENTITY_DEFINITION).mock(
        return_value=httpx.Response(200, json=definition(Attributes=attributes, Keys=keys))
    )

    check = await client.check_contract()

    assert check.accepted is False
    assert check.problems == (
        "column hlf_certificationtype is Memo, certsync writes String",
        "missing column hlf_changedat (DateTime)",
        "the alternate key on hlf_certsyncid is Pending, not Active",
    )


@respx.mock
async def test_the_table_check_says_when_the_table_or_its_key_does_not_exist(client: DataverseClient) -> None:
    respx.get(url__startswith=ENTITY_DEFINITION).mock(
        return_value=odata_error(404, "0x80040217", "Could not find an entity with name hlf_certification")
    )
    missing = await client.check_contract()
    respx.get(url__startswith=ENTITY_DEFINITION).mock(
        return_value=httpx.Response(200, json=definition(Keys=[]))
    )
    keyless = await client.check_contract()

    assert missing.accepted is False
    assert "does not exist" in missing.problems[0]
    assert keyless.problems == ("no alternate key on hlf_certsyncid",)


async def test_never_more_than_max_concurrent_requests_in_flight() -> None:
    in_flight = peak = 0
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1
        return httpx.Response(204)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = DataverseClient(http, BASE, StaticTokenProvider(TOKEN), clock=ManualClock(), max_concurrent=3)
    sends = [asyncio.create_task(client.upsert_certification(upsert(uuid4()))) for _ in range(10)]
    for _ in range(20):
        await asyncio.sleep(0)
    assert peak == 3
    release.set()
    await asyncio.gather(*sends)
    assert peak == 3


def test_more_than_dataverses_52_concurrent_requests_is_refused() -> None:
    with pytest.raises(ValueError, match="1 to 52"):
        DataverseClient(httpx.AsyncClient(), BASE, StaticTokenProvider(TOKEN), max_concurrent=53)


@respx.mock
async def test_the_probe_is_one_who_am_i(client: DataverseClient) -> None:
    route = respx.get(f"{API}/WhoAmI").mock(
        return_value=httpx.Response(200, json={"UserId": str(uuid4()), "BusinessUnitId": str(uuid4())})
    )

    await client.probe()

    assert route.call_count == 1
    respx.get(f"{API}/WhoAmI").mock(return_value=httpx.Response(503))
    with pytest.raises(TransientDynamicsError):
        await client.probe()
