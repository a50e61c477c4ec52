"""A local stand-in for Entra ID's token endpoint, over HTTPS with a throwaway CA (trustme), so that
Microsoft's own identity library (msal) is driven unchanged: tenant discovery, then client credentials
with a secret or a certificate assertion. It records what each token request carried."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from certsync.serving import BackgroundServer, Tls

TENANT = "00000000-1111-4222-8333-444444444444"
CLIENT_ID = "certsync-app"
CLIENT_SECRET = "local-secret-value-123"


@dataclass
class Authority:
    server: BackgroundServer
    ca: trustme.CA
    ca_file: str
    lifetime_seconds: int = 3599
    issued: list[dict[str, Any]] = field(default_factory=list)
    certificates: list[str] = field(default_factory=list)  # PEM certificates whose assertions are accepted

    @property
    def host(self) -> str:
        return self.server.url

    def session(self) -> requests.Session:
        session = requests.Session()
        # The machine's REQUESTS_CA_BUNDLE would win over ``verify`` while the session trusts the env.
        session.trust_env = False
        session.verify = self.ca_file
        return session


def _app(authority: Authority) -> FastAPI:
    app = FastAPI()

    @app.get("/{tenant}/v2.0/.well-known/openid-configuration")
    async def discovery(tenant: str) -> dict[str, str]:
        base = f"{authority.host}/{tenant}"
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "issuer": f"{base}/v2.0",
        }

    @app.post("/{tenant}/oauth2/v2.0/token")
    async def token(tenant: str, request: Request) -> JSONResponse:
        form = dict(await request.form())
        refused = JSONResponse({"error": "invalid_client", "error_description": "AADSTS7000215"}, 401)
        if tenant != TENANT or form.get("client_id") != CLIENT_ID:
            return refused
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        if "client_secret" in form:
            if form["client_secret"] != CLIENT_SECRET:
                return refused
            how = "secret"
        else:
            assertion = str(form.get("client_assertion", ""))
            if not any(_valid_assertion(assertion, pem) for pem in authority.certificates):
                return refused
            how = "certificate"
        authority.issued.append({"scope": form.get("scope"), "credential": how})
        return JSONResponse(
            {
                "access_token": f"entra-{secrets.token_hex(8)}",
                "token_type": "Bearer",
                "expires_in": authority.lifetime_seconds,
            }
        )

    return app


def _valid_assertion(assertion: str, certificate_pem: str) -> bool:
    """A client assertion signed by the certificate's key (msal signs RS256 or PS256)."""
    key = x509.load_pem_x509_certificate(certificate_pem.encode()).public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        jwt.decode(assertion, key, algorithms=["RS256", "PS256"], options={"verify_aud": False})
    except jwt.PyJWTError:
        return False
    return True


@pytest.fixture(name="authority")
def authority_fixture(tmp_path: Path) -> Iterator[Authority]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile, ca_file = tmp_path / "tls.pem", tmp_path / "tls.key", tmp_path / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    leaf.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(ca_file))
    authority = Authority(server=None, ca=ca, ca_file=str(ca_file))  # type: ignore[arg-type]
    authority.server = BackgroundServer(_app(authority), tls=Tls(str(certfile), str(keyfile)), name="entra")
    with authority.server:
        yield authority
