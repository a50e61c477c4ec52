"""Entra ID tokens through Microsoft's own identity library, msal (``CERTSYNC_DYNAMICS_TENANT_ID`` set).

Why msal and not azure-identity: msal is the library azure-identity itself is built on, it takes an
injected ``http_client`` (so tests drive it over loopback against a local authority, and nothing else
needs patching), it caches tokens in memory and renews them before they expire (it honours the
``refresh_in`` hint Entra ID sends), and it supports both credentials HLF may issue: a client secret,
or a certificate (PEM: key and certificate, thumbprint computed here). azure-identity's async
credentials would bring a second HTTP stack (aiohttp) outside our transport seam for no gain here.

msal is synchronous: each token acquisition runs in a worker thread, one at a time (single flight), and
most calls are answered from msal's cache without any request. After a 401 the rejected token is
removed from the cache, so the client's one retry gets a fresh one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from certsync.dynamics.errors import AuthenticationError, TransientDynamicsError

__all__ = ["EntraIdTokenProvider", "certificate_credential"]

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"

# msal's error codes that mean "these credentials are refused", not "try again".
_REFUSALS = frozenset(
    {"invalid_client", "unauthorized_client", "invalid_scope", "invalid_request", "invalid_grant"}
)


def certificate_credential(path: Path) -> dict[str, str]:
    """msal's client credential from one PEM file holding the certificate and its private key."""
    try:
        pem = path.read_text("utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if "PRIVATE KEY-----" not in pem:
        raise ValueError(f"{path} holds no private key (expected the certificate and its key, PEM)")
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("utf-8"))
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    return {
        "private_key": pem,
        "thumbprint": certificate.fingerprint(hashes.SHA1()).hex(),  # noqa: S303  (Entra ID's x5t is SHA-1)
        "public_certificate": certificate.public_bytes(Encoding.PEM).decode("ascii"),
    }


class EntraIdTokenProvider:
    """Client credentials for ``scope`` (``{base}/.default``) from tenant ``tenant_id``."""

    def __init__(
        self,
        *,
        tenant_id: str,
        client_id: str,
        scope: str,
        client_secret: str | None = None,
        certificate_path: Path | None = None,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        http_client: requests.Session | None = None,
        timeout: float = 10.0,
    ) -> None:
        if (client_secret is None) == (certificate_path is None):
            raise ValueError("give exactly one credential: a client secret or a certificate")
        credential: str | dict[str, str]
        if client_secret is not None:
            credential = client_secret
        else:
            assert certificate_path is not None
            credential = certificate_credential(certificate_path)
        self._scope = scope
        self._settings: dict[str, Any] = {
            "client_id": client_id,
            "client_credential": credential,
            "authority": f"{authority_host.rstrip('/')}/{tenant_id}",
            "http_client": http_client,
            "timeout": timeout,
            # A local or sovereign-cloud authority is not in Microsoft's instance list.
            "instance_discovery": authority_host == DEFAULT_AUTHORITY_HOST,
        }
        self._app: Any = None  # built on first use: msal discovers the tenant over HTTP as it is built
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"EntraIdTokenProvider(scope={self._scope!r})"

    async def token(self) -> str:
        async with self._lock:
            try:
                result: dict[str, Any] = await asyncio.to_thread(self._acquire)
            except (requests.RequestException, OSError) as exc:
                raise TransientDynamicsError(f"token endpoint: transport: {type(exc).__name__}") from None
            except ValueError as exc:  # msal: an authority it cannot use, a malformed answer
                raise AuthenticationError(f"token endpoint: {exc}") from None
        token = result.get("access_token")
        if isinstance(token, str) and token:
            return token
        error = str(result.get("error") or "no access_token in the answer")
        # The description may quote the client id; it names no person and never the secret.
        description = " ".join(str(result.get("error_description") or "").split())[:200]
        reason = f"token endpoint: {error}" + (f" ({description})" if description else "")
        if error in _REFUSALS:
            raise AuthenticationError(reason)
        raise TransientDynamicsError(reason)

    def _acquire(self) -> dict[str, Any]:
        """In a worker thread: msal answers from its cache, or asks Entra ID (discovering it first)."""
        if self._app is None:
            settings = self._settings
            self._app = msal.ConfidentialClientApplication(
                settings["client_id"], **{k: v for k, v in settings.items() if k != "client_id"}
            )
        result: dict[str, Any] = self._app.acquire_token_for_client(scopes=[self._scope])
        return result

    async def invalidate(self, rejected: str) -> None:
        """Forget ``rejected`` in msal's cache, so the next ``token()`` fetches a new one."""
        async with self._lock:
            if self._app is None:
                return
            cache = self._app.token_cache
            for entry in list(cache.search(msal.TokenCache.CredentialType.ACCESS_TOKEN)):
                if entry.get("secret") == rejected:
                    cache.remove_at(entry)
