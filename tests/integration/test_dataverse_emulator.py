"""The Dataverse Web API emulator over real HTTP on loopback: rows, bulk actions, paging, metadata,
auth, refusals, faults and the three service-protection limits (on an injected clock)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest

from certsync.resilience.testing import ManualClock
from certsync.sandbox import DataverseConfig, FaultScript, FaultStep, Latency, SandboxServer, ServiceLimits

TOKEN = "dataverse-token"
API = "/api/data/v9.2"
SET = f"{API}/hlf_certifications"
BURST = "x-ms-ratelimit-burst-remaining-xrm-requests"
TIME_LEFT = "x-ms-ratelimit-time-remaining-xrm-requests"
ACTIVE, EXPIRED = 100000000, 100000002
PINNED_TYPES = {
    "hlf_certsyncid": "String",
    "hlf_peermentorid": "String",
    "hlf_certificationtype": "String",
    "hlf_status": "Picklist",
    "hlf_validfrom": "DateTime",
    "hlf_validuntil": "DateTime",
    "hlf_sourceversion": "Integer",
    "hlf_publiclylisted": "Boolean",
    "hlf_changedat": "DateTime",
}
DEFAULT_CONFIG = DataverseConfig(static_tokens=(TOKEN,))


def columns(version: int = 1, *, status: int = ACTIVE) -> dict[str, Any]:
    """Every column of interface section 5 but the key."""
    return {
        "hlf_peermentorid": str(uuid4()),
        "hlf_certificationtype": "peer_mentor",
        "hlf_status": status,
        "hlf_validfrom": "2025-11-01",
        "hlf_validuntil": "2027-11-01",
        "hlf_sourceversion": version,
        "hlf_publiclylisted": status == ACTIVE,
        "hlf_changedat": "2026-11-29T10:00:00Z",
    }


def by_key(key: str | UUID) -> str:
    return f"{SET}(hlf_certsyncid='{key}')"


def target(key: str | UUID, version: int = 1, **overrides: Any) -> dict[str, Any]:
    return {
        "@odata.type": "Microsoft.Dynamics.CRM.hlf_certification",
        "@odata.id": f"hlf_certifications(hlf_certsyncid='{key}')",
        **columns(version),
        **overrides,
    }


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def rows(client: httpx.Client) -> dict[str, Any]:
    return dict(client.get("/_sandbox/state").json()["rows"])


def recorded(client: httpx.Client) -> list[dict[str, Any]]:
    return list(client.get("/_sandbox/requests").json()["requests"])


@pytest.fixture(scope="module")
def shared_server() -> Iterator[SandboxServer]:
    with SandboxServer(DEFAULT_CONFIG) as running:
        yield running


@pytest.fixture
def client(shared_server: SandboxServer) -> Iterator[httpx.Client]:
    httpx.post(f"{shared_server.url}/_sandbox/reset").raise_for_status()
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json", "OData-Version": "4.0"}
    with httpx.Client(base_url=shared_server.url, headers=headers, timeout=5) as http:
        yield http


def serve(config: DataverseConfig) -> SandboxServer:
    return SandboxServer(config)


# auth ---------------------------------------------------------------------------------------------------


def test_a_request_without_a_valid_bearer_token_is_401_with_a_challenge(client: httpx.Client) -> None:
    for headers in (
        {"Authorization": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic eA=="},
    ):
        response = client.get(f"{API}/WhoAmI", headers=headers)
        assert response.status_code == 401
        assert response.content == b""
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith("Bearer authorization_uri=")
        assert "/oauth2/token" in challenge
    assert [entry["outcome"] for entry in recorded(client)] == ["invalid_token"] * 3


def test_a_token_from_the_token_endpoint_is_accepted_until_the_admin_expires_it(client: httpx.Client) -> None:
    refused = client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": "certsync", "client_secret": "no"},
    )
    assert refused.status_code == 401
    issued = client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": "certsync", "client_secret": "sandbox-secret"},
    )
    assert issued.status_code == 200
    token = issued.json()["access_token"]
    assert client.get(f"{API}/WhoAmI", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.post("/_sandbox/expire-tokens").json() == {"expired": 1}
    assert client.get(f"{API}/WhoAmI", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_who_am_i_names_the_user_business_unit_and_organisation(client: httpx.Client) -> None:
    response = client.get(f"{API}/WhoAmI")
    assert response.status_code == 200
    body = response.json()
    assert {str(UUID(body[name])) for name in ("BusinessUnitId", "UserId", "OrganizationId")} == {
        str(DEFAULT_CONFIG.business_unit_id),
        str(DEFAULT_CONFIG.user_id),
        str(DEFAULT_CONFIG.organization_id),
    }
    assert response.headers["odata-version"] == "4.0"


# one row by alternate key -------------------------------------------------------------------------------


def test_a_patch_by_alternate_key_creates_then_updates_with_204(client: httpx.Client) -> None:
    key = uuid4()
    created = client.patch(by_key(key), json=columns(1))
    assert created.status_code == 204
    primary = rows(client)[str(key)]["hlf_certificationid"]
    assert created.headers["odata-entityid"].endswith(f"/hlf_certifications({primary})")
    updated = client.patch(by_key(key), json=columns(2, status=EXPIRED))
    assert updated.status_code == 204
    row = rows(client)[str(key)]
    assert row["hlf_certificationid"] == primary
    assert (row["hlf_sourceversion"], row["hlf_status"], row["hlf_publiclylisted"]) == (2, EXPIRED, False)
    assert [entry["outcome"] for entry in recorded(client)] == ["created", "updated"]


def test_return_representation_answers_201_then_200_with_the_row(client: httpx.Client) -> None:
    key = uuid4()
    prefer = {"Prefer": "return=representation"}
    created = client.patch(by_key(key), json=columns(1), headers=prefer)
    assert created.status_code == 201
    assert created.json()["hlf_certsyncid"] == str(key)
    assert created.json()["@odata.etag"] == created.headers["etag"]
    updated = client.patch(by_key(key), json=columns(2), headers=prefer)
    assert updated.status_code == 200
    assert updated.json()["hlf_sourceversion"] == 2
    assert updated.json()["@odata.etag"] != created.json()["@odata.etag"]


def test_if_match_star_only_updates_and_if_none_match_star_only_creates(client: httpx.Client) -> None:
    key = uuid4()
    missing = client.patch(by_key(key), json=columns(1), headers={"If-Match": "*"})
    assert (missing.status_code, error_code(missing)) == (404, "0x80040217")
    assert rows(client) == {}
    assert client.patch(by_key(key), json=columns(1), headers={"If-None-Match": "*"}).status_code == 204
    again = client.patch(by_key(key), json=columns(2), headers={"If-None-Match": "*"})
    assert (again.status_code, error_code(again)) == (412, "0x80040237")
    assert client.patch(by_key(key), json=columns(3), headers={"If-Match": "*"}).status_code == 204
    assert rows(client)[str(key)]["hlf_sourceversion"] == 3


def test_if_match_with_a_stale_etag_is_412_and_a_fresh_one_applies(client: httpx.Client) -> None:
    key = uuid4()
    first = client.patch(by_key(key), json=columns(1), headers={"Prefer": "return=representation"})
    stale = first.headers["etag"]
    client.patch(by_key(key), json=columns(2)).raise_for_status()
    refused = client.patch(by_key(key), json=columns(3), headers={"If-Match": stale})
    assert (refused.status_code, error_code(refused)) == (412, "0x80060882")
    fresh = client.get(by_key(key)).headers["etag"]
    assert client.patch(by_key(key), json=columns(3), headers={"If-Match": fresh}).status_code == 204
    not_modified = client.get(by_key(key), headers={"If-None-Match": client.get(by_key(key)).headers["etag"]})
    assert not_modified.status_code == 304


@pytest.mark.parametrize(
    ("change", "code", "named"),
    [
        ({"hlf_nosuchcolumn": 1}, "0x80060888", "hlf_nosuchcolumn"),
        ({"hlf_sourceversion": "7"}, "0x80060888", "Edm.Int32"),
        ({"hlf_sourceversion": 2**31}, "0x80060888", "Edm.Int32"),
        ({"hlf_publiclylisted": "yes"}, "0x80060888", "Edm.Boolean"),
        ({"hlf_status": 7}, "0x80044331", "outside the valid range"),
        ({"hlf_status": "Active"}, "0x80060888", "Edm.Int32"),
        ({"hlf_validfrom": "01.11.2025"}, "0x80060888", "Edm.Date"),
        ({"hlf_validuntil": "2027-02-30"}, "0x80060888", "Edm.Date"),
        ({"hlf_changedat": "2026-11-29T10:00:00"}, "0x80060888", "Edm.DateTimeOffset"),
        ({"hlf_peermentorid": "x" * 37}, "0x80044331", "maximum allowed length"),
        ({"hlf_certsyncid": "another-key"}, "0x80060888", "differs"),
    ],
)
def test_a_column_unknown_or_of_the_wrong_type_is_400_and_nothing_is_stored(
    client: httpx.Client, change: dict[str, Any], code: str, named: str
) -> None:
    response = client.patch(by_key(uuid4()), json={**columns(1), **change})
    assert response.status_code == 400
    assert error_code(response) == code
    assert named in response.json()["error"]["message"]
    assert rows(client) == {}


def test_every_pinned_column_is_stored_as_sent_and_the_time_to_the_second(client: httpx.Client) -> None:
    key = uuid4()
    body = {**columns(4), "hlf_changedat": "2026-11-29T11:00:00.123+01:00"}
    client.patch(by_key(key), json=body).raise_for_status()
    row = rows(client)[str(key)]
    expected = {**body, "hlf_changedat": "2026-11-29T10:00:00Z", "hlf_certsyncid": str(key)}
    assert {name: row[name] for name in PINNED_TYPES} == expected


# create, retrieve, delete -------------------------------------------------------------------------------


def test_post_creates_and_the_row_is_retrievable_by_id_and_by_key(client: httpx.Client) -> None:
    key = str(uuid4())
    created = client.post(SET, json={"hlf_certsyncid": key, **columns(1)})
    assert created.status_code == 204
    primary = created.headers["odata-entityid"].rsplit("(", 1)[1].rstrip(")")
    by_id = client.get(f"{SET}({primary})", params={"$select": "hlf_certsyncid,hlf_sourceversion"})
    assert by_id.status_code == 200
    body = by_id.json()
    assert body["@odata.context"].endswith(
        "$metadata#hlf_certifications(hlf_certsyncid,hlf_sourceversion)/$entity"
    )
    assert set(body) == {
        "@odata.context",
        "@odata.etag",
        "hlf_certificationid",
        "hlf_certsyncid",
        "hlf_sourceversion",
    }
    assert client.get(by_key(key)).json()["hlf_certificationid"] == primary
    duplicate = client.post(SET, json={"hlf_certsyncid": key, **columns(1)})
    assert (duplicate.status_code, error_code(duplicate)) == (412, "0x80060892")


def test_a_delete_by_key_or_by_id_is_204_and_a_second_one_404(client: httpx.Client) -> None:
    first, second = uuid4(), uuid4()
    client.patch(by_key(first), json=columns(1)).raise_for_status()
    client.patch(by_key(second), json=columns(1)).raise_for_status()
    primary = rows(client)[str(second)]["hlf_certificationid"]
    assert client.delete(by_key(first)).status_code == 204
    assert client.delete(f"{SET}({primary})", headers={"If-Match": "*"}).status_code == 204
    for path in (by_key(first), f"{SET}({primary})"):
        gone = client.delete(path)
        assert (gone.status_code, error_code(gone)) == (404, "0x80040217")
        assert client.get(path).status_code == 404
    assert rows(client) == {}
    assert client.get("/_sandbox/state").json()["deleted"] == [str(first), str(second)]


def test_an_unknown_entity_set_or_action_is_404_resource_not_found(client: httpx.Client) -> None:
    for path in (
        f"{API}/hlf_certification(hlf_certsyncid='x')",
        f"{SET}/Microsoft.Dynamics.CRM.DeleteMultiple",
    ):
        response = client.post(path, json={})
        assert (response.status_code, error_code(response)) == (404, "0x8006088a")


# bulk ---------------------------------------------------------------------------------------------------


def upsert_multiple(client: httpx.Client, targets: list[dict[str, Any]]) -> httpx.Response:
    return client.post(f"{SET}/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets})


def test_upsert_multiple_applies_every_target_as_one_request(client: httpx.Client) -> None:
    keys = [uuid4() for _ in range(5)]
    client.patch(by_key(keys[0]), json=columns(1)).raise_for_status()
    response = upsert_multiple(client, [target(key, version=2) for key in keys])
    assert response.status_code == 200
    ids = response.json()["Ids"]
    held = rows(client)
    assert ids == [held[str(key)]["hlf_certificationid"] for key in keys]
    assert {held[str(key)]["hlf_sourceversion"] for key in keys} == {2}
    last = recorded(client)[-1]
    assert (last["path"], last["status"], last["targets"], last["outcome"]) == (
        f"{SET}/Microsoft.Dynamics.CRM.UpsertMultiple",
        200,
        5,
        "upserted",
    )


def test_upsert_multiple_is_all_or_nothing_when_one_target_is_invalid(client: httpx.Client) -> None:
    held, fresh = uuid4(), uuid4()
    client.patch(by_key(held), json=columns(1)).raise_for_status()
    before = rows(client)
    response = upsert_multiple(client, [target(held, 2), target(fresh, 2), target(uuid4(), 2, hlf_status=5)])
    assert (response.status_code, error_code(response)) == (400, "0x80044331")
    assert rows(client) == before


def test_a_refused_row_fails_its_patch_and_the_whole_bulk_call(client: httpx.Client) -> None:
    refused, fine = uuid4(), uuid4()
    assert client.post("/_sandbox/refuse", json={"hlf_certsyncids": [str(refused)]}).json() == {
        "refused": [str(refused)]
    }
    alone = client.patch(by_key(refused), json=columns(1))
    assert (alone.status_code, error_code(alone)) == (400, "0x80040265")
    bulk = upsert_multiple(client, [target(fine), target(refused)])
    assert (bulk.status_code, error_code(bulk)) == (400, "0x80040265")
    assert rows(client) == {}
    assert upsert_multiple(client, [target(fine)]).status_code == 200
    client.post("/_sandbox/refuse", json={"hlf_certsyncids": []}).raise_for_status()
    assert client.patch(by_key(refused), json=columns(1)).status_code == 204
    assert set(rows(client)) == {str(fine), str(refused)}


def test_a_bulk_call_needs_typed_targets_and_at_most_max_targets(client: httpx.Client) -> None:
    untyped = {key: value for key, value in target(uuid4()).items() if key != "@odata.type"}
    assert error_code(upsert_multiple(client, [untyped])) == "0x80060888"
    assert error_code(upsert_multiple(client, [])) == "0x80040203"
    too_many = upsert_multiple(client, [target(f"k{i}") for i in range(DEFAULT_CONFIG.max_targets + 1)])
    assert (too_many.status_code, error_code(too_many)) == (400, "0x80040203")
    assert rows(client) == {}


def test_create_multiple_returns_ids_and_update_multiple_changes_them_all_or_none(
    client: httpx.Client,
) -> None:
    created = client.post(
        f"{SET}/Microsoft.Dynamics.CRM.CreateMultiple",
        json={
            "Targets": [
                {
                    "@odata.type": "Microsoft.Dynamics.CRM.hlf_certification",
                    "hlf_certsyncid": key,
                    **columns(1),
                }
                for key in ("c1", "c2")
            ]
        },
    )
    assert created.status_code == 200
    ids = created.json()["Ids"]
    assert len(ids) == 2

    def update(ids_: list[str]) -> httpx.Response:
        return client.post(
            f"{SET}/Microsoft.Dynamics.CRM.UpdateMultiple",
            json={
                "Targets": [
                    {
                        "@odata.type": "Microsoft.Dynamics.CRM.hlf_certification",
                        "hlf_certificationid": row_id,
                        "hlf_sourceversion": 9,
                    }
                    for row_id in ids_
                ]
            },
        )

    missing = update([*ids, str(uuid4())])
    assert (missing.status_code, error_code(missing)) == (404, "0x80040217")
    assert {row["hlf_sourceversion"] for row in rows(client).values()} == {1}
    assert update(ids).status_code == 204
    assert {row["hlf_sourceversion"] for row in rows(client).values()} == {9}


# reading ------------------------------------------------------------------------------------------------


def test_the_listing_pages_by_key_through_next_links_until_there_is_none(client: httpx.Client) -> None:
    keys = sorted(str(uuid4()) for _ in range(25))
    for start in range(0, 25, 10):
        upsert_multiple(client, [target(key, 3) for key in keys[start : start + 10]]).raise_for_status()
    url: str | None = f"{SET}?$select=hlf_certsyncid,hlf_sourceversion,hlf_status,hlf_publiclylisted"
    pages: list[list[dict[str, Any]]] = []
    while url is not None:
        response = client.get(url, headers={"Prefer": "odata.maxpagesize=10"})
        assert response.status_code == 200
        assert response.headers["preference-applied"] == "odata.maxpagesize=10"
        body = response.json()
        assert body["@odata.context"].endswith(
            "$metadata#hlf_certifications(hlf_certsyncid,hlf_sourceversion,hlf_status,hlf_publiclylisted)"
        )
        pages.append(body["value"])
        url = body.get("@odata.nextLink")
        if url is not None:
            assert "$skiptoken=" in url
    assert [len(page) for page in pages] == [10, 10, 5]
    listed = [row for page in pages for row in page]
    assert [row["hlf_certsyncid"] for row in listed] == keys
    assert all(row["@odata.etag"].startswith('W/"') and row["hlf_sourceversion"] == 3 for row in listed)
    assert set(listed[0]) == {
        "@odata.etag",
        "hlf_certificationid",
        "hlf_certsyncid",
        "hlf_sourceversion",
        "hlf_status",
        "hlf_publiclylisted",
    }


def test_the_listing_filters_by_key_counts_and_stops_at_top(client: httpx.Client) -> None:
    keys = sorted(str(uuid4()) for _ in range(6))
    upsert_multiple(client, [target(key, index + 1) for index, key in enumerate(keys)]).raise_for_status()
    one = client.get(SET, params={"$filter": f"hlf_certsyncid eq '{keys[2]}'", "$count": "true"}).json()
    assert [row["hlf_certsyncid"] for row in one["value"]] == [keys[2]]
    assert one["@odata.count"] == 1
    newer = client.get(SET, params={"$filter": "hlf_sourceversion gt 3 and hlf_status eq 100000000"}).json()
    assert [row["hlf_certsyncid"] for row in newer["value"]] == keys[3:]
    top = client.get(SET, params={"$top": "4"}, headers={"Prefer": "odata.maxpagesize=2"}).json()
    assert [row["hlf_certsyncid"] for row in top["value"]] == keys[:4]
    assert "@odata.nextLink" not in top


@pytest.mark.parametrize(
    "params",
    [
        {"$select": "hlf_nosuch"},
        {"$filter": "hlf_nosuch eq 1"},
        {"$filter": "contains(hlf_certsyncid,'a')"},
        {"$skiptoken": "not-a-token"},
        {"$top": "-1"},
        {"$apply": "groupby((hlf_status))"},
        {"$expand": "hlf_peermentor"},
    ],
)
def test_a_query_the_emulator_cannot_answer_is_400(client: httpx.Client, params: dict[str, str]) -> None:
    response = client.get(SET, params=params)
    assert (response.status_code, error_code(response)) == (400, "0x80060888")


# metadata -----------------------------------------------------------------------------------------------

DEFINITION = (
    f"{API}/EntityDefinitions(LogicalName='hlf_certification')?$select=LogicalName,EntitySetName"
    "&$expand=Attributes($select=LogicalName,AttributeType),Keys($select=KeyAttributes,EntityKeyIndexStatus)"
)


def test_the_entity_definition_answers_the_pinned_columns_and_an_active_key(client: httpx.Client) -> None:
    response = client.get(DEFINITION)
    assert response.status_code == 200
    body = response.json()
    assert (body["LogicalName"], body["EntitySetName"]) == ("hlf_certification", "hlf_certifications")
    types = {attribute["LogicalName"]: attribute["AttributeType"] for attribute in body["Attributes"]}
    assert {name: types[name] for name in PINNED_TYPES} == PINNED_TYPES
    assert all(
        set(attribute) <= {"LogicalName", "AttributeType", "@odata.type", "MetadataId"}
        for attribute in body["Attributes"]
    )
    assert [(key["KeyAttributes"], key["EntityKeyIndexStatus"]) for key in body["Keys"]] == [
        (["hlf_certsyncid"], "Active")
    ]


def test_entity_definitions_by_logical_name_give_the_set_and_primary_id(client: httpx.Client) -> None:
    params = {
        "$select": "LogicalName,EntitySetName,PrimaryIdAttribute",
        "$filter": "LogicalName eq 'hlf_certification'",
    }
    found = client.get(f"{API}/EntityDefinitions", params=params).json()["value"]
    assert [(row["EntitySetName"], row["PrimaryIdAttribute"]) for row in found] == [
        ("hlf_certifications", "hlf_certificationid")
    ]
    params["$filter"] = "LogicalName eq 'account'"
    assert client.get(f"{API}/EntityDefinitions", params=params).json()["value"] == []
    unknown = client.get(f"{API}/EntityDefinitions(LogicalName='account')")
    assert unknown.status_code == 404


def test_the_picklist_metadata_offers_the_four_statuses(client: httpx.Client) -> None:
    response = client.get(
        f"{API}/EntityDefinitions(LogicalName='hlf_certification')/Attributes/"
        "Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet($select=Options)"
    )
    (status,) = response.json()["value"]
    options = {
        option["Label"]["LocalizedLabels"][0]["Label"]: option["Value"]
        for option in status["OptionSet"]["Options"]
    }
    assert (status["LogicalName"], options) == (
        "hlf_status",
        {"Active": 100000000, "Suspended": 100000001, "Expired": 100000002, "Revoked": 100000003},
    )


def test_a_metadata_variant_is_answered_and_governs_writes(client: httpx.Client) -> None:
    variant = {
        "missing": ["hlf_changedat"],
        "types": {"hlf_sourceversion": "String"},
        "key_status": "Pending",
    }
    assert client.post("/_sandbox/metadata", json=variant).status_code == 200
    body = client.get(DEFINITION).json()
    types = {attribute["LogicalName"]: attribute["AttributeType"] for attribute in body["Attributes"]}
    assert "hlf_changedat" not in types
    assert types["hlf_sourceversion"] == "String"
    assert body["Keys"][0]["EntityKeyIndexStatus"] == "Pending"
    pending = client.patch(by_key(uuid4()), json=columns(1))
    assert (pending.status_code, error_code(pending)) == (400, "0x80060891")
    client.post("/_sandbox/metadata", json={"missing": ["hlf_changedat"]}).raise_for_status()
    unknown_column = client.patch(by_key(uuid4()), json=columns(1))
    assert (unknown_column.status_code, error_code(unknown_column)) == (400, "0x80060888")
    assert "hlf_changedat" in unknown_column.json()["error"]["message"]
    client.post("/_sandbox/metadata", json={"key": False}).raise_for_status()
    assert client.get(DEFINITION).json()["Keys"] == []
    assert client.post("/_sandbox/metadata", json={"missing": ["hlf_nosuch"]}).status_code == 422
    client.post("/_sandbox/reset").raise_for_status()
    assert client.get(DEFINITION).json()["Keys"][0]["EntityKeyIndexStatus"] == "Active"


# service protection -------------------------------------------------------------------------------------


def test_beyond_the_request_limit_429_0x80072322_with_retry_after_until_the_window_slides() -> None:
    clock = ManualClock()
    config = DataverseConfig(
        static_tokens=(TOKEN,),
        limits=ServiceLimits(requests=3, window_seconds=6, execution_seconds=None, max_concurrent=None),
        monotonic=lambda: clock.now().timestamp(),
    )
    with (
        serve(config) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5) as http,
    ):
        remaining = []
        for index in range(3):
            response = upsert_multiple(http, [target(f"k{index}-{n}") for n in range(10)])
            assert response.status_code == 200
            remaining.append(response.headers[BURST])
            clock.advance(1)
        assert remaining == ["2", "1", "0"]
        limited = http.get(f"{API}/WhoAmI")
        assert (limited.status_code, error_code(limited)) == (429, "0x80072322")
        assert limited.headers["retry-after"] == "3"
        assert limited.headers[BURST] == "0"
        assert "limit of 3 over time window of 6 seconds" in limited.json()["error"]["message"]
        clock.advance(3)
        assert http.get(f"{API}/WhoAmI").status_code == 200
        faults = [entry.fault for entry in server.dataverse.requests()]
        assert faults == [None, None, None, "rate_limit:requests", None]


def test_beyond_the_execution_time_limit_429_0x80072321() -> None:
    clock = ManualClock()
    config = DataverseConfig(
        static_tokens=(TOKEN,),
        limits=ServiceLimits(requests=None, window_seconds=10, execution_seconds=2.5, max_concurrent=None),
        faults=FaultScript(latency=Latency(min_ms=1500)),
        monotonic=lambda: clock.now().timestamp(),
        sleep=clock.sleep,  # each request "takes" 1.5 s on the emulator's clock, without waiting
    )
    with (
        serve(config) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5) as http,
    ):
        first = http.get(f"{API}/WhoAmI")
        assert first.status_code == 200
        second = http.get(f"{API}/WhoAmI")
        assert second.status_code == 200
        assert http.get("/_sandbox/limits").json()["window_execution_seconds"] == 3.0
        limited = http.get(f"{API}/WhoAmI")
        assert (limited.status_code, error_code(limited)) == (429, "0x80072321")
        assert limited.headers[TIME_LEFT] == "0.00"
        # The first request finished at t=1.5 s: it leaves the 10 s window at t=11.5 s, 8.5 s from now
        # (t=3 s), and then 1.5 s < 2.5 s of execution time remain in it.
        assert limited.headers["retry-after"] == "9"
        clock.advance(8)
        assert http.get(f"{API}/WhoAmI").status_code == 429
        clock.advance(1)
        assert http.get(f"{API}/WhoAmI").status_code == 200


def test_beyond_the_concurrency_limit_429_0x80072326() -> None:
    gate = threading.Event()

    async def held(_seconds: float) -> None:
        await asyncio.to_thread(gate.wait, 10)

    config = DataverseConfig(
        static_tokens=(TOKEN,),
        limits=ServiceLimits(max_concurrent=2),
        faults=FaultScript(latency=Latency(min_ms=1)),
        sleep=held,
    )
    with (
        serve(config) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http,
        ThreadPoolExecutor(2) as pool,
    ):
        waiting = [pool.submit(http.get, f"{API}/WhoAmI") for _ in range(2)]
        deadline = time.monotonic() + 5
        while http.get("/_sandbox/limits").json()["in_flight"] < 2:
            assert time.monotonic() < deadline, "the two requests never got in flight"
            time.sleep(0.01)
        try:
            limited = http.get(f"{API}/WhoAmI")
        finally:
            gate.set()
        assert (limited.status_code, error_code(limited)) == (429, "0x80072326")
        assert limited.headers["retry-after"] == "1"
        assert [future.result().status_code for future in waiting] == [200, 200]
        # A slot is freed as its answer starts; the client may read it a moment later.
        while server.dataverse.protection.in_flight:
            assert time.monotonic() < deadline, "the slots were never freed"
            time.sleep(0.01)
        assert http.get(f"{API}/WhoAmI").status_code == 200


def test_every_answer_says_what_the_limits_leave(client: httpx.Client) -> None:
    first = client.get(f"{API}/WhoAmI")
    second = client.patch(by_key(uuid4()), json={"hlf_nosuch": 1})
    assert int(first.headers[BURST]) == int(second.headers[BURST]) + 1 == 5999
    assert float(second.headers[TIME_LEFT]) <= 1200.0
    assert client.post("/_sandbox/limits", json={"requests": 0}).status_code == 422


# faults and the log -------------------------------------------------------------------------------------


def test_scripted_faults_scoped_to_writes_leave_reads_alone(client: httpx.Client) -> None:
    script = {"steps": [{"status": 503, "times": 2, "scope": "write"}]}
    assert client.post("/_sandbox/faults", json=script).status_code == 200
    assert client.get(f"{API}/WhoAmI").status_code == 200
    first = client.patch(by_key("a"), json=columns(1))
    assert first.status_code == 503
    assert "error" in first.json()
    assert upsert_multiple(client, [target("b")]).status_code == 503
    assert client.patch(by_key("a"), json=columns(1)).status_code == 204
    assert [entry["fault"] for entry in recorded(client)] == [None, "status:503", "status:503", None]
    assert client.post("/_sandbox/faults", json={"rate_limit": {"requests": 1}}).status_code == 422


def test_a_dropped_connection_is_a_transport_error(client: httpx.Client) -> None:
    client.post("/_sandbox/faults", json=FaultScript(steps=(FaultStep(drop=True),)).to_json_dict())
    with pytest.raises(httpx.TransportError):
        client.get(f"{API}/WhoAmI")
    assert client.get(f"{API}/WhoAmI").status_code == 200


def test_the_request_log_keeps_method_path_status_key_and_never_the_token(client: httpx.Client) -> None:
    key = str(uuid4())
    client.patch(by_key(key), json=columns(1))
    client.get(SET, params={"$select": "hlf_certsyncid"})
    entries = recorded(client)
    assert [(e["method"], e["status"], e["key"], e["has_authorization"]) for e in entries] == [
        ("PATCH", 204, key, True),
        ("GET", 200, None, True),
    ]
    assert entries[1]["query"] == "%24select=hlf_certsyncid"
    assert TOKEN not in str(entries)
    assert recorded(client) == entries  # admin reads are never logged


# $batch -------------------------------------------------------------------------------------------------


def batch_body(boundary: str, *requests: tuple[str, str, dict[str, Any] | None]) -> str:
    parts = []
    for method, url, body in requests:
        inner = [f"{method} {url} HTTP/1.1", "Content-Type: application/json; type=entry", ""]
        inner.append(json.dumps(body) if body is not None else "")
        parts.append(
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
            + "\r\n".join(inner)
            + "\r\n"
        )
    return "".join(parts) + f"--{boundary}--\r\n"


def test_a_batch_stops_at_its_first_failure_unless_told_to_continue(client: httpx.Client) -> None:
    requests = (
        ("PATCH", f"{SET}(hlf_certsyncid='first')", columns(1)),
        ("PATCH", f"{SET}(hlf_certsyncid='second')", {"hlf_nosuch": 1}),
        ("PATCH", f"{SET}(hlf_certsyncid='third')", columns(1)),
    )
    headers = {"Content-Type": 'multipart/mixed; boundary="batch_x"'}
    stopped = client.post(f"{API}/$batch", content=batch_body("batch_x", *requests), headers=headers)
    assert stopped.status_code == 200
    assert stopped.headers["content-type"].startswith("multipart/mixed; boundary=batchresponse_")
    assert [line for line in stopped.text.splitlines() if line.startswith("HTTP/1.1")] == [
        "HTTP/1.1 204 No Content",
        "HTTP/1.1 400 Bad Request",
    ]
    assert "0x80060888" in stopped.text
    assert set(rows(client)) == {"first"}
    continued = client.post(
        f"{API}/$batch",
        content=batch_body("batch_x", *requests),
        headers={**headers, "Prefer": "odata.continue-on-error"},
    )
    assert continued.text.count("HTTP/1.1 ") == 3
    assert set(rows(client)) == {"first", "third"}
    parts = [entry["path"] for entry in recorded(client)]
    assert parts.count(f"{API}/$batch") == 2
    assert len(parts) == 2 + 2 + 3  # each part is a request of its own, as Dataverse counts them
    refused = client.post(f"{API}/$batch", content="{}", headers={"Content-Type": "application/json"})
    assert (refused.status_code, error_code(refused)) == (400, "0x80060888")


def test_a_page_read_after_a_change_sees_it(client: httpx.Client) -> None:
    upsert_multiple(client, [target(key) for key in ("k1", "k2", "k3", "k4")]).raise_for_status()
    first = client.get(
        SET, params={"$select": "hlf_certsyncid"}, headers={"Prefer": "odata.maxpagesize=2"}
    ).json()
    assert [row["hlf_certsyncid"] for row in first["value"]] == ["k1", "k2"]
    client.delete(by_key("k3")).raise_for_status()
    client.patch(by_key("k5"), json=columns(1)).raise_for_status()
    typed = {"@odata.type": "Microsoft.Dynamics.CRM.hlf_certification", **columns(1)}
    twice = [{**typed, "hlf_certsyncid": "k6"}, {**typed, "hlf_certsyncid": "k6"}]
    refused = client.post(f"{SET}/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": twice})
    assert (refused.status_code, error_code(refused)) == (412, "0x80060892")  # the first k6 is undone
    rest = client.get(first["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=2"}).json()
    assert [row["hlf_certsyncid"] for row in rest["value"]] == ["k4", "k5"]
    assert "@odata.nextLink" not in rest
