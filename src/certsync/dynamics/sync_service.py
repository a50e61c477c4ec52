"""HLFDynamicsSyncService: delivers one certification state to Dynamics, or records why it could not.

One operation, one ``for`` loop::

    attempt 1 ── ok ─────────────────────────────────────────────▶ delivered
       │ transient (408/5xx/timeout/connection)       → breaker.record_failure, sleep RetryPolicy delay
       │ 429                                          → pause ALL sending for Retry-After; not an outage
       │ permanent 4xx                                → sink: requires_investigation (no retry)
       │ circuit open before attempt 1                → held (or queued, by the caller's choice)
       │ circuit opens (this or another operation)    → sink: pending ("circuit opened …")
       │ Retry-After beyond the cap                   → sink: pending (no sleep for minutes)
    attempt 4 fails                                   → sink: pending (retries exhausted)

A sink that fails raises: the caller keeps the change (the outbox event stays claimed and is retried
when its lease ends). Nothing is swallowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal, Protocol
from uuid import UUID

import structlog

from certsync.dynamics.client import DeliveryReceipt
from certsync.dynamics.contract import CertificationUpsert
from certsync.dynamics.errors import (
    AuthenticationError,
    DynamicsError,
    PermanentDynamicsError,
    RateLimitedError,
    TransientDynamicsError,
)
from certsync.resilience.breaker import CircuitOpenError, CircuitState, DynamicsCircuitBreaker
from certsync.resilience.clock import Clock, Sleep
from certsync.resilience.gate import SendGate
from certsync.resilience.retry import GaveUp, RetryLater, RetryLoop, RetryPolicy

log = structlog.get_logger(__name__)


class PortalClient(Protocol):
    """What the service needs of the portal (``DynamicsClient`` in production)."""

    async def upsert_certification(self, body: CertificationUpsert) -> DeliveryReceipt: ...


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """What a sink keeps: the full request body, why it failed, and how many calls were made."""

    operation_type: str
    certification_id: UUID
    event_id: UUID
    payload: dict[str, object]
    failure_reason: str
    attempt_count: int
    status: Literal["pending", "requires_investigation"]


class FailureSink(Protocol):
    """Where undeliverable operations go (the retry queue, with or without closing an outbox event)."""

    async def record(self, failure: DeliveryFailure) -> None: ...


class Outcome(StrEnum):
    DELIVERED = "delivered"
    QUEUED = "queued"  # recorded by the sink as pending or requires_investigation
    HELD = "held"  # circuit open before any call: nothing sent, nothing recorded


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    outcome: Outcome
    attempts: int
    queue_status: Literal["pending", "requires_investigation"] | None = None
    reason: str | None = None


class HLFDynamicsSyncService:
    """RetryPolicy × DynamicsCircuitBreaker around the portal client; failures go to a FailureSink."""

    def __init__(
        self,
        client: PortalClient,
        retry_policy: RetryPolicy,
        breaker: DynamicsCircuitBreaker,
        failures: FailureSink,
        *,
        clock: Clock,
        sleep: Sleep,
        gate: SendGate | None = None,
    ) -> None:
        self._client = client
        self._policy = retry_policy
        self._breaker = breaker
        self._failures = failures
        self._clock = clock
        self._sleep = sleep
        self._retries = RetryLoop(retry_policy, sleep)
        self._gate = gate if gate is not None else SendGate(clock, sleep)
        # Outcomes are values: one per attempt count, built once instead of on every delivery.
        self._delivered = tuple(
            DeliveryOutcome(Outcome.DELIVERED, n) for n in range(retry_policy.max_attempts + 1)
        )

    @property
    def breaker(self) -> DynamicsCircuitBreaker:
        return self._breaker

    async def deliver(
        self,
        request: CertificationUpsert,
        *,
        operation_type: str,
        sink: FailureSink | None = None,
        when_open: Literal["hold", "queue"] = "queue",
    ) -> DeliveryOutcome:
        """Send one upsert through the retry loop and breaker; record it in ``sink`` if it fails.

        ``when_open="hold"`` (the worker): if the circuit is open before the first call, return HELD so
        the event waits in the outbox. ``"queue"``: record it as pending instead.

        A success is not logged here: the client's ``dynamics_request`` line records the exchange (and
        ``certsync.metrics`` counts deliveries from it). Every failed attempt, retry and refusal is.
        """
        failures = sink if sink is not None else self._failures

        def fields() -> dict[str, object]:
            return _log_fields(request, operation_type)

        async def attempt(number: int, last: RetryLater | None) -> DeliveryOutcome | RetryLater:
            await self._gate.wait()
            try:
                await self._breaker.before_call()
            except CircuitOpenError as exc:
                return await self._refused(
                    exc,
                    made=number - 1,
                    last=last,
                    when_open=when_open,
                    failures=failures,
                    request=request,
                    operation_type=operation_type,
                )
            started = self._clock.now()
            try:
                await self._client.upsert_certification(request)
            except PermanentDynamicsError as exc:
                # The portal answered, so it is healthy: a refusal of this request is not an outage.
                await self._breaker.record_success()
                self._log_failed_attempt(fields(), number, started, exc)
                return await self._record(
                    failures,
                    request,
                    operation_type,
                    reason=exc.reason,
                    attempts=number,
                    status="requires_investigation",
                )
            except RateLimitedError as exc:
                # A 429 is the portal healthy and asking us to slow down: everything pauses for its
                # Retry-After (SendGate); it is not an outage, so it does not count toward opening the
                # circuit (three 429s would otherwise stop all delivery for a whole cool-down).
                self._log_failed_attempt(fields(), number, started, exc)
                self._gate.pause_for(exc.retry_after or self._policy.base_delay, reason=exc.reason)
                return RetryLater(exc.reason, exc.retry_after)
            except (TransientDynamicsError, AuthenticationError) as exc:
                transition = await self._breaker.record_failure(exc.reason)
                self._log_failed_attempt(fields(), number, started, exc)
                if transition is not None and transition.new is CircuitState.OPEN:
                    # This failure opened the circuit: no retry can go before the cool-down ends.
                    why = f"circuit opened after {number} attempt(s); last: {exc.reason}"
                    return await self._record(failures, request, operation_type, reason=why, attempts=number)
                retry_after = exc.retry_after if isinstance(exc, TransientDynamicsError) else None
                return RetryLater(exc.reason, retry_after)
            await self._breaker.record_success()
            return self._delivered[number]

        result = await self._retries.run(attempt, context=fields)
        if isinstance(result, GaveUp):
            return await self._record(
                failures, request, operation_type, reason=result.reason, attempts=result.attempts
            )
        return result

    async def _refused(
        self,
        exc: CircuitOpenError,
        *,
        made: int,
        last: RetryLater | None,
        when_open: Literal["hold", "queue"],
        failures: FailureSink,
        request: CertificationUpsert,
        operation_type: str,
    ) -> DeliveryOutcome:
        """The circuit refused attempt ``made + 1``: hold the operation, or record why it was not sent."""
        log.info(
            "circuit_open_call_refused",
            attempts=made,
            retry_at=exc.retry_at.isoformat(),
            **_log_fields(request, operation_type),
        )
        if last is None:
            if when_open == "hold":
                return _HELD
            why = "circuit open: not attempted"
        else:
            why = f"circuit opened after {made} attempt(s); last: {last.reason}"
        return await self._record(failures, request, operation_type, reason=why, attempts=made)

    async def _record(
        self,
        sink: FailureSink,
        request: CertificationUpsert,
        operation_type: str,
        *,
        reason: str,
        attempts: int,
        status: Literal["pending", "requires_investigation"] = "pending",
    ) -> DeliveryOutcome:
        await sink.record(
            DeliveryFailure(
                operation_type=operation_type,
                certification_id=request.certification.id,
                event_id=request.event_id,
                payload=request.to_json_dict(),
                failure_reason=reason,
                attempt_count=attempts,
                status=status,
            )
        )
        log.warning(
            "delivery_queued",
            operation=operation_type,
            event_id=str(request.event_id),
            certification_id=str(request.certification.id),
            queue_status=status,
            attempts=attempts,
            reason=reason,
        )
        return DeliveryOutcome(Outcome.QUEUED, attempts, queue_status=status, reason=reason)

    def _log_failed_attempt(
        self, fields: dict[str, object], attempt: int, started: datetime, error: DynamicsError
    ) -> None:
        duration_ms = round((self._clock.now() - started).total_seconds() * 1000, 1)
        log.warning(
            "dynamics_attempt",
            attempt=attempt,
            outcome=type(error).__name__,
            status=error.status,
            reason=error.reason,
            duration_ms=duration_ms,
            **fields,
        )


_HELD = DeliveryOutcome(Outcome.HELD, 0, reason="circuit open")


def _log_fields(request: CertificationUpsert, operation_type: str) -> dict[str, object]:
    """What every log line about one delivery carries, built only when there is a line to write."""
    return {
        "operation": operation_type,
        "event_id": str(request.event_id),
        "certification_id": str(request.certification.id),
        "version": request.certification.version,
    }
