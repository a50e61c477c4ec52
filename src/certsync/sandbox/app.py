"""The sandbox portal over HTTP: contract v1's endpoints, the OAuth2 token endpoint and the admin API.

Portal routes (``/api/v1/…``, ``/oauth2/token``) pass through the fault script and the request log
first; admin routes (``/_sandbox/…``) never do. Refusals, decided and documented in docs/sandbox.md:

=====================================  ======  ===============================================
missing, unknown or expired bearer     401     ``{"error": "invalid_token"}``
missing or wrong webhook signature     401     ``{"error": "invalid_signature"}``
``contract_version`` not accepted      409     ``{"error": "unsupported_contract_version", …}``
body not JSON / against the schema     422     ``{"error": "invalid_body", "errors": […]}``
path id differs from body id           422     ``{"error": "certification_id_mismatch"}``
Idempotency-Key / webhook-id ≠ event   400     ``{"error": "idempotency_key_mismatch"}``
DELETE without an Idempotency-Key      400     ``{"error": "idempotency_key_missing"}``
DELETE of a certification not held     404     ``{"error": "not_found"}`` (done, for certsync)
=====================================  ======  ===============================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, TypeVar

import structlog
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import BaseModel, Field
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from certsync.dynamics.contract import contract_schema
from certsync.sandbox.faults import FaultDecision, FaultScriptError, parse_fault_script
from certsync.sandbox.state import Sandbox, SandboxConfig

ADMIN_PREFIX = "/_sandbox"
_UUID_PATTERN = "^[0-9a-fA-F-]{36}$"
_OUTCOME_KEY = "certsync.sandbox"

log = structlog.get_logger("certsync.sandbox")


class ConnectionDropped(RuntimeError):
    """Raised where the server offers no way to close the connection (e.g. Starlette's TestClient)."""


def _is_datetime(value: object) -> bool:
    return not isinstance(value, str) or datetime.fromisoformat(value).tzinfo is not None


def _format_checker() -> FormatChecker:
    checker = FormatChecker()
    # jsonschema checks "date-time" only when rfc3339-validator is installed; Python 3.11 parses RFC 3339
    # itself, and the schema's pattern already insists on a trailing "Z".
    checker.checks("date-time", raises=ValueError)(_is_datetime)
    return checker


class SandboxApp(FastAPI):
    """FastAPI with the fault script in front: it has to see uvicorn's own ``send`` to drop connections."""

    sandbox: Sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await super().__call__(scope, receive, send)
            return
        await self._portal_request(scope, receive, send)

    async def _portal_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        sandbox = self.sandbox
        method, path = scope["method"], scope["path"]
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
        }
        decision = sandbox.decide(method, path)
        answered: dict[str, Any] = {"status": None, "outcome": None}
        scope[_OUTCOME_KEY] = answered

        budget = _budget_header(decision)

        async def capturing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
                if budget is not None:
                    message = {**message, "headers": [*message.get("headers", ()), budget]}
            await send(message)

        try:
            if decision.delay:
                await sandbox.config.sleep(decision.delay)
            if decision.action == "drop":
                await _drop_connection(receive, send)
            elif decision.action == "respond":
                await _send_fault(decision, capturing_send)
            else:
                await super().__call__(scope, receive, capturing_send)
        finally:
            sandbox.finish(decision)
            entry = sandbox.record(
                method=method,
                path=path,
                headers=headers,
                status=answered["status"],
                decision=decision,
                outcome=answered["outcome"],
            )
            log.debug(
                "sandbox_request",
                seq=entry.seq,
                method=method,
                path=path,
                status=entry.status,
                fault=entry.fault,
                outcome=entry.outcome,
                has_authorization=entry.has_authorization,
                delay_ms=entry.delay_ms,
            )


BURST_REMAINING_HEADER = b"x-ms-ratelimit-burst-remaining-xrm-requests"


def _budget_header(decision: FaultDecision) -> tuple[bytes, bytes] | None:
    """Dataverse's remaining-requests header for an answer under the rate limit, else ``None``."""
    if decision.budget is None:
        return None
    return BURST_REMAINING_HEADER, str(decision.budget).encode()


async def _send_fault(decision: FaultDecision, send: Send) -> None:
    is_limit = bool(decision.fault and decision.fault.startswith("rate_limit"))
    content: dict[str, Any] = {
        "error": "rate_limited" if is_limit else "injected_fault",
        "fault": decision.fault,
    }
    headers = [(b"content-type", b"application/json")]
    if decision.retry_after is not None:
        content["retry_after"] = decision.retry_after
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    body = json.dumps(content).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": decision.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _drop_connection(receive: Receive, send: Send) -> None:
    """Close the TCP connection without a byte of response, as a failing load balancer would.

    ASGI has no message for this, so it reaches for the server's transport behind ``send`` (uvicorn's
    ``RequestResponseCycle``); then it waits for the server to notice, so no 500 is attempted.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionDropped("this server offers no transport to drop; run the sandbox under uvicorn")
    transport.abort()
    while (await receive())["type"] != "http.disconnect":
        pass


class _Refused(Exception):
    """A portal request refused as documented above; turned into a JSON error by ``_answer_refusal``."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status, self.error, self.extra = status, error, extra


async def _answer_refusal(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, _Refused)
    _set_outcome(request, exc.error)
    headers = {"WWW-Authenticate": f'Bearer error="{exc.error}"'} if exc.status == 401 else None
    return JSONResponse({"error": exc.error, **exc.extra}, status_code=exc.status, headers=headers)


CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request whose client hung up before it was answered; it is never sent."""


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up mid-request (a worker stopping, a timeout): recorded, not a server error
    with a traceback in the log."""
    _set_outcome(request, "client_disconnected")
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def _set_outcome(request: Request, outcome: str) -> None:
    answered = request.scope.get(_OUTCOME_KEY)
    if isinstance(answered, dict):
        answered["outcome"] = outcome


def _authorize(sandbox: Sandbox, headers: Mapping[str, str]) -> None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not sandbox.token_is_valid(token.strip()):
        raise _Refused(401, "invalid_token")


def _verify_signature(webhook: Webhook, raw: bytes, headers: Mapping[str, str]) -> None:
    try:
        webhook.verify(raw, dict(headers), json_parse=False)
    except (WebhookVerificationError, ValueError):
        raise _Refused(401, "invalid_signature") from None


def _valid_body(validator: Draft202012Validator, raw: bytes, accepted: tuple[int, ...]) -> dict[str, Any]:
    """The body once it is JSON, of an accepted contract version and valid against the v1 schema."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise _Refused(422, "invalid_body", errors=[{"path": "/", "message": "not JSON"}]) from None
    version = body.get("contract_version") if isinstance(body, dict) else None
    # A version we do not accept is a contract mismatch (409), not a malformed body: checked first.
    if type(version) is int and version not in accepted:
        raise _Refused(409, "unsupported_contract_version", accepted_contract_versions=list(accepted))
    errors = [
        {"path": "/" + "/".join(str(part) for part in error.absolute_path), "message": error.message}
        for error in validator.iter_errors(body)
    ]
    if errors:
        raise _Refused(422, "invalid_body", errors=sorted(errors, key=lambda error: error["path"]))
    assert isinstance(body, dict)
    return body


def _check_identity(
    body: dict[str, Any], certification_id: str, headers: Mapping[str, str], signed: bool
) -> None:
    """The path names the body's certification; Idempotency-Key (and webhook-id) name its event."""
    if body["certification"]["id"].lower() != certification_id.lower():
        raise _Refused(422, "certification_id_mismatch")
    event_id = body["event_id"].lower()
    if headers.get("idempotency-key", "").lower() != event_id:
        raise _Refused(400, "idempotency_key_mismatch")
    if signed and headers.get("webhook-id", "").lower() != event_id:
        raise _Refused(400, "webhook_id_mismatch")


class _ContractVersions(BaseModel):
    contract_versions: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)


_App = TypeVar("_App", bound=FastAPI)


def portal_app(cls: type[_App], title: str) -> _App:
    """A local portal's FastAPI app: its own OpenAPI and docs under the admin prefix, never the portal's."""
    return cls(
        title=title,
        docs_url=f"{ADMIN_PREFIX}/docs",
        openapi_url=f"{ADMIN_PREFIX}/openapi.json",
        redoc_url=None,
    )


def create_sandbox_app(config: SandboxConfig) -> SandboxApp:
    """A fresh sandbox portal with its own state; serve it with ``SandboxServer`` or ``run_sandbox``."""
    app = portal_app(SandboxApp, "certsync Dynamics sandbox")
    app.sandbox = Sandbox(config)
    app.add_exception_handler(_Refused, _answer_refusal)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    _add_portal_routes(app, app.sandbox)
    _add_admin_routes(app, app.sandbox)
    return app


def _add_portal_routes(app: FastAPI, sandbox: Sandbox) -> None:
    config = sandbox.config
    validator = Draft202012Validator(contract_schema(), format_checker=_format_checker())
    webhook = Webhook(config.signing_secret) if config.signing_secret else None

    @app.put("/api/v1/certifications/{certification_id}")
    async def put_certification(certification_id: str, request: Request) -> dict[str, Any]:
        raw = await request.body()
        _authorize(sandbox, request.headers)
        if webhook is not None:
            _verify_signature(webhook, raw, request.headers)
        body = _valid_body(validator, raw, sandbox.contract_versions)
        _check_identity(body, certification_id, request.headers, signed=webhook is not None)
        outcome = sandbox.upsert(body)
        _set_outcome(request, "stored" if outcome.applied else "ignored_not_newer")
        return {
            "certification_id": outcome.certification_id,
            "applied": outcome.applied,
            "version": outcome.current_version,
        }

    @app.delete("/api/v1/certifications/{certification_id}")
    async def delete_certification(certification_id: str, request: Request) -> Response:
        raw = await request.body()
        _authorize(sandbox, request.headers)
        if webhook is not None:
            _verify_signature(webhook, raw, request.headers)
        if not request.headers.get("idempotency-key"):
            raise _Refused(400, "idempotency_key_missing")
        if sandbox.delete(certification_id):
            _set_outcome(request, "deleted")
            return Response(status_code=204)
        raise _Refused(404, "not_found")

    @app.get("/api/v1/certifications")
    async def list_certifications(
        request: Request,
        after: Annotated[str | None, Query(pattern=_UUID_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    ) -> dict[str, Any]:
        _authorize(sandbox, request.headers)
        rows, cursor = sandbox.page(after, limit)
        return {"certifications": rows, "next": cursor}

    @app.get("/api/v1/contract")
    async def contract(request: Request) -> dict[str, list[int]]:
        _authorize(sandbox, request.headers)  # contract v1: every portal route takes the bearer token
        return {"contract_versions": list(sandbox.contract_versions)}

    @app.get("/api/v1/public-listing")
    async def public_listing(request: Request) -> dict[str, list[str]]:
        _authorize(sandbox, request.headers)
        return {"peer_mentor_ids": sandbox.public_listing()}

    @app.post("/oauth2/token")
    async def token(request: Request) -> JSONResponse:
        form = await request.form()
        if form.get("grant_type") != "client_credentials":
            raise _Refused(400, "unsupported_grant_type")
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if not (
            isinstance(client_id, str)
            and isinstance(client_secret, str)
            and sandbox.credentials_match(client_id, client_secret)
        ):
            raise _Refused(401, "invalid_client")
        _set_outcome(request, "token_issued")
        return JSONResponse(
            {
                "access_token": sandbox.issue_token(),
                "token_type": "Bearer",
                "expires_in": config.token_ttl_seconds,
            },
            headers={"Cache-Control": "no-store"},
        )


def _add_admin_routes(app: FastAPI, sandbox: Sandbox) -> None:
    def faults_view() -> dict[str, Any]:
        return {
            "script": sandbox.faults.script.to_json_dict(),
            "remaining_steps": sandbox.faults.remaining_steps(),
            "in_flight": sandbox.faults.in_flight,
        }

    @app.get(f"{ADMIN_PREFIX}/faults")
    async def get_faults() -> dict[str, Any]:
        return faults_view()

    @app.post(f"{ADMIN_PREFIX}/faults")
    async def set_faults(request: Request) -> JSONResponse:
        try:
            script = parse_fault_script(await request.json())
        except (FaultScriptError, ValueError) as exc:
            return JSONResponse({"error": "invalid_fault_script", "detail": str(exc)}, status_code=422)
        sandbox.load_faults(script)
        log.info("sandbox_faults_loaded", steps=len(script.steps))
        return JSONResponse(faults_view())

    @app.post(f"{ADMIN_PREFIX}/reset")
    async def reset() -> dict[str, str]:
        sandbox.reset()
        log.info("sandbox_reset")
        return {"status": "reset"}

    @app.get(f"{ADMIN_PREFIX}/requests")
    async def requests(since: int = 0) -> dict[str, list[dict[str, Any]]]:
        return {"requests": [entry.to_json_dict() for entry in sandbox.requests(since)]}

    @app.get(f"{ADMIN_PREFIX}/state")
    async def state() -> dict[str, Any]:
        return sandbox.snapshot()

    @app.post(f"{ADMIN_PREFIX}/contract-versions")
    async def set_contract_versions(body: _ContractVersions) -> dict[str, list[int]]:
        sandbox.set_contract_versions(tuple(body.contract_versions))
        log.info("sandbox_contract_versions", contract_versions=body.contract_versions)
        return {"contract_versions": list(sandbox.contract_versions)}

    @app.post(f"{ADMIN_PREFIX}/expire-tokens")
    async def expire_tokens() -> dict[str, int]:
        return {"expired": sandbox.expire_tokens()}
