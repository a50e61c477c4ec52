"""`certsync demo` runs against its own local portal, whatever the environment says about a real one."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from certsync.demo import DemoApi, demo_settings
from certsync.sandbox.state import DEFAULT_TOKEN
from certsync.settings import Settings

REAL_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.real-portal-token"  # a stand-in, not a real token


@pytest.mark.parametrize("api", ["contract-v1", "dataverse"])
def test_a_real_portals_token_in_the_environment_is_never_sent_to_the_demos_local_portal(
    monkeypatch: pytest.MonkeyPatch, api: DemoApi
) -> None:
    monkeypatch.setenv("CERTSYNC_DYNAMICS_TOKEN", REAL_TOKEN)
    monkeypatch.setenv("CERTSYNC_DYNAMICS_BASE_URL", "https://hlf.crm4.dynamics.com")
    settings = Settings(_env_file=None)
    assert settings.dynamics_token == SecretStr(REAL_TOKEN)

    demo = demo_settings(settings, "postgresql://127.0.0.1/certsync_demo", "http://127.0.0.1:8765", api)

    assert demo.dynamics_base_url == "http://127.0.0.1:8765"
    assert demo.dynamics_token is not None
    assert demo.dynamics_token.get_secret_value() == DEFAULT_TOKEN
    assert demo.dynamics_token_url is None
    assert demo.dynamics_tenant_id is None
