"""The portal port: everything certsync asks of a portal, whichever wire it speaks.

``DynamicsClient`` (contract v1, ``docs/contract-v1.md``) is its first adapter; the composition root
chooses the adapter from ``CERTSYNC_DYNAMICS_API``. Nothing outside ``certsync.dynamics`` knows which
wire is spoken: the delivery services, the worker and the faces see only this protocol and the
``certsync.dynamics.errors`` tree its adapters raise.

An adapter makes exactly one attempt per call (plus one 401 refresh of its token): retries, back-off
and the circuit breaker belong to the delivery service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

from certsync.dynamics.contract import CertificationStatusName, CertificationUpsert

__all__ = [
    "CertificationDelete",
    "ContractCheck",
    "DeliveryReceipt",
    "Portal",
    "PortalHolding",
]


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """The portal accepted a change: its status and how long the whole call took on the clock."""

    status: int
    elapsed_seconds: float


@dataclass(frozen=True, slots=True)
class CertificationDelete:
    """Remove one certification from the portal. ``event_id`` is the request's idempotency key."""

    event_id: UUID
    certification_id: UUID
    occurred_at: datetime

    def to_json_dict(self) -> dict[str, Any]:
        """What the retry queue keeps of it: ids and a time, nothing about the person."""
        return {
            "operation": "delete",
            "event_id": str(self.event_id),
            "certification_id": str(self.certification_id),
            "occurred_at": self.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }


@dataclass(frozen=True, slots=True)
class PortalHolding:
    """What the portal holds for one certification (what reconcile compares with the database)."""

    certification_id: UUID
    version: int
    status: CertificationStatusName
    publicly_listed: bool


@dataclass(frozen=True, slots=True)
class ContractCheck:
    """Whether the portal accepts what certsync sends. ``problems``: each reason it does not."""

    endpoint: str
    accepted: bool
    summary: str
    problems: tuple[str, ...] = ()


class Portal(Protocol):
    """One portal, one wire. Each method raises a ``DynamicsError`` unless the portal agreed."""

    async def upsert_certification(self, body: CertificationUpsert) -> DeliveryReceipt:
        """Send one certification's current state (idempotent; the portal keeps the highest version)."""
        ...

    async def delete_certification(self, request: CertificationDelete) -> DeliveryReceipt:
        """Remove one certification; one the portal does not hold counts as removed."""
        ...

    def holdings(self, *, page_size: int = 500) -> AsyncIterator[PortalHolding]:
        """Every certification the portal holds, ordered by id, read a page at a time."""
        ...

    async def check_contract(self) -> ContractCheck:
        """Ask the portal whether it accepts what certsync sends (``certsync contract check``)."""
        ...

    async def probe(self) -> None:
        """The cheapest authorised read the portal answers (a half-open circuit's probe when nothing
        waits to be sent); raises a ``DynamicsError`` unless it answered 2xx."""
        ...
