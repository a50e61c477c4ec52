"""HLFDynamicsSyncService: delivers one certification change to Dynamics (its current state, or its
removal), or records why it could not.

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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import partial
from typing import Literal, Protocol, runtime_checkable
from uuid import UUID

import structlog

from certsync.delivery.attempts import AttemptLog
from certsync.delivery.requests import PortalRequest
from certsync.dynamics.contract import CertificationUpsert
from certsync.dynamics.errors import (
    AuthenticationError,
    DynamicsError,
    PermanentDynamicsError,
    RateLimitedError,
    TransientDynamicsError,
)
from certsync.dynamics.port import CertificationDelete, DeliveryReceipt, Portal
from certsync.resilience.breaker import CircuitOpenError, CircuitState, DynamicsCircuitBreaker
from certsync.resilience.clock import Clock, Sleep
from certsync.resilience.gate import SendGate
from certsync.resilience.instrumentation import AttemptFailed, DeliveryFinished, Instrumentation
from certsync.resilience.retry import GaveUp, RetryLater, RetryLoop, RetryPolicy

log = structlog.get_logger(__name__)


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


@dataclass(frozen=True, slots=True)
class _Operation:
    """One ``deliver`` call's inputs, handed to each step instead of seven arguments."""

    request: PortalRequest
    operation_type: str
    sink: FailureSink
    when_open: Literal["hold", "queue"]
    attempts: AttemptLog | None = None

    def log_fields(self) -> dict[str, object]:
        """What every log line about this delivery carries, built only when there is a line to write."""
        request = self.request
        return {
            "operation": self.operation_type,
            "event_id": str(request.event_id),
            "certification_id": str(request.certification_id),
            "version": None if isinstance(request, CertificationDelete) else request.certification.version,
        }


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One certification of a bulk delivery: its upsert, its operation type, where its failure goes and
    where each failed call that carried it is noted (its history)."""

    request: CertificationUpsert
    operation_type: str
    sink: FailureSink
    attempts: AttemptLog | None = None


@runtime_checkable
class BulkPortal(Portal, Protocol):
    """A portal that takes several upserts in one call, all or nothing (Dataverse's UpsertMultiple)."""

    async def upsert_many(self, bodies: Sequence[CertificationUpsert]) -> DeliveryReceipt: ...


# Consecutive 429s one attempt (a single request or a bulk call) waits out without using a retry,
# before it counts them as one.
_MAX_RATE_LIMIT_PAUSES = 20


class HLFDynamicsSyncService:
    """RetryPolicy × DynamicsCircuitBreaker around the portal; failures go to a FailureSink."""

    def __init__(
        self,
        portal: Portal,
        retry_policy: RetryPolicy,
        breaker: DynamicsCircuitBreaker,
        failures: FailureSink,
        *,
        clock: Clock,
        sleep: Sleep,
        gate: SendGate | None = None,
        instrumentation: Instrumentation | None = None,
    ) -> None:
        self._portal = portal
        self._policy = retry_policy
        self._breaker = breaker
        self._failures = failures
        self._clock = clock
        self._sleep = sleep
        self._instrumentation = instrumentation if instrumentation is not None else Instrumentation()
        self._retries = RetryLoop(retry_policy, sleep, self._instrumentation)
        self._gate = gate if gate is not None else SendGate(clock, sleep)
        # Outcomes and their events are values: one per attempt count, built once, not per delivery.
        self._delivered = tuple(
            DeliveryOutcome(Outcome.DELIVERED, n) for n in range(retry_policy.max_attempts + 1)
        )
        self._delivered_events = tuple(
            DeliveryFinished("delivered", n) for n in range(retry_policy.max_attempts + 1)
        )

    @property
    def breaker(self) -> DynamicsCircuitBreaker:
        return self._breaker

    @property
    def bulk(self) -> bool:
        """Whether the portal takes several upserts in one call (``deliver_bulk``)."""
        return isinstance(self._portal, BulkPortal)

    async def deliver(
        self,
        request: PortalRequest,
        *,
        operation_type: str,
        sink: FailureSink | None = None,
        when_open: Literal["hold", "queue"] = "queue",
        attempts: AttemptLog | None = None,
    ) -> DeliveryOutcome:
        """Send one upsert or delete through the retry loop and breaker; record it in ``sink`` if it fails.

        ``when_open="hold"`` (the worker): if the circuit is open before the first call, return HELD so
        the event waits in the outbox. ``"queue"``: record it as pending instead. ``attempts``: where
        each failed call is noted for the certification's history (the worker's outbox close keeps it).

        A success is not logged here: the client's ``dynamics_request`` line records the exchange (and
        ``certsync.metrics`` counts deliveries from it). Every failed attempt, retry and refusal is.
        """
        operation = _Operation(request, operation_type, sink or self._failures, when_open, attempts)
        result = await self._retries.run(partial(self._attempt, operation), context=operation.log_fields)
        if isinstance(result, GaveUp):
            return await self._record(operation, result.reason, result.attempts)
        return result

    async def deliver_bulk(
        self, items: Sequence[BulkItem], *, when_open: Literal["hold", "queue"] = "queue"
    ) -> list[DeliveryOutcome]:
        """Send several certifications' upserts in one call (``BulkPortal.upsert_many``); an outcome
        per item, in order.

        The call is one operation for the retry loop and the breaker: a transient failure is one failed
        call and one retry schedule for the whole batch; when its retries run out (or the circuit opens)
        every item gets its own ``pending`` record. A 429 pauses all sending and uses up no retry. A
        refusal (4xx) is all or nothing at the portal, so the batch is split in halves, each delivered
        the same way, until the refused items stand alone: only they become ``requires_investigation``
        and every other change is delivered.
        """
        if not isinstance(self._portal, BulkPortal):
            raise TypeError(f"{type(self._portal).__name__} takes no bulk upserts")
        if len(items) == 1:
            [item] = items
            return [
                await self.deliver(
                    item.request,
                    operation_type=item.operation_type,
                    sink=item.sink,
                    when_open=when_open,
                    attempts=item.attempts,
                )
            ]
        operations = [_Operation(i.request, i.operation_type, i.sink, when_open, i.attempts) for i in items]
        result = await self._retries.run(
            partial(self._attempt_bulk, self._portal, items, operations),
            context=lambda: {"operation": "bulk_upsert", "targets": len(operations)},
        )
        if isinstance(result, GaveUp):
            return [await self._record(operation, result.reason, result.attempts) for operation in operations]
        return result

    async def _attempt_bulk(
        self,
        portal: BulkPortal,
        items: Sequence[BulkItem],
        operations: list[_Operation],
        number: int,
        last: RetryLater | None,
    ) -> list[DeliveryOutcome] | RetryLater:
        for _pause in range(_MAX_RATE_LIMIT_PAUSES):
            await self._gate.wait()
            try:
                await self._breaker.before_call()
            except CircuitOpenError as exc:
                return await self._bulk_refused_by_circuit(operations, exc, made=number - 1, last=last)
            started = self._clock.now()
            try:
                await portal.upsert_many([item.request for item in items])
            except RateLimitedError as exc:
                self._log_failed_bulk(operations, number, started, exc)
                self._gate.pause_for(exc.retry_after or self._policy.base_delay, reason=exc.reason)
                continue  # a pause, not a failure: the same attempt goes again once the gate opens
            except PermanentDynamicsError as exc:
                await self._breaker.record_success()
                self._log_failed_bulk(operations, number, started, exc)
                return await self._split(items, exc, operations[0].when_open)
            except (TransientDynamicsError, AuthenticationError) as exc:
                transition = await self._breaker.record_failure(exc.reason)
                self._log_failed_bulk(operations, number, started, exc)
                if transition is not None and transition.new is CircuitState.OPEN:
                    why = f"circuit opened after {number} attempt(s); last: {exc.reason}"
                    return [await self._record(operation, why, number) for operation in operations]
                retry_after = exc.retry_after if isinstance(exc, TransientDynamicsError) else None
                return RetryLater(exc.reason, retry_after)
            await self._breaker.record_success()
            for _ in operations:
                self._instrumentation.emit(self._delivered_events[number])
            return [self._delivered[number]] * len(operations)
        return RetryLater(f"still rate limited after {_MAX_RATE_LIMIT_PAUSES} pauses")

    async def _split(
        self, items: Sequence[BulkItem], refusal: DynamicsError, when_open: Literal["hold", "queue"]
    ) -> list[DeliveryOutcome]:
        """The portal refused the batch whole: deliver each half on its own, down to single items."""
        middle = len(items) // 2
        log.info("bulk_refused_split", targets=len(items), reason=refusal.reason)
        return [
            *await self.deliver_bulk(items[:middle], when_open=when_open),
            *await self.deliver_bulk(items[middle:], when_open=when_open),
        ]

    async def _bulk_refused_by_circuit(
        self, operations: list[_Operation], exc: CircuitOpenError, *, made: int, last: RetryLater | None
    ) -> list[DeliveryOutcome]:
        return [await self._refused_by_circuit(op, exc, made=made, last=last) for op in operations]

    def _log_failed_bulk(
        self, operations: Sequence[_Operation], attempt: int, started: datetime, error: DynamicsError
    ) -> None:
        now = self._clock.now()
        duration_ms = round((now - started).total_seconds() * 1000, 1)
        self._instrumentation.emit(AttemptFailed(type(error).__name__))
        for operation in operations:
            if operation.attempts is not None:
                operation.attempts.failed(now, error, targets=len(operations))
        log.warning(
            "dynamics_bulk_attempt",
            attempt=attempt,
            targets=len(operations),
            outcome=type(error).__name__,
            status=error.status,
            reason=error.reason,
            duration_ms=duration_ms,
        )

    async def probe(self) -> bool | None:
        """A half-open circuit's probe when nothing waits to be sent: one cheap authorised read
        (``Portal.probe``) through the breaker, so the circuit heals by itself instead of staying open
        until the next change. True: it answered and the circuit closed; False: it failed (the circuit
        reopens for another cool-down); None: the circuit allowed no call (still cooling down, or
        another worker holds the probe)."""
        try:
            await self._breaker.before_call()
        except CircuitOpenError:
            return None
        try:
            await self._gate.wait()
            await self._portal.probe()
        except RateLimitedError as exc:
            # Up, but asking us to slow down: not an outage, and the probe counts as answered.
            self._gate.pause_for(exc.retry_after or self._policy.base_delay, reason=exc.reason)
        except (TransientDynamicsError, AuthenticationError) as exc:
            await self._breaker.record_failure(exc.reason)
            log.warning("circuit_probe_failed", reason=exc.reason, status=exc.status)
            return False
        except PermanentDynamicsError as exc:
            # An answer, just not a 2xx (a portal without the read): it is up.
            log.info("circuit_probe_refused", reason=exc.reason, status=exc.status)
        await self._breaker.record_success()
        log.info("circuit_probe_succeeded")
        return True

    async def _attempt(
        self, operation: _Operation, number: int, last: RetryLater | None
    ) -> DeliveryOutcome | RetryLater:
        """Attempt ``number``: a result ends the loop; ``RetryLater`` asks the loop for another."""
        request = operation.request
        for _pause in range(_MAX_RATE_LIMIT_PAUSES):
            await self._gate.wait()
            try:
                await self._breaker.before_call()
            except CircuitOpenError as exc:
                return await self._refused_by_circuit(operation, exc, made=number - 1, last=last)
            started = self._clock.now()
            try:
                if isinstance(request, CertificationDelete):
                    await self._portal.delete_certification(request)
                else:
                    await self._portal.upsert_certification(request)
            except PermanentDynamicsError as exc:
                # The portal answered, so it is healthy: a refusal of this request is not an outage.
                await self._breaker.record_success()
                self._log_failed_attempt(operation, number, started, exc)
                return await self._record(operation, exc.reason, number, "requires_investigation")
            except RateLimitedError as exc:
                # A 429 is the portal healthy and asking us to slow down: everything pauses for its
                # Retry-After (SendGate). It is not an outage, so it does not count toward opening the
                # circuit (three 429s would otherwise stop all delivery for a whole cool-down), and not
                # a failure, so it uses up no retry: the same attempt goes again once the gate opens,
                # as a bulk call's does (a burst of 429s would otherwise queue single changes).
                self._log_failed_attempt(operation, number, started, exc)
                self._gate.pause_for(exc.retry_after or self._policy.base_delay, reason=exc.reason)
                continue
            except (TransientDynamicsError, AuthenticationError) as exc:
                return await self._failed(operation, number, started, exc)
            await self._breaker.record_success()
            self._instrumentation.emit(self._delivered_events[number])
            return self._delivered[number]
        return RetryLater(f"still rate limited after {_MAX_RATE_LIMIT_PAUSES} pauses")

    async def _failed(
        self,
        operation: _Operation,
        number: int,
        started: datetime,
        exc: TransientDynamicsError | AuthenticationError,
    ) -> DeliveryOutcome | RetryLater:
        """A call that failed: it counts toward the circuit; retry, unless this failure opened it."""
        transition = await self._breaker.record_failure(exc.reason)
        self._log_failed_attempt(operation, number, started, exc)
        if transition is not None and transition.new is CircuitState.OPEN:
            # This failure opened the circuit: no retry can go before the cool-down ends.
            why = f"circuit opened after {number} attempt(s); last: {exc.reason}"
            return await self._record(operation, why, number)
        retry_after = exc.retry_after if isinstance(exc, TransientDynamicsError) else None
        return RetryLater(exc.reason, retry_after)

    async def _refused_by_circuit(
        self, operation: _Operation, exc: CircuitOpenError, *, made: int, last: RetryLater | None
    ) -> DeliveryOutcome:
        """The circuit refused attempt ``made + 1``: hold the operation, or record why it was not sent."""
        log.info(
            "circuit_open_call_refused",
            attempts=made,
            retry_at=exc.retry_at.isoformat(),
            **operation.log_fields(),
        )
        if last is None:
            if operation.when_open == "hold":
                return _HELD
            why = "circuit open: not attempted"
        else:
            why = f"circuit opened after {made} attempt(s); last: {last.reason}"
        return await self._record(operation, why, made)

    async def _record(
        self,
        operation: _Operation,
        reason: str,
        attempts: int,
        status: Literal["pending", "requires_investigation"] = "pending",
    ) -> DeliveryOutcome:
        request = operation.request
        await operation.sink.record(
            DeliveryFailure(
                operation_type=operation.operation_type,
                certification_id=request.certification_id,
                event_id=request.event_id,
                payload=request.to_json_dict(),
                failure_reason=reason,
                attempt_count=attempts,
                status=status,
            )
        )
        self._instrumentation.emit(DeliveryFinished(status, attempts))
        log.warning(
            "delivery_queued",
            operation=operation.operation_type,
            event_id=str(request.event_id),
            certification_id=str(request.certification_id),
            queue_status=status,
            attempts=attempts,
            reason=reason,
        )
        return DeliveryOutcome(Outcome.QUEUED, attempts, queue_status=status, reason=reason)

    def _log_failed_attempt(
        self, operation: _Operation, attempt: int, started: datetime, error: DynamicsError
    ) -> None:
        duration_ms = round((self._clock.now() - started).total_seconds() * 1000, 1)
        self._instrumentation.emit(AttemptFailed(type(error).__name__))
        if operation.attempts is not None:
            operation.attempts.failed(self._clock.now(), error)
        log.warning(
            "dynamics_attempt",
            attempt=attempt,
            outcome=type(error).__name__,
            status=error.status,
            reason=error.reason,
            duration_ms=duration_ms,
            **operation.log_fields(),
        )


_HELD = DeliveryOutcome(Outcome.HELD, 0, reason="circuit open")
