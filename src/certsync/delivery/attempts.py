"""What one claim's calls to the portal answered, kept for the certification's history.

The sync service notes every failed call here (``AttemptLog.failed``) as it logs it; the outbox close
that ends the claim (delivered, queued or released) appends the notes to the event's ``attempt_log``
in the same statement, so recording attempts costs no round trip of its own. The call that succeeded
is the delivered close itself (its ``closed_at``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from certsync.dynamics.errors import (
    AuthenticationError,
    DynamicsError,
    PermanentDynamicsError,
    RateLimitedError,
    TransientDynamicsError,
)

__all__ = ["AttemptLog", "outcome_of"]


def outcome_of(error: DynamicsError) -> str:
    """The portal's answer in one word: ``refused`` (a permanent 4xx), ``rate_limited`` (429),
    ``unauthorised`` (401 after a fresh token), ``transient`` (5xx, 408, a timeout, no connection)."""
    if isinstance(error, PermanentDynamicsError):
        return "refused"
    if isinstance(error, RateLimitedError):
        return "rate_limited"
    if isinstance(error, AuthenticationError):
        return "unauthorised"
    if isinstance(error, TransientDynamicsError):
        return "transient"
    return "failed"


@dataclass(slots=True)
class AttemptLog:
    """The failed calls of one claim (``claim``: the event's claim number, its ``attempts`` column),
    numbered in the order they were made. A bulk call (Dataverse's UpsertMultiple) is noted in the log
    of every certification it carried, with ``targets``: how many it carried."""

    claim: int | None = None
    entries: list[dict[str, object]] = field(default_factory=list)

    def failed(self, at: datetime, error: DynamicsError, *, targets: int | None = None) -> None:
        entry: dict[str, object] = {
            "claim": self.claim,
            "attempt": len(self.entries) + 1,
            "at": at.isoformat(),
            "outcome": outcome_of(error),
            "status": error.status,
            "reason": error.reason,
        }
        if targets is not None:
            entry["targets"] = targets
        self.entries.append(entry)
