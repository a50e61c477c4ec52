"""Contract v1 with the Dynamics portal: the request body of ``PUT /api/v1/certifications/{id}``.

The document is ``docs/contract-v1.md``; the JSON Schema ``contract_v1.schema.json`` beside this file
is what the sandbox validates against and what tests check every body against.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from functools import cache
from importlib import resources
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_serializer

CONTRACT_VERSION = 1

CertificationStatusName = Literal["active", "suspended", "expired", "revoked"]


class CertificationState(BaseModel):
    """A certification's current state as the portal receives it (no personal data)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: UUID
    peer_mentor_id: UUID
    certification_type: str = Field(min_length=1, max_length=100)
    status: CertificationStatusName
    valid_from: date
    valid_until: date
    version: int = Field(ge=1)


class CertificationUpsert(BaseModel):
    """The whole request body; ``event_id`` is also the ``Idempotency-Key`` and ``webhook-id``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    contract_version: Literal[1] = 1
    event_id: UUID
    occurred_at: datetime
    certification: CertificationState
    publicly_listed: bool

    @classmethod
    def for_state(
        cls, event_id: UUID, occurred_at: datetime, state: CertificationState, today: date
    ) -> CertificationUpsert:
        return cls(
            event_id=event_id,
            occurred_at=occurred_at,
            certification=state,
            publicly_listed=is_publicly_listed(state.status, state.valid_until, today),
        )

    @property
    def certification_id(self) -> UUID:
        return self.certification.id

    @field_serializer("occurred_at")
    def _utc_z(self, value: datetime) -> str:
        if value.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")

    def to_json_dict(self) -> dict[str, Any]:
        """The body exactly as sent: ISO dates, UTC timestamp ending in ``Z``."""
        return self.model_dump(mode="json")


def is_publicly_listed(status: str, valid_until: date, today: date) -> bool:
    """The portal lists a mentor's certification exactly when it is active and not past its end date."""
    return status == "active" and valid_until >= today


@cache
def contract_schema() -> dict[str, Any]:
    """The JSON Schema of contract v1 (draft 2020-12)."""
    text = resources.files("certsync.dynamics").joinpath("contract_v1.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
