"""What can go wrong talking to the portal, classified once (``classify_response`` in the client).

::

    DynamicsError
    ├── TransientDynamicsError      408, 429, 5xx, timeouts, connection errors: retried
    │   └── RateLimitedError        429 (carries Retry-After); pauses all sending
    ├── PermanentDynamicsError      any other 4xx: never retried, queued as requires_investigation
    │   └── ContractMismatchError   the portal does not accept our contract version
    └── AuthenticationError         401 after one token refresh, or the token endpoint refused us

``CircuitOpenError`` (raised without any HTTP call while the circuit is open) lives with the breaker
in ``certsync.resilience``: it is not a portal error.
"""

from __future__ import annotations

from certsync.errors import CertsyncError


class DynamicsError(CertsyncError):
    """Base of every portal failure. ``status`` is the HTTP status when there was a response."""

    http_status = 502

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status

    def for_operator(self) -> str:
        return f"Dynamics portal: {self.reason}"


class TransientDynamicsError(DynamicsError):
    """Worth retrying: the portal or the network may recover. ``retry_after`` in seconds, if sent."""

    def __init__(self, reason: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(reason, status=status)
        self.retry_after = retry_after


class RateLimitedError(TransientDynamicsError):
    """429 Too Many Requests (Dataverse service-protection limits)."""


class PermanentDynamicsError(DynamicsError):
    """The portal refused the request as invalid; resending the same request cannot succeed."""


class ContractMismatchError(PermanentDynamicsError):
    """The portal no longer accepts the contract version we send."""


class AuthenticationError(DynamicsError):
    """Credentials were refused even after fetching a fresh token."""
