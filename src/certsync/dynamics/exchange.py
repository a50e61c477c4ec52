"""One portal's authorised requests, whichever wire it speaks: the bearer token (with exactly one
refresh after a 401), the send gate's pacing, one log line, and the classification of the answer.

Both adapters of the portal port (contract v1's ``DynamicsClient`` and ``DataverseClient``) send through
an ``AuthorisedExchange``; they differ only in URLs, headers, bodies and what an error body adds to the
reason (``detail``: Dataverse's OData error code and message).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import httpx

from certsync.dynamics.auth import TokenProvider
from certsync.dynamics.http import classify_response, paced, send
from certsync.resilience.clock import Clock
from certsync.resilience.gate import SendGate
from certsync.resilience.instrumentation import Instrumentation

__all__ = ["AuthorisedExchange", "ErrorDetail"]

ErrorDetail = Callable[[httpx.Response], str | None]
"""What an error answer's body adds to the failure reason (None: nothing)."""


class AuthorisedExchange:
    """Requests to ``base_url`` with a bearer token from ``tokens``; one attempt each (+ one 401 refresh)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        tokens: TokenProvider,
        *,
        clock: Clock,
        timeout: float,
        gate: SendGate | None = None,
        instrumentation: Instrumentation | None = None,
        headers: Mapping[str, str] | None = None,
        detail: ErrorDetail | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._tokens = tokens
        self._clock = clock
        self._timeout = timeout
        self._gate = gate
        self._instrumentation = instrumentation
        self._headers = dict(headers or {})
        self._detail = detail

    @property
    def clock(self) -> Clock:
        return self._clock

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        event_id: str | None = None,
        done_if_absent: bool = False,
        url: str | None = None,
    ) -> httpx.Response:
        """``method`` on ``base_url + path`` (or the absolute ``url``, e.g. a next-page link); a 2xx is
        returned, anything else raises the classified ``DynamicsError``.

        ``done_if_absent``: a 404 is the outcome asked for (a delete of what the portal does not hold).
        """
        target = url if url is not None else self.base_url + path

        async def attempt(token: str) -> httpx.Response:
            def exchange() -> Awaitable[httpx.Response]:
                return send(
                    self._http,
                    method,
                    target,
                    clock=self._clock,
                    request_timeout=self._timeout,
                    headers={**self._headers, **(headers or {}), "Authorization": f"Bearer {token}"},
                    content=content,
                    log_fields={"event_id": event_id} if event_id is not None else None,
                    instrumentation=self._instrumentation,
                    absent_is_done=done_if_absent,
                )

            return await (exchange() if self._gate is None else paced(self._gate, exchange))

        token = await self._tokens.token()
        response = await attempt(token)
        if response.status_code == httpx.codes.UNAUTHORIZED:
            await self._tokens.invalidate(token)
            response = await attempt(await self._tokens.token())
        if not (done_if_absent and response.status_code == httpx.codes.NOT_FOUND):
            classify_response(response, self._clock.now(), detail=self._detail)
        return response
