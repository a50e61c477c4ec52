"""Token providers: a static token; OAuth2 client credentials cached on the injected clock, single flight."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from certsync.dynamics.auth import ClientCredentialsTokenProvider, StaticTokenProvider
from certsync.dynamics.client import DynamicsClient
from certsync.dynamics.errors import AuthenticationError, RateLimitedError, TransientDynamicsError
from certsync.resilience.testing import ManualClock

TOKEN_URL = "https://login.example/tenant-1/oauth2/v2.0/token"
CLIENT_SECRET = "s3cr3t-value-never-logged"
SCOPE = "https://hlf.crm4.dynamics.com/.default"


def granted(token: str, expires_in: int = 3599) -> httpx.Response:
    return httpx.Response(200, json={"access_token": token, "token_type": "Bearer", "expires_in": expires_in})


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(assert_all_called=False)


@pytest.fixture
def provider(http: httpx.AsyncClient, clock: ManualClock) -> ClientCredentialsTokenProvider:
    return ClientCredentialsTokenProvider(
        http,
        TOKEN_URL,
        client_id="certsync-app",
        client_secret=CLIENT_SECRET,
        scope=SCOPE,
        clock=clock,
        refresh_margin=60.0,
    )


# --- static --------------------------------------------------------------------------------------


async def test_static_provider_returns_its_token() -> None:
    assert await StaticTokenProvider("abc").token() == "abc"


async def test_static_provider_keeps_its_token_after_invalidation() -> None:
    tokens = StaticTokenProvider("abc")

    await tokens.invalidate("abc")

    assert await tokens.token() == "abc"


def test_static_provider_refuses_an_empty_token() -> None:
    with pytest.raises(ValueError, match="empty"):
        StaticTokenProvider("")


# --- client credentials: the request -------------------------------------------------------------


async def test_client_credentials_posts_the_form_to_the_token_url(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    route = router.post(TOKEN_URL).mock(return_value=granted("tok-1"))

    assert await provider.token() == "tok-1"

    request = route.calls.last.request
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(request.content.decode()) == {
        "grant_type": ["client_credentials"],
        "client_id": ["certsync-app"],
        "client_secret": [CLIENT_SECRET],
        "scope": [SCOPE],
    }


# --- client credentials: caching on the injected clock -------------------------------------------


async def test_token_is_cached_until_the_refresh_margin_before_expiry(
    provider: ClientCredentialsTokenProvider, router: respx.Router, clock: ManualClock
) -> None:
    route = router.post(TOKEN_URL).mock(side_effect=[granted("tok-1"), granted("tok-2")])

    await provider.token()
    clock.advance(3599 - 60 - 1)
    assert await provider.token() == "tok-1"
    clock.advance(1)
    assert await provider.token() == "tok-2"
    assert route.call_count == 2


async def test_a_token_shorter_than_twice_the_margin_is_used_for_half_its_lifetime(
    provider: ClientCredentialsTokenProvider, router: respx.Router, clock: ManualClock
) -> None:
    router.post(TOKEN_URL).mock(side_effect=[granted("tok-1", expires_in=100), granted("tok-2")])

    await provider.token()
    clock.advance(49)
    assert await provider.token() == "tok-1"
    clock.advance(1)
    assert await provider.token() == "tok-2"


async def test_invalidating_the_cached_token_fetches_a_new_one(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    router.post(TOKEN_URL).mock(side_effect=[granted("tok-1"), granted("tok-2")])

    await provider.invalidate(await provider.token())

    assert await provider.token() == "tok-2"


async def test_invalidating_a_token_already_replaced_keeps_the_current_one(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    route = router.post(TOKEN_URL).mock(side_effect=[granted("tok-1"), granted("tok-2")])
    stale = await provider.token()
    await provider.invalidate(stale)
    current = await provider.token()

    await provider.invalidate(stale)  # a late 401 on the old token, from a concurrent request

    assert await provider.token() == current == "tok-2"
    assert route.call_count == 2


async def test_concurrent_callers_share_one_token_fetch(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    gate = asyncio.Event()

    async def slow_token_endpoint(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        return granted("tok-1")

    async def open_gate() -> None:
        gate.set()

    route = router.post(TOKEN_URL).mock(side_effect=slow_token_endpoint)

    # gather starts the callers in order; the gate opens only after each has begun waiting.
    *tokens, _ = await asyncio.gather(*(provider.token() for _ in range(5)), open_gate())

    assert tokens == ["tok-1"] * 5
    assert route.call_count == 1


# --- client credentials: failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason"),
    [(400, "token endpoint: HTTP 400 Bad Request"), (401, "token endpoint: HTTP 401 Unauthorized")],
)
async def test_a_refusal_by_the_token_endpoint_is_an_authentication_error(
    provider: ClientCredentialsTokenProvider, router: respx.Router, status: int, reason: str
) -> None:
    router.post(TOKEN_URL).respond(status, json={"error": "invalid_client"})

    with pytest.raises(AuthenticationError) as raised:
        await provider.token()

    assert (raised.value.reason, raised.value.status) == (reason, status)


async def test_a_token_answer_without_an_access_token_is_an_authentication_error(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    router.post(TOKEN_URL).respond(200, json={"token_type": "Bearer", "expires_in": 3599})

    with pytest.raises(AuthenticationError) as raised:
        await provider.token()

    assert (
        raised.value.reason == "token endpoint: malformed response: HTTP 200 from /tenant-1/oauth2/v2.0/token"
    )


async def test_a_token_endpoint_5xx_is_transient(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    router.post(TOKEN_URL).respond(503)

    with pytest.raises(TransientDynamicsError) as raised:
        await provider.token()

    assert (raised.value.reason, raised.value.status) == ("token endpoint: HTTP 503 Service Unavailable", 503)


async def test_a_rate_limited_token_endpoint_keeps_its_kind_and_retry_after(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    router.post(TOKEN_URL).respond(429, headers={"Retry-After": "12"})

    with pytest.raises(RateLimitedError) as raised:
        await provider.token()

    assert raised.value.retry_after == 12.0


async def test_an_unreachable_token_endpoint_is_transient(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    router.post(TOKEN_URL).mock(side_effect=httpx.ConnectError)

    with pytest.raises(TransientDynamicsError) as raised:
        await provider.token()

    assert raised.value.reason == "token endpoint: transport: ConnectError"


async def test_a_failed_fetch_caches_nothing_and_the_next_call_tries_again(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    router.post(TOKEN_URL).mock(side_effect=[httpx.Response(503), granted("tok-1")])

    with pytest.raises(TransientDynamicsError):
        await provider.token()

    assert await provider.token() == "tok-1"


# --- secrets -------------------------------------------------------------------------------------


async def test_the_client_secret_and_token_appear_in_no_log_line(
    provider: ClientCredentialsTokenProvider, router: respx.Router
) -> None:
    router.post(TOKEN_URL).mock(return_value=granted("tok-visible-nowhere"))

    with capture_logs() as logs:
        await provider.token()

    assert logs, "the token request is logged"
    assert CLIENT_SECRET not in repr(logs)
    assert "tok-visible-nowhere" not in repr(logs)


def test_the_providers_repr_does_not_reveal_the_secret(provider: ClientCredentialsTokenProvider) -> None:
    assert CLIENT_SECRET not in repr(provider)
    assert TOKEN_URL in repr(provider)


# --- with the client -----------------------------------------------------------------------------


async def test_a_401_from_the_portal_makes_the_client_fetch_a_new_token_and_deliver(
    provider: ClientCredentialsTokenProvider, router: respx.Router, http: httpx.AsyncClient
) -> None:
    router.post(TOKEN_URL).mock(side_effect=[granted("tok-1"), granted("tok-2")])
    portal = router.get("https://portal.example/api/v1/contract").mock(
        side_effect=[httpx.Response(401), httpx.Response(200, json={"contract_versions": [1]})]
    )
    client = DynamicsClient(http, "https://portal.example", provider)

    assert await client.contract_versions() == (1,)
    assert [call.request.headers["Authorization"] for call in portal.calls] == [
        "Bearer tok-1",
        "Bearer tok-2",
    ]
