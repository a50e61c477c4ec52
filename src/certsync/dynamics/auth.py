"""Bearer tokens for the portal: the ``TokenProvider`` port, a static token, and OAuth2 client credentials.

``DynamicsClient`` asks ``token()`` before each request; on a 401 it calls ``invalidate(rejected)`` with the
token that was refused and asks again, once. Passing the rejected token (rather than a bare
``invalidate()``) lets many concurrent 401s on the same stale token cause one refetch, not one each: a
provider forgets its cached token only if it is still the one that was refused.

``ClientCredentialsTokenProvider`` is the plain OAuth2 form post (RFC 6749 §4.4) that both Entra ID
(``https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`` with scope
``https://<org>.crm.dynamics.com/.default``) and the local sandbox answer. We keep it rather than msal or
azure-identity because it is one request through the same injected ``httpx.AsyncClient`` as the portal
calls, so respx tests, the sandbox and production exercise one code path; msal is synchronous (it would need
a thread) and azure-identity's async credentials bring their own HTTP pipeline (aiohttp) outside our
transport seam. Should production move to a certificate or a managed identity, where those libraries earn
their keep, implement ``TokenProvider`` over ``azure.identity.aio.CertificateCredential`` or
``ManagedIdentityCredential``: ``token()`` returns ``(await credential.get_token(scope)).token`` (it caches
and refreshes itself) and ``invalidate`` does nothing.

Secrets never reach a log line, an exception message or a ``repr``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import httpx
from pydantic import BaseModel, Field

from certsync.dynamics.errors import AuthenticationError, DynamicsError, TransientDynamicsError
from certsync.dynamics.http import classify_response, parse_body, send
from certsync.resilience.clock import Clock
from certsync.resilience.instrumentation import Instrumentation

__all__ = ["ClientCredentialsTokenProvider", "StaticTokenProvider", "TokenProvider"]


class TokenProvider(Protocol):
    """Where bearer tokens come from. Raises ``AuthenticationError`` or ``TransientDynamicsError``."""

    async def token(self) -> str:
        """A token believed valid now (cached or freshly fetched)."""
        ...

    async def invalidate(self, rejected: str) -> None:
        """The portal refused ``rejected`` (401): forget it, if it is still the cached one."""
        ...


class StaticTokenProvider:
    """One configured token (``CERTSYNC_DYNAMICS_TOKEN``); it cannot be refreshed."""

    __slots__ = ("_token",)

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("a static bearer token may not be empty")
        self._token = token

    async def token(self) -> str:
        return self._token

    async def invalidate(self, rejected: str) -> None:
        # Nothing to refetch: the client's one retry resends the same token and a second 401 becomes
        # AuthenticationError, which is the truth (the configured token is no longer accepted).
        return None


@dataclass(frozen=True, slots=True, repr=False)
class _CachedToken:
    value: str
    refresh_at: datetime


class _TokenResponse(BaseModel):
    access_token: str = Field(min_length=1)
    expires_in: float = Field(gt=0)


class ClientCredentialsTokenProvider:
    """OAuth2 client credentials, cached until ``refresh_margin`` seconds before expiry; one fetch at a time.

    Concurrent callers that find no usable token wait on one lock, and all but the first find the token
    the first one fetched (single flight). A token whose lifetime is under twice the margin is used for half
    its lifetime instead, so a short-lived token is still cached rather than fetched for every request.
    """

    __slots__ = (
        "_cached",
        "_clock",
        "_form",
        "_http",
        "_instrumentation",
        "_lock",
        "_refresh_margin",
        "_timeout",
        "_token_url",
    )

    def __init__(
        self,
        http: httpx.AsyncClient,
        token_url: str,
        *,
        client_id: str,
        client_secret: str,
        scope: str,
        clock: Clock,
        refresh_margin: float = 60.0,
        timeout: float = 10.0,
        instrumentation: Instrumentation | None = None,
    ) -> None:
        self._http = http
        self._token_url = token_url
        self._form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_secret": client_secret,
            "scope": scope,
        }
        self._clock = clock
        self._refresh_margin = refresh_margin
        self._timeout = timeout
        self._instrumentation = instrumentation
        self._lock = asyncio.Lock()
        self._cached: _CachedToken | None = None

    def __repr__(self) -> str:
        return f"ClientCredentialsTokenProvider(token_url={self._token_url!r})"

    async def token(self) -> str:
        usable = self._usable()
        if usable is not None:
            return usable
        async with self._lock:
            # Whoever held the lock before us may have fetched a token already.
            usable = self._usable()
            if usable is not None:
                return usable
            self._cached = await self._fetch()
            return self._cached.value

    async def invalidate(self, rejected: str) -> None:
        if self._cached is not None and self._cached.value == rejected:
            self._cached = None

    def _usable(self) -> str | None:
        cached = self._cached
        if cached is not None and self._clock.now() < cached.refresh_at:
            return cached.value
        return None

    async def _fetch(self) -> _CachedToken:
        fetched_at = self._clock.now()
        try:
            response = await send(
                self._http,
                "POST",
                self._token_url,
                clock=self._clock,
                request_timeout=self._timeout,
                form=self._form,
                instrumentation=self._instrumentation,
            )
            classify_response(response, self._clock.now())
            body = parse_body(_TokenResponse, response)
        except DynamicsError as exc:
            raise _at_token_endpoint(exc) from exc
        refresh_at = fetched_at + self._usable_for(body.expires_in)
        return _CachedToken(value=body.access_token, refresh_at=refresh_at)

    def _usable_for(self, expires_in: float) -> timedelta:
        if expires_in > 2 * self._refresh_margin:
            return timedelta(seconds=expires_in - self._refresh_margin)
        return timedelta(seconds=expires_in / 2)


def _at_token_endpoint(exc: DynamicsError) -> DynamicsError:
    """Transient stays transient (kind and Retry-After kept); anything else means we were refused."""
    reason = f"token endpoint: {exc.reason}"
    if isinstance(exc, TransientDynamicsError):
        return type(exc)(reason, status=exc.status, retry_after=exc.retry_after)
    return AuthenticationError(reason, status=exc.status)
