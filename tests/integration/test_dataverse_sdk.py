"""Microsoft's own Dataverse SDK (powerplatform-dataverse-client), unchanged, against the emulator.

The SDK speaks only HTTPS, so the emulator is served with a certificate from a throwaway local CA
(trustme) that ``requests`` is told to trust through ``REQUESTS_CA_BUNDLE``. The SDK is synchronous
(requests); it runs in the test's thread while the emulator serves in the ``SandboxServer``'s. What
the SDK sends is read back from the emulator's request log, so every test shows the wire as well as
the result: the emulator answers what a real Dataverse client sends, the way it expects.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest

sdk = pytest.importorskip(
    "PowerPlatform.Dataverse.client",
    reason="Microsoft's Dataverse SDK (powerplatform-dataverse-client) is not installed",
)
trustme = pytest.importorskip("trustme", reason="trustme (a local CA for the SDK's HTTPS) is not installed")

from azure.core.credentials import AccessToken  # noqa: E402  (after the skips: installed with the SDK)
from PowerPlatform.Dataverse.client import DataverseClient  # noqa: E402
from PowerPlatform.Dataverse.core.errors import HttpError  # noqa: E402
from PowerPlatform.Dataverse.models.upsert import UpsertItem  # noqa: E402

from certsync.sandbox import DataverseConfig, SandboxServer  # noqa: E402
from certsync.sandbox.dataverse_state import DataverseRequest  # noqa: E402

TOKEN = "sdk-token"
TABLE = "hlf_certification"
ACTIVE, EXPIRED = 100000000, 100000002


class StaticCredential:
    """An azure ``TokenCredential`` handing out the emulator's static token; it notes the scopes."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken(TOKEN, 4_102_444_800)


def columns(version: int = 1, **overrides: Any) -> dict[str, Any]:
    return {
        "hlf_peermentorid": str(uuid4()),
        "hlf_certificationtype": "peer_mentor",
        "hlf_status": ACTIVE,
        "hlf_validfrom": "2025-11-01",
        "hlf_validuntil": "2027-11-01",
        "hlf_sourceversion": version,
        "hlf_publiclylisted": True,
        "hlf_changedat": "2026-11-29T10:00:00Z",
        **overrides,
    }


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    ca.cert_pem.write_to_path(files["ca"])
    for index, pem in enumerate(certificate.cert_chain_pems):
        pem.write_to_path(files["cert"], append=index > 0)
    certificate.private_key_pem.write_to_path(files["key"])
    return files


@pytest.fixture(scope="module")
def server(tls_files: dict[str, Path]) -> Iterator[SandboxServer]:
    config = DataverseConfig(static_tokens=(TOKEN,))
    with SandboxServer(config, certfile=tls_files["cert"], keyfile=tls_files["key"]) as running:
        yield running


@pytest.fixture
def admin(server: SandboxServer, tls_files: dict[str, Path]) -> Iterator[httpx.Client]:
    trusted = ssl.create_default_context(cafile=str(tls_files["ca"]))
    with httpx.Client(base_url=server.url, verify=trusted, timeout=5) as http:
        http.post("/_sandbox/reset").raise_for_status()
        yield http


@pytest.fixture
def credential() -> StaticCredential:
    return StaticCredential()


@pytest.fixture
def client(
    server: SandboxServer,
    admin: httpx.Client,
    credential: StaticCredential,
    tls_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[DataverseClient]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_files["ca"]))
    with DataverseClient(server.url, credential) as dataverse:
        yield dataverse


def wire(server: SandboxServer) -> list[DataverseRequest]:
    """What the SDK sent, without its metadata look-ups."""
    return [entry for entry in server.dataverse.requests() if "EntityDefinitions" not in entry.path]


def held(server: SandboxServer) -> dict[str, Any]:
    return dict(server.dataverse.snapshot()["rows"])


def test_the_sdk_only_speaks_https_which_is_why_the_emulator_serves_tls(credential: StaticCredential) -> None:
    with pytest.raises(ValueError, match="HTTPS"):
        DataverseClient("http://127.0.0.1:1", credential)


def test_create_retrieve_update_and_delete_by_primary_id(
    client: DataverseClient, server: SandboxServer, credential: StaticCredential
) -> None:
    key = str(uuid4())
    record_id = client.records.create(TABLE, {"hlf_certsyncid": key, **columns(1)})
    assert held(server)[key]["hlf_certificationid"] == record_id
    client.records.update(TABLE, record_id, {"hlf_sourceversion": 2, "hlf_status": EXPIRED})
    record = client.records.retrieve(
        TABLE, record_id, select=["hlf_certsyncid", "hlf_sourceversion", "hlf_status"]
    )
    assert record is not None
    assert (record["hlf_certsyncid"], record["hlf_sourceversion"], record["hlf_status"]) == (key, 2, EXPIRED)
    client.records.delete(TABLE, record_id)
    assert held(server) == {}
    assert client.records.retrieve(TABLE, record_id) is None
    assert [(entry.method, entry.status) for entry in wire(server)] == [
        ("POST", 204),
        ("PATCH", 204),
        ("GET", 200),
        ("DELETE", 204),
        ("GET", 404),
    ]
    assert credential.scopes
    assert all(scopes == (f"{server.url}/.default",) for scopes in credential.scopes)


def test_upsert_by_alternate_key_creates_then_updates_with_a_patch(
    client: DataverseClient, server: SandboxServer
) -> None:
    key = str(uuid4())
    client.records.upsert(TABLE, [UpsertItem(alternate_key={"hlf_certsyncid": key}, record=columns(1))])
    client.records.upsert(TABLE, [UpsertItem(alternate_key={"hlf_certsyncid": key}, record=columns(2))])
    assert held(server)[key]["hlf_sourceversion"] == 2
    assert [(entry.method, entry.path, entry.outcome) for entry in wire(server)] == [
        ("PATCH", f"/api/data/v9.2/hlf_certifications(hlf_certsyncid='{key}')", "created"),
        ("PATCH", f"/api/data/v9.2/hlf_certifications(hlf_certsyncid='{key}')", "updated"),
    ]


def test_a_bulk_upsert_is_one_upsert_multiple_and_a_choice_label_becomes_its_value(
    client: DataverseClient, server: SandboxServer
) -> None:
    keys = sorted(str(uuid4()) for _ in range(120))
    items: list[UpsertItem | dict[str, Any]] = [
        UpsertItem(alternate_key={"hlf_certsyncid": key}, record=columns(3, hlf_status="Expired"))
        for key in keys
    ]
    client.records.upsert(TABLE, items)
    rows = held(server)
    assert sorted(rows) == keys
    assert {(row["hlf_sourceversion"], row["hlf_status"]) for row in rows.values()} == {(3, EXPIRED)}
    (bulk,) = wire(server)
    assert (bulk.method, bulk.path, bulk.status, bulk.targets) == (
        "POST",
        "/api/data/v9.2/hlf_certifications/Microsoft.Dynamics.CRM.UpsertMultiple",
        200,
        120,
    )


def test_a_refused_row_fails_the_sdks_bulk_upsert_whole_with_the_plug_in_code(
    client: DataverseClient, server: SandboxServer, admin: httpx.Client
) -> None:
    keys = [str(uuid4()) for _ in range(3)]
    admin.post("/_sandbox/refuse", json={"hlf_certsyncids": [keys[1]]}).raise_for_status()
    with pytest.raises(HttpError) as refused:
        client.records.upsert(TABLE, [UpsertItem({"hlf_certsyncid": key}, columns(1)) for key in keys])
    assert refused.value.status_code == 400
    assert refused.value.details["service_error_code"] == "0x80040265"
    assert keys[1] in str(refused.value)
    assert held(server) == {}


def test_bulk_create_and_update_use_create_multiple_and_update_multiple(
    client: DataverseClient, server: SandboxServer
) -> None:
    keys = [str(uuid4()) for _ in range(4)]
    ids = client.records.create(TABLE, [{"hlf_certsyncid": key, **columns(1)} for key in keys])
    assert sorted(ids) == sorted(row["hlf_certificationid"] for row in held(server).values())
    client.records.update(TABLE, ids, {"hlf_sourceversion": 5})
    assert {row["hlf_sourceversion"] for row in held(server).values()} == {5}
    assert [(entry.path.rsplit(".", 1)[-1], entry.targets) for entry in wire(server)] == [
        ("CreateMultiple", 4),
        ("UpdateMultiple", 4),
    ]


def test_a_paged_query_follows_next_links_and_a_filter_finds_one_by_key(
    client: DataverseClient, server: SandboxServer
) -> None:
    keys = sorted(str(uuid4()) for _ in range(25))
    client.records.upsert(TABLE, [UpsertItem({"hlf_certsyncid": key}, columns(7)) for key in keys])
    select = ["hlf_certsyncid", "hlf_sourceversion", "hlf_status", "hlf_publiclylisted"]
    pages = list(client.records.list_pages(TABLE, select=select, page_size=10))
    assert [len(list(page)) for page in pages] == [10, 10, 5]
    listed = [record for page in pages for record in page]
    assert [record["hlf_certsyncid"] for record in listed] == keys
    assert all(record["hlf_sourceversion"] == 7 and record.etag for record in listed)
    found = client.records.list(TABLE, filter=f"hlf_certsyncid eq '{keys[3]}'", select=["hlf_certsyncid"])
    assert [record["hlf_certsyncid"] for record in found] == [keys[3]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = [
            record
            for page in client.records.get(TABLE, select=["hlf_certsyncid"], page_size=20)
            for record in page
        ]
    assert len(legacy) == 25


def test_the_sdk_reads_dataverse_errors_as_the_emulator_sends_them(
    client: DataverseClient, server: SandboxServer, admin: httpx.Client
) -> None:
    with pytest.raises(HttpError) as unknown:
        client.records.create(TABLE, {"hlf_certsyncid": str(uuid4()), "hlf_nosuch": 1})
    assert (unknown.value.status_code, unknown.value.details["service_error_code"]) == (400, "0x80060888")
    assert "hlf_nosuch" in str(unknown.value)
    admin.post("/_sandbox/limits", json={"requests": 1, "window_seconds": 300}).raise_for_status()
    client.records.upsert(TABLE, [UpsertItem({"hlf_certsyncid": str(uuid4())}, columns(1))])
    with pytest.raises(HttpError) as limited:
        client.records.upsert(TABLE, [UpsertItem({"hlf_certsyncid": str(uuid4())}, columns(1))])
    error = limited.value
    assert (error.status_code, error.is_transient, error.details["service_error_code"]) == (
        429,
        True,
        "0x80072322",
    )
    assert 1 <= error.details["retry_after"] <= 300


def test_the_sdk_reaches_who_am_i_through_its_own_session(
    client: DataverseClient, server: SandboxServer
) -> None:
    # No SDK helper for WhoAmI: the client's own (authenticated, TLS-verified) OData transport is used.
    odata = client._get_odata()
    answer = odata._request("get", f"{odata.api}/WhoAmI").json()
    assert answer["OrganizationId"] == str(server.dataverse.config.organization_id)


def test_certsync_sandbox_api_dataverse_serves_the_sdk_over_tls_from_its_own_process(
    tls_files: dict[str, Path], credential: StaticCredential, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "certsync",
        "sandbox",
        "--api",
        "dataverse",
        "--port",
        "0",
        "--token",
        TOKEN,
    ]
    command += ["--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CERTSYNC_LOG_LEVEL": "error", "COLUMNS": "200"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path
    )
    try:
        assert process.stdout is not None
        printed: list[str] = []
        for line in process.stdout:
            printed.append(line)
            if "CERTSYNC_DYNAMICS_CLIENT_SECRET" in line:
                break
        found = re.search(r"CERTSYNC_DYNAMICS_BASE_URL=(https://\S+)", "".join(printed))
        assert found is not None, "".join(printed)
        assert "CERTSYNC_DYNAMICS_API=dataverse" in "".join(printed)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_files["ca"]))
        key = str(uuid4())
        with DataverseClient(found.group(1), credential) as dataverse:
            dataverse.records.upsert(TABLE, [UpsertItem({"hlf_certsyncid": key}, columns(1))])
            (record,) = dataverse.records.list(
                TABLE, filter=f"hlf_certsyncid eq '{key}'", select=["hlf_sourceversion"]
            )
        assert record["hlf_sourceversion"] == 1
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_sdks_batch_runs_each_part_and_a_failed_changeset_applies_nothing(
    client: DataverseClient, server: SandboxServer
) -> None:
    batch = client.batch.new()
    batch.records.create(TABLE, {"hlf_certsyncid": "single", **columns(1)})
    with batch.changeset() as changeset:
        created = changeset.records.create(TABLE, {"hlf_certsyncid": "in-changeset", **columns(1)})
        changeset.records.update(TABLE, created, {"hlf_sourceversion": 2})
    batch.records.list(TABLE, select=["hlf_certsyncid"])
    result = batch.execute()
    assert [response.status_code for response in result.responses] == [204, 204, 204, 200]
    assert result.responses[1].entity_id == result.responses[2].entity_id
    assert held(server)["in-changeset"]["hlf_sourceversion"] == 2
    listed = result.responses[3].data
    assert listed is not None
    assert [row["hlf_certsyncid"] for row in listed["value"]] == ["in-changeset", "single"]

    failing = client.batch.new()
    with failing.changeset() as changeset:
        changeset.records.create(TABLE, {"hlf_certsyncid": "rolled-back", **columns(1)})
        changeset.records.create(TABLE, {"hlf_certsyncid": "single", **columns(1)})
    failing.records.create(TABLE, {"hlf_certsyncid": "after-the-failure", **columns(1)})
    outcome = failing.execute(continue_on_error=True)
    assert [(response.status_code, response.error_code) for response in outcome.responses] == [
        (412, "0x80060892"),
        (204, None),
    ]
    assert sorted(held(server)) == ["after-the-failure", "in-changeset", "single"]
    batches = [entry for entry in server.dataverse.requests() if entry.path.endswith("/$batch")]
    assert [(entry.status, entry.targets) for entry in batches] == [(200, 4), (200, 3)]
