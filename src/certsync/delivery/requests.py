"""What is sent for a stored certification state: the one place an outbox event or a replay becomes a
portal request, so the worker and the replay cannot build it differently."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from certsync.dynamics.contract import CertificationState, CertificationUpsert

__all__ = ["UndeliverableState", "upsert_for"]


class UndeliverableState(ValueError):
    """A stored state that no longer fits the contract: it is kept for investigation, never sent."""

    def __init__(self, problems: str) -> None:
        super().__init__(f"stored state does not fit contract v1: {problems}")
        self.problems = problems


def upsert_for(
    event_id: UUID, occurred_at: datetime, state: Mapping[str, Any], today: date
) -> CertificationUpsert:
    """The upsert of ``state`` as of ``today`` (which decides ``publicly_listed``)."""
    try:
        certification = CertificationState.model_validate(state)
        return CertificationUpsert.for_state(event_id, occurred_at, certification, today)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UndeliverableState(problems) from None
