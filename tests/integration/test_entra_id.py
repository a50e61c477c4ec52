"""Entra ID tokens through msal, Microsoft's identity library, driven over loopback HTTPS against a
local authority (tests/support/entra.py): a client secret, a certificate, the cache, a refresh after a
401, a refusal, and the settings that choose it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from certsync.app import entra_token_provider_from, token_provider_from
from certsync.dynamics.entra import EntraIdTokenProvider
from certsync.dynamics.errors import AuthenticationError, TransientDynamicsError
from certsync.errors import ConfigurationError
from certsync.settings import Settings
from tests.support.entra import CLIENT_ID, CLIENT_SECRET, TENANT, Authority

pytestmark = pytest.mark.integration

BASE = "https://hlf.crm4.dynamics.com"
SCOPE = f"{BASE}/.default"


def provider(authority: Authority, **credential: object) -> EntraIdTokenProvider:
    return EntraIdTokenProvider(
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        scope=SCOPE,
        authority_host=authority.host,
        http_client=authority.session(),
        **credential,  # type: ignore[arg-type]
    )


async def test_a_client_secret_gets_a_token_for_the_scope_and_it_is_cached(authority: Authority) -> None:
    tokens = provider(authority, client_secret=CLIENT_SECRET)

    first, second = await tokens.token(), await tokens.token()

    assert first == second
    assert first.startswith("entra-")
    assert authority.issued == [{"scope": SCOPE, "credential": "secret"}]


async def test_a_certificate_signs_the_assertion_msal_sends(authority: Authority, tmp_path: Path) -> None:
    # msal signs its client assertion with RS256: the certificate's key must be RSA.
    client_cert = authority.ca.issue_cert("certsync-client", key_type=trustme.KeyType.RSA)
    pem = tmp_path / "client.pem"
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    authority.certificates.append(client_cert.cert_chain_pems[0].bytes().decode())

    token = await provider(authority, certificate_path=pem).token()

    assert token.startswith("entra-")
    assert authority.issued == [{"scope": SCOPE, "credential": "certificate"}]


async def test_a_rejected_token_is_forgotten_so_the_next_one_is_fresh(authority: Authority) -> None:
    tokens = provider(authority, client_secret=CLIENT_SECRET)
    stale = await tokens.token()

    await tokens.invalidate(stale)
    fresh = await tokens.token()

    assert fresh != stale
    assert len(authority.issued) == 2


async def test_a_wrong_secret_is_an_authentication_error_naming_no_secret(authority: Authority) -> None:
    tokens = provider(authority, client_secret="not-the-secret")

    with pytest.raises(AuthenticationError) as raised:
        await tokens.token()

    assert "invalid_client" in raised.value.reason
    assert "not-the-secret" not in repr(raised.value) + raised.value.reason


async def test_an_unreachable_authority_is_transient(tmp_path: Path) -> None:
    tokens = EntraIdTokenProvider(
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        scope=SCOPE,
        client_secret=CLIENT_SECRET,
        authority_host="https://127.0.0.1:9",
    )

    with pytest.raises(TransientDynamicsError, match="transport"):
        await tokens.token()


async def test_settings_with_a_tenant_choose_msal_with_the_default_dataverse_scope(
    authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", authority.ca_file)
    settings = Settings(
        _env_file=None,
        dynamics_api="dataverse",
        dynamics_base_url=BASE,
        dynamics_tenant_id=TENANT,
        dynamics_client_id=CLIENT_ID,
        dynamics_client_secret=CLIENT_SECRET,
        dynamics_authority_host=authority.host,
    )

    token = await entra_token_provider_from(settings).token()

    assert token.startswith("entra-")
    assert authority.issued == [{"scope": SCOPE, "credential": "secret"}]


def test_a_tenant_needs_exactly_one_credential(tmp_path: Path) -> None:
    both = Settings(
        _env_file=None,
        dynamics_base_url=BASE,
        dynamics_api="dataverse",
        dynamics_tenant_id=TENANT,
        dynamics_client_id=CLIENT_ID,
        dynamics_client_secret=CLIENT_SECRET,
        dynamics_client_certificate=tmp_path / "client.pem",
    )
    neither = both.model_copy(update={"dynamics_client_secret": None, "dynamics_client_certificate": None})
    bad_file = both.model_copy(update={"dynamics_client_secret": None})

    for settings in (both, neither):
        with pytest.raises(ConfigurationError, match="exactly one"):
            entra_token_provider_from(settings)
    with pytest.raises(ConfigurationError, match="CERTSYNC_DYNAMICS_CLIENT_CERTIFICATE: cannot read"):
        entra_token_provider_from(bad_file)


def test_the_plain_oauth2_flow_defaults_its_scope_in_dataverse_mode() -> None:
    import httpx  # noqa: PLC0415  (only this test builds a client)

    from certsync.resilience.testing import ManualClock  # noqa: PLC0415

    settings = Settings(
        _env_file=None,
        dynamics_api="dataverse",
        dynamics_base_url=BASE + "/",
        dynamics_token_url="http://127.0.0.1:1/oauth2/token",
        dynamics_client_id=CLIENT_ID,
        dynamics_client_secret=CLIENT_SECRET,
    )
    tokens = token_provider_from(settings, httpx.AsyncClient(), ManualClock())

    assert tokens._form["scope"] == SCOPE  # type: ignore[attr-defined]
