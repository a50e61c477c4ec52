"""A certification as the database holds it now, which is what the portal is sent (``delivery.requests``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["GONE", "CurrentState"]


@dataclass(frozen=True, slots=True)
class CurrentState:
    """Its sync state (None when the certification is gone) and whether its mentor is in the portal's
    organisation scope (always, when no organisation is set)."""

    state: dict[str, Any] | None
    in_scope: bool


GONE = CurrentState(None, False)
