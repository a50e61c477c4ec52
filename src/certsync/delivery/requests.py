"""What is sent for a certification: the one place an outbox event or a replay becomes a portal request,
so the worker and the replay cannot decide differently.

The decision is made when the request is sent, from the database as it is then (``CurrentState``):

==========================================  ===========================================================
the certification is gone                   DELETE (deleted, or its mentor erased)
its mentor is in the portal's organisation  PUT of its current state (``publicly_listed`` as of today)
outside the organisation, may be listed     DELETE (a membership was lost, a repair, a replay)
outside the organisation, never listed      nothing is sent: the portal is not told about other
                                            organisations' mentors at all
==========================================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from certsync.dynamics.contract import CertificationState, CertificationUpsert
from certsync.dynamics.port import CertificationDelete
from certsync.store.current_state import CurrentState

__all__ = ["PortalRequest", "UndeliverableState", "request_for", "upsert_for"]

PortalRequest = CertificationUpsert | CertificationDelete


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


def request_for(
    event_id: UUID,
    occurred_at: datetime,
    certification_id: UUID,
    current: CurrentState,
    *,
    may_unlist: bool,
    today: date,
) -> PortalRequest | None:
    """What to send for ``certification_id`` now, or None when the portal must not hear of it.

    ``may_unlist``: the change may have taken it off this portal (a delete, a membership change, a
    repair; a replay always), so outside the organisation scope it is deleted rather than ignored.
    """
    if current.state is not None and current.in_scope:
        return upsert_for(event_id, occurred_at, current.state, today)
    if current.state is None or may_unlist:
        return CertificationDelete(event_id, certification_id, occurred_at)
    return None
