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
from certsync.resilience.retry import RetryPolicy

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
        self._gate = gate if gate is not None else SendGate(clock, sleep)

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
        """Send one upsert through the retry policy and breaker; record it in ``sink`` if it fails.

        ``when_open="hold"`` (the worker): if the circuit is open before the first call, return HELD so
        the event waits in the outbox. ``"queue"``: record it as pending instead.
        """
        failures = sink if sink is not None else self._failures
        bound = log.bind(
            operation=operation_type,
            event_id=str(request.event_id),
            certification_id=str(request.certification.id),
            version=request.certification.version,
        )
        attempts = 0
        last: DynamicsError | None = None
        reason = "not attempted"
        for retry_number in range(self._policy.max_attempts):
            if retry_number > 0:
                abandoned = await self._wait_before_retry(retry_number, last, reason, bound)
                if abandoned is not None:
                    reason = abandoned
                    break
            await self._gate.wait()
            try:
                await self._breaker.before_call()
            except CircuitOpenError as exc:
                bound.info("circuit_open_call_refused", attempts=attempts, retry_at=exc.retry_at.isoformat())
                if attempts == 0:
                    if when_open == "hold":
                        return DeliveryOutcome(Outcome.HELD, 0, reason="circuit open")
                    reason = "circuit open: not attempted"
                else:
                    reason = f"circuit opened after {attempts} attempt(s); last: {reason}"
                break
            attempts += 1
            started = self._clock.now()
            try:
                receipt = await self._client.upsert_certification(request)
            except PermanentDynamicsError as exc:
                # The portal answered, so it is healthy: a refusal of this request is not an outage.
                await self._breaker.record_success()
                self._log_attempt(bound, attempts, started, error=exc)
                return await self._record(
                    failures,
                    request,
                    operation_type,
                    reason=exc.reason,
                    attempts=attempts,
                    status="requires_investigation",
                )
            except RateLimitedError as exc:
                # A 429 is the portal healthy and asking us to slow down: everything pauses for its
                # Retry-After (SendGate); it is not an outage, so it does not count toward opening the
                # circuit (three 429s would otherwise stop all delivery for a whole cool-down).
                last, reason = exc, exc.reason
                self._log_attempt(bound, attempts, started, error=exc)
                self._gate.pause_for(exc.retry_after or self._policy.base_delay, reason=exc.reason)
                continue
            except (TransientDynamicsError, AuthenticationError) as exc:
                last, reason = exc, exc.reason
                transition = await self._breaker.record_failure(exc.reason)
                self._log_attempt(bound, attempts, started, error=exc)
                if transition is not None and transition.new is CircuitState.OPEN:
                    # This failure opened the circuit: no retry can go before the cool-down ends.
                    reason = f"circuit opened after {attempts} attempt(s); last: {reason}"
                    break
                continue
            await self._breaker.record_success()
            self._log_attempt(bound, attempts, started, status=receipt.status)
            return DeliveryOutcome(Outcome.DELIVERED, attempts)
        else:
            reason = f"retries exhausted after {attempts} attempt(s); last: {reason}"
        return await self._record(
            failures, request, operation_type, reason=reason, attempts=attempts, status="pending"
        )

    async def _wait_before_retry(
        self,
        retry_number: int,
        last: DynamicsError | None,
        reason: str,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> str | None:
        """Sleep the policy's delay (or the portal's Retry-After); the reason to give up instead, if any."""
        retry_after = last.retry_after if isinstance(last, TransientDynamicsError) else None
        delay = self._policy.delay_before_retry(retry_number, retry_after)
        if delay is None:
            cap = self._policy.max_retry_after
            bound.warning("retry_abandoned_retry_after_too_long", retry_after=retry_after)
            return f"{reason}; Retry-After {retry_after:.0f}s exceeds the {cap:.0f}s cap"
        bound.info("retry_scheduled", retry=retry_number, delay=delay, after=reason)
        await self._sleep(delay)
        return None

    async def _record(
        self,
        sink: FailureSink,
        request: CertificationUpsert,
        operation_type: str,
        *,
        reason: str,
        attempts: int,
        status: Literal["pending", "requires_investigation"],
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

    def _log_attempt(
        self,
        bound: structlog.typing.FilteringBoundLogger,
        attempt: int,
        started: datetime,
        *,
        status: int | None = None,
        error: DynamicsError | None = None,
    ) -> None:
        duration_ms = round((self._clock.now() - started).total_seconds() * 1000, 1)
        if error is None:
            bound.info(
                "dynamics_attempt",
                attempt=attempt,
                outcome="delivered",
                status=status,
                duration_ms=duration_ms,
            )
        else:
            bound.warning(
                "dynamics_attempt",
                attempt=attempt,
                outcome=type(error).__name__,
                status=error.status,
                reason=error.reason,
                duration_ms=duration_ms,
            )
