"""The portal's HTTP client for contract v1: which URL, headers and bytes, and what each answer means.

The transport is the seam: ``DynamicsClient`` takes an ``httpx.AsyncClient`` (tests give it respx, the demo
the sandbox). Every answer is classified by one function, ``classify_response``, onto
``certsync.dynamics.errors``::

    2xx                           delivered
    401                           AuthenticationError (after the client's one retry with a fresh token)
    408, 429, 5xx                 TransientDynamicsError; 429 is RateLimitedError; 429/503 carry Retry-After
    any other status (4xx, 3xx)   PermanentDynamicsError; ContractMismatchError when the body's
                                  ``accepted_contract_versions`` does not include ours
    timeouts, transport errors    TransientDynamicsError ("timeout: ReadTimeout", "transport: ConnectError")

The client makes exactly one attempt per call (plus the one 401 refresh): retries, back-off and the circuit
breaker belong to ``HLFDynamicsSyncService``. Given a ``SendGate``, every portal exchange takes a permit
from it first and hands back the budget the portal reported with the answer (``remaining_budget``), so
that sends wait for the window to free instead of collecting 429s. Each HTTP exchange is logged once as
``dynamics_request`` with method, path, status or error class and duration; never a token, secret or name.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar
from uuid import UUID

import httpx
import structlog
from pydantic import BaseModel, ValidationError

from certsync.dynamics.contract import CONTRACT_VERSION, CertificationUpsert
from certsync.dynamics.errors import (
    AuthenticationError,
    ContractMismatchError,
    PermanentDynamicsError,
    RateLimitedError,
    TransientDynamicsError,
)
from certsync.resilience.clock import Clock, SystemClock
from certsync.resilience.gate import SendGate
from certsync.resilience.retry import parse_retry_after

if TYPE_CHECKING:
    # Only for annotations: auth imports this module's transport helpers at runtime.
    from certsync.dynamics.auth import TokenProvider
    from certsync.dynamics.signing import RequestSigner

__all__ = [
    "CERTIFICATION_PATH",
    "CONTRACT_PATH",
    "PUBLIC_LISTING_PATH",
    "DeliveryReceipt",
    "DynamicsClient",
    "classify_response",
    "encode_body",
    "paced",
    "parse_body",
    "remaining_budget",
    "send",
]

log = structlog.get_logger(__name__)

CERTIFICATION_PATH = "/api/v1/certifications/{certification_id}"
CONTRACT_PATH = "/api/v1/contract"
PUBLIC_LISTING_PATH = "/api/v1/public-listing"
BURST_REMAINING_HEADER = "x-ms-ratelimit-burst-remaining-xrm-requests"
"""Dataverse: the requests left in the service-protection window, sent with every Web API answer."""

_Body = TypeVar("_Body", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """The portal accepted an upsert: its 2xx status and how long the whole call took on the clock."""

    status: int
    elapsed_seconds: float


class _ContractVersions(BaseModel):
    contract_versions: list[int]


class _PublicListing(BaseModel):
    peer_mentor_ids: list[UUID]


class _ContractRefusal(BaseModel):
    accepted_contract_versions: list[int]


class DynamicsClient:
    """Contract v1 over an injected ``httpx.AsyncClient``; one attempt per call, classified errors."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        tokens: TokenProvider,
        *,
        signer: RequestSigner | None = None,
        clock: Clock | None = None,
        timeout: float = 10.0,
        gate: SendGate | None = None,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._signer = signer
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._timeout = timeout
        self._gate = gate

    async def upsert_certification(self, body: CertificationUpsert) -> DeliveryReceipt:
        """PUT one certification's state; raises a ``DynamicsError`` unless the portal answered 2xx."""
        started = self._clock.now()
        content = encode_body(body)
        event_id = str(body.event_id)
        headers = {"Content-Type": "application/json", "Idempotency-Key": event_id}
        if self._signer is not None:
            # Signed once over the exact bytes sent: a retry after 401 resends the same signed message.
            headers |= self._signer.headers(event_id, content, self._clock.now())
        path = CERTIFICATION_PATH.format(certification_id=body.certification.id)
        response = await self._authorised("PUT", path, headers=headers, content=content, event_id=event_id)
        elapsed = (self._clock.now() - started).total_seconds()
        return DeliveryReceipt(status=response.status_code, elapsed_seconds=elapsed)

    async def contract_versions(self) -> tuple[int, ...]:
        """The contract versions the portal accepts now (``GET /api/v1/contract``)."""
        response = await self._authorised("GET", CONTRACT_PATH)
        return tuple(parse_body(_ContractVersions, response).contract_versions)

    async def public_listing(self) -> frozenset[UUID]:
        """The peer mentors the portal lists publicly now (``GET /api/v1/public-listing``)."""
        response = await self._authorised("GET", PUBLIC_LISTING_PATH)
        return frozenset(parse_body(_PublicListing, response).peer_mentor_ids)

    async def _authorised(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        event_id: str | None = None,
    ) -> httpx.Response:
        """One request with a bearer token; a 401 gets exactly one retry with a freshly fetched token."""

        async def attempt(token: str) -> httpx.Response:
            def exchange() -> Awaitable[httpx.Response]:
                return send(
                    self._http,
                    method,
                    self._base_url + path,
                    clock=self._clock,
                    request_timeout=self._timeout,
                    headers={**(headers or {}), "Authorization": f"Bearer {token}"},
                    content=content,
                    log_fields={"event_id": event_id} if event_id is not None else None,
                )

            return await (exchange() if self._gate is None else paced(self._gate, exchange))

        token = await self._tokens.token()
        response = await attempt(token)
        if response.status_code == httpx.codes.UNAUTHORIZED:
            await self._tokens.invalidate(token)
            response = await attempt(await self._tokens.token())
        classify_response(response, self._clock.now())
        return response


def encode_body(body: CertificationUpsert) -> bytes:
    """The request body's bytes, serialised once: what is signed is exactly what is sent."""
    return json.dumps(body.to_json_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


async def send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    clock: Clock,
    request_timeout: float,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    form: Mapping[str, str] | None = None,
    log_fields: Mapping[str, object] | None = None,
) -> httpx.Response:
    """One HTTP exchange with the portal or its token endpoint: transport failures mapped, one log line.

    Raises ``TransientDynamicsError`` for timeouts and transport errors; any response is returned
    unclassified (the caller decides when to classify, e.g. after a 401 refresh).
    """
    path = httpx.URL(url).path
    started = clock.now()
    try:
        response = await http.request(
            method, url, headers=headers, content=content, data=form, timeout=request_timeout
        )
    except httpx.TransportError as exc:
        error = transport_failure(exc)
        log.warning(
            "dynamics_request",
            method=method,
            path=path,
            error=type(exc).__name__,
            duration_ms=_milliseconds_since(started, clock),
            **(log_fields or {}),
        )
        raise error from exc
    emit = log.info if response.is_success else log.warning
    emit(
        "dynamics_request",
        method=method,
        path=path,
        status=response.status_code,
        duration_ms=_milliseconds_since(started, clock),
        **(log_fields or {}),
    )
    return response


def transport_failure(exc: httpx.TransportError) -> TransientDynamicsError:
    """A request that got no response: always worth retrying; the reason names the httpx error class."""
    kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "transport"
    return TransientDynamicsError(f"{kind}: {type(exc).__name__}")


def classify_response(response: httpx.Response, now: datetime) -> None:
    """Return for 2xx; otherwise raise the mapped ``DynamicsError`` (see the module docstring's table)."""
    status = response.status_code
    if response.is_success:
        return
    reason = _describe(status)
    if status == httpx.codes.UNAUTHORIZED:
        raise AuthenticationError(reason, status=status)
    if status == httpx.codes.TOO_MANY_REQUESTS:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now)
        raise RateLimitedError(reason, status=status, retry_after=retry_after)
    if status == httpx.codes.REQUEST_TIMEOUT or status >= 500:
        retry_after = (
            parse_retry_after(response.headers.get("Retry-After"), now)
            if status == httpx.codes.SERVICE_UNAVAILABLE
            else None
        )
        raise TransientDynamicsError(reason, status=status, retry_after=retry_after)
    accepted = _accepted_contract_versions(response)
    if accepted is not None and CONTRACT_VERSION not in accepted:
        listed = ", ".join(str(version) for version in accepted) or "none"
        raise ContractMismatchError(
            f"{reason}: contract v{CONTRACT_VERSION} not accepted (portal accepts {listed})", status=status
        )
    raise PermanentDynamicsError(reason, status=status)


async def paced(gate: SendGate, exchange: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """One exchange under the gate's pacing: a permit first, then the answer's budget handed back."""
    permit = await gate.acquire()
    try:
        response = await exchange()
    except BaseException:
        gate.release(permit)
        raise
    gate.release(
        permit,
        remaining=remaining_budget(response),
        admitted=response.status_code != httpx.codes.TOO_MANY_REQUESTS,
    )
    return response


def remaining_budget(response: httpx.Response) -> int | None:
    """The requests the portal says are left in its window (``None``: not reported or unreadable).

    Dataverse formats numbers with group separators on some answers (``1,200.00``), so those are read too.
    """
    value = response.headers.get(BURST_REMAINING_HEADER)
    if value is None:
        return None
    try:
        return max(0, int(float(value.strip().replace(",", ""))))
    except (ValueError, OverflowError):
        return None


def parse_body(model: type[_Body], response: httpx.Response) -> _Body:
    """A 2xx response's JSON body as ``model``; a body we cannot read is the portal's permanent fault."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError:
        raise PermanentDynamicsError(
            f"malformed response: HTTP {response.status_code} from {response.request.url.path}",
            status=response.status_code,
        ) from None


def _accepted_contract_versions(response: httpx.Response) -> list[int] | None:
    try:
        return _ContractRefusal.model_validate_json(response.content).accepted_contract_versions
    except ValidationError:
        return None


def _describe(status: int) -> str:
    return f"HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip()


def _milliseconds_since(started: datetime, clock: Clock) -> float:
    return round((clock.now() - started).total_seconds() * 1000, 1)
