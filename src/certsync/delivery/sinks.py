"""Where a delivery that could not be made is kept: the failure sinks the sync service records into.

Each keeps the failure in ``dynamics_sync_retry_queue`` and differs only in what it closes with it:

* ``OutboxFailureSink`` (the worker): closes the outbox event and writes the row in one transaction.
* ``ReplaySink`` (a replay): updates the entry being replayed instead of adding one.
* ``RetryQueueSink`` (a delivery with no outbox event): a new row.
"""

from __future__ import annotations

from uuid import UUID

from certsync.delivery.attempts import AttemptLog
from certsync.delivery.sync_service import DeliveryFailure
from certsync.resilience.clock import Clock
from certsync.store.outbox import ClaimedEvent, Outbox
from certsync.store.retry_queue import NewRetryEntry, RetryQueue

__all__ = ["OutboxFailureSink", "ReplaySink", "RetryQueueSink", "retry_entry_for"]


def retry_entry_for(failure: DeliveryFailure, event_id: UUID | None) -> NewRetryEntry:
    """The retry-queue row that keeps a failed delivery (``event_id``: the outbox event, if any)."""
    return NewRetryEntry(
        operation_type=failure.operation_type,
        certification_id=failure.certification_id,
        event_id=event_id,
        payload_json=dict(failure.payload),
        failure_reason=failure.failure_reason,
        attempt_count=failure.attempt_count,
        status=failure.status,
    )


class OutboxFailureSink:
    """Records a failed delivery by closing its outbox event and writing the retry row together."""

    def __init__(self, outbox: Outbox, event: ClaimedEvent, clock: Clock) -> None:
        self._outbox = outbox
        self._event = event
        self._clock = clock
        self.lost_claim = False
        # The claim's failed calls, kept with whichever close ends it (history).
        self.attempts = AttemptLog(claim=event.attempts)

    async def record(self, failure: DeliveryFailure) -> None:
        entry = retry_entry_for(failure, self._event.id)
        queued = await self._outbox.mark_queued(
            self._event, self._clock.now(), entry, attempt_log=self.attempts.entries
        )
        if queued is None:
            # Our claim was rescued by another worker while we were retrying: theirs decides.
            self.lost_claim = True


class ReplaySink:
    """A failed replay updates its own entry (status, reason, attempts, history) instead of adding one."""

    def __init__(self, queue: RetryQueue, entry_id: int, by: str, clock: Clock) -> None:
        self._queue = queue
        self._entry_id = entry_id
        self._by = by
        self._clock = clock

    async def record(self, failure: DeliveryFailure) -> None:
        await self._queue.record_replay_outcome(
            self._entry_id,
            status=failure.status,
            failure_reason=failure.failure_reason,
            attempts=failure.attempt_count,
            by=self._by,
            now=self._clock.now(),
            payload_json=dict(failure.payload),
        )


class RetryQueueSink:
    """The plain failure sink: a new retry-queue row (a delivery made outside the worker)."""

    def __init__(self, queue: RetryQueue, clock: Clock) -> None:
        self._queue = queue
        self._clock = clock

    async def record(self, failure: DeliveryFailure) -> None:
        await self._queue.add(retry_entry_for(failure, None), self._clock.now())
