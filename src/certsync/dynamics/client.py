"""The contract v1 adapter of the portal port (``docs/contract-v1.md``): which URL, headers and bytes.

The transport is the seam: ``DynamicsClient`` takes an ``httpx.AsyncClient`` (tests give it respx, the demo
the sandbox). Every answer is classified by ``certsync.dynamics.http.classify_response``.

The client makes exactly one attempt per call (plus the one 401 refresh): retries, back-off and the circuit
breaker belong to ``HLFDynamicsSyncService``. Given a ``SendGate``, every portal exchange takes a permit
from it first and hands back the budget the portal reported with the answer (``remaining_budget``), so
that sends wait for the window to free instead of collecting 429s.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from uuid import UUID

import httpx
import structlog
from pydantic import BaseModel, Field

from certsync.dynamics.auth import TokenProvider
from certsync.dynamics.contract import CONTRACT_VERSION, CertificationStatusName, CertificationUpsert
from certsync.dynamics.exchange import AuthorisedExchange
from certsync.dynamics.http import parse_body
from certsync.dynamics.port import CertificationDelete, ContractCheck, DeliveryReceipt, PortalHolding
from certsync.dynamics.signing import RequestSigner
from certsync.resilience.clock import Clock, SystemClock
from certsync.resilience.gate import SendGate
from certsync.resilience.instrumentation import Instrumentation

__all__ = [
    "CERTIFICATIONS_PATH",
    "CERTIFICATION_PATH",
    "CONTRACT_PATH",
    "PUBLIC_LISTING_PATH",
    "DynamicsClient",
    "encode_body",
]

log = structlog.get_logger(__name__)

CERTIFICATION_PATH = "/api/v1/certifications/{certification_id}"
CERTIFICATIONS_PATH = "/api/v1/certifications"
CONTRACT_PATH = "/api/v1/contract"
PUBLIC_LISTING_PATH = "/api/v1/public-listing"


class _ContractVersions(BaseModel):
    contract_versions: list[int]


class _PublicListing(BaseModel):
    peer_mentor_ids: list[UUID]


class _Holding(BaseModel):
    id: UUID
    version: int = Field(ge=0)
    status: CertificationStatusName
    publicly_listed: bool


class _HoldingsPage(BaseModel):
    certifications: list[_Holding]
    next: UUID | None


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
        instrumentation: Instrumentation | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._signer = signer
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._exchange = AuthorisedExchange(
            http,
            self._base_url,
            tokens,
            clock=self._clock,
            timeout=timeout,
            gate=gate,
            instrumentation=instrumentation,
        )

    async def upsert_certification(self, body: CertificationUpsert) -> DeliveryReceipt:
        """PUT one certification's state; raises a ``DynamicsError`` unless the portal answered 2xx."""
        path = CERTIFICATION_PATH.format(certification_id=body.certification.id)
        return await self._change("PUT", path, body.event_id, encode_body(body))

    async def delete_certification(self, request: CertificationDelete) -> DeliveryReceipt:
        """DELETE one certification (no body; signed over an empty one). 2xx or 404 is done."""
        path = CERTIFICATION_PATH.format(certification_id=request.certification_id)
        return await self._change("DELETE", path, request.event_id, b"", done_if_absent=True)

    async def holdings(self, *, page_size: int = 500) -> AsyncIterator[PortalHolding]:
        """``GET /api/v1/certifications?after=…&limit=…``, following ``next`` until it is null."""
        after: UUID | None = None
        while True:
            query = f"?limit={page_size}" + (f"&after={after}" if after is not None else "")
            page = parse_body(_HoldingsPage, await self._exchange.request("GET", CERTIFICATIONS_PATH + query))
            for held in page.certifications:
                yield PortalHolding(held.id, held.version, held.status, held.publicly_listed)
            if page.next is None:
                return
            after = page.next

    async def check_contract(self) -> ContractCheck:
        """``GET /api/v1/contract``: is contract v1 among the versions the portal accepts?"""
        accepted = await self.contract_versions()
        listed = ", ".join(f"v{version}" for version in accepted) or "none"
        if CONTRACT_VERSION in accepted:
            return ContractCheck(
                self._base_url, True, f"accepts contract v{CONTRACT_VERSION} (accepted: {listed})"
            )
        problem = (
            f"accepts {listed}, but certsync sends v{CONTRACT_VERSION}: every delivery will be refused"
            " and queued for investigation"
        )
        return ContractCheck(self._base_url, False, f"CONTRACT MISMATCH: {problem}", (problem,))

    async def _change(
        self, method: str, path: str, event_id: UUID, content: bytes, *, done_if_absent: bool = False
    ) -> DeliveryReceipt:
        started = self._clock.now()
        key = str(event_id)
        headers = {"Idempotency-Key": key}
        if content:
            headers["Content-Type"] = "application/json"
        if self._signer is not None:
            # Signed once over the exact bytes sent: a retry after 401 resends the same signed message.
            headers |= self._signer.headers(key, content, self._clock.now())
        response = await self._exchange.request(
            method,
            path,
            headers=headers,
            content=content or None,
            event_id=key,
            done_if_absent=done_if_absent,
        )
        elapsed = (self._clock.now() - started).total_seconds()
        return DeliveryReceipt(status=response.status_code, elapsed_seconds=elapsed)

    async def probe(self) -> None:
        """``GET /api/v1/contract``: the portal is up and takes our token."""
        await self._exchange.request("GET", CONTRACT_PATH)

    async def contract_versions(self) -> tuple[int, ...]:
        """The contract versions the portal accepts now (``GET /api/v1/contract``)."""
        response = await self._exchange.request("GET", CONTRACT_PATH)
        return tuple(parse_body(_ContractVersions, response).contract_versions)

    async def public_listing(self) -> frozenset[UUID]:
        """The peer mentors the portal lists publicly now (``GET /api/v1/public-listing``)."""
        response = await self._exchange.request("GET", PUBLIC_LISTING_PATH)
        return frozenset(parse_body(_PublicListing, response).peer_mentor_ids)


def encode_body(body: CertificationUpsert) -> bytes:
    """The request body's bytes, serialised once: what is signed is exactly what is sent."""
    return json.dumps(body.to_json_dict(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
