"""One HTTP exchange with the portal or its token endpoint, and what each answer means.

Shared by every adapter of the portal port and by the token providers (``auth``), so that an answer is
classified by one function, ``classify_response``, onto ``certsync.dynamics.errors``::

    2xx                           delivered
    401                           AuthenticationError (after the caller's one retry with a fresh token)
    408, 429, 5xx                 TransientDynamicsError; 429 is RateLimitedError; 429/503 carry Retry-After
    any other status (4xx, 3xx)   PermanentDynamicsError; ContractMismatchError when the body's
                                  ``accepted_contract_versions`` does not include ours
    timeouts, transport errors    TransientDynamicsError ("timeout: ReadTimeout", "transport: ConnectError")

Each exchange is logged once as ``dynamics_request`` with method, path, status or error class and
duration; never a token, secret or name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TypeVar

import httpx
import structlog
from pydantic import BaseModel, ValidationError

from certsync.dynamics.contract import CONTRACT_VERSION
from certsync.dynamics.errors import (
    AuthenticationError,
    ContractMismatchError,
    PermanentDynamicsError,
    RateLimitedError,
    TransientDynamicsError,
)
from certsync.resilience.clock import Clock
from certsync.resilience.gate import SendGate
from certsync.resilience.instrumentation import Instrumentation, RequestFinished
from certsync.resilience.retry import parse_retry_after

__all__ = [
    "BURST_REMAINING_HEADER",
    "classify_response",
    "paced",
    "parse_body",
    "remaining_budget",
    "send",
    "transport_failure",
]

log = structlog.get_logger(__name__)

BURST_REMAINING_HEADER = "x-ms-ratelimit-burst-remaining-xrm-requests"
"""Dataverse: the requests left in the service-protection window, sent with every Web API answer."""

_Body = TypeVar("_Body", bound=BaseModel)


class _ContractRefusal(BaseModel):
    accepted_contract_versions: list[int]


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
    instrumentation: Instrumentation | None = None,
    absent_is_done: bool = False,
) -> httpx.Response:
    """One HTTP exchange with the portal or its token endpoint: transport failures mapped, one log line
    (a warning for a failure; ``absent_is_done``: a 404 is the outcome asked for, as for a delete).

    Raises ``TransientDynamicsError`` for timeouts and transport errors; any response is returned
    unclassified (the caller decides when to classify, e.g. after a 401 refresh).
    """
    # Parsed once: httpx takes the parsed URL as it is, where a string would be parsed again (at a
    # single-request worker's rate the second parse was ~2 % of its CPU).
    target = httpx.URL(url)
    path = target.path
    started = clock.now()
    try:
        response = await http.request(
            method, target, headers=headers, content=content, data=form, timeout=request_timeout
        )
    except httpx.TransportError as exc:
        error = transport_failure(exc)
        if instrumentation is not None:
            instrumentation.emit(RequestFinished(method, None, _seconds_since(started, clock)))
        log.warning(
            "dynamics_request",
            method=method,
            path=path,
            error=type(exc).__name__,
            duration_ms=_milliseconds_since(started, clock),
            **(log_fields or {}),
        )
        raise error from exc
    if instrumentation is not None:
        instrumentation.emit(RequestFinished(method, response.status_code, _seconds_since(started, clock)))
    done = response.is_success or (absent_is_done and response.status_code == httpx.codes.NOT_FOUND)
    emit = log.info if done else log.warning
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


def classify_response(
    response: httpx.Response,
    now: datetime,
    *,
    detail: Callable[[httpx.Response], str | None] | None = None,
) -> None:
    """Return for 2xx; otherwise raise the mapped ``DynamicsError`` (see the module docstring's table).

    The reason is the status and its phrase; ``detail`` may add what the wire's error body says (the
    Dataverse adapter adds its OData error code and message; contract v1 adds nothing from the body).
    """
    status = response.status_code
    if response.is_success:
        return
    reason = _describe(status)
    extra = detail(response) if detail is not None else None
    if extra:
        reason = f"{reason}: {extra}"
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


def _seconds_since(started: datetime, clock: Clock) -> float:
    return (clock.now() - started).total_seconds()


def _milliseconds_since(started: datetime, clock: Clock) -> float:
    return round((clock.now() - started).total_seconds() * 1000, 1)
