"""Manual replay of the retry queue: the certification's CURRENT state (or its removal, when it is gone or
no longer this portal's: ``delivery.requests``), through the same retry policy and circuit breaker as the
worker, with the outcome recorded on the entry (who, when, how often).

A stale payload is never resent: between the failure and the replay a coordinator may have renewed
or revoked the certification, and the portal must learn what is true now.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo

import structlog

from certsync.delivery.requests import UndeliverableState, request_for
from certsync.delivery.sinks import ReplaySink
from certsync.delivery.sync_service import HLFDynamicsSyncService, Outcome
from certsync.resilience.clock import Clock
from certsync.store.retry_queue import RetryQueue

log = structlog.get_logger(__name__)

ReplayStatus = Literal["replayed", "pending", "requires_investigation", "skipped"]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    entry_id: int
    status: ReplayStatus
    attempts: int
    reason: str | None = None


@dataclass(slots=True)
class ReplaySummary:
    results: dict[str, int] = field(default_factory=dict)
    stopped_because: str | None = None

    def add(self, result: ReplayResult) -> None:
        self.results[result.status] = self.results.get(result.status, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.results.values())

    @property
    def failed(self) -> int:
        return self.results.get("pending", 0) + self.results.get("requires_investigation", 0)


class ReplayService:
    def __init__(
        self,
        queue: RetryQueue,
        service: HLFDynamicsSyncService,
        clock: Clock,
        zone: ZoneInfo,
        *,
        organisation_id: UUID | None = None,
    ) -> None:
        self._queue = queue
        self._service = service
        self._clock = clock
        self._zone = zone
        self._organisation_id = organisation_id

    async def replay(self, entry_id: int, *, by: str) -> ReplayResult:
        """Replay one entry (NotFound if there is none). Replayed or discarded entries are skipped."""
        entry = await self._queue.get(entry_id)
        if not entry.actionable:
            return ReplayResult(entry_id, "skipped", 0, f"already {entry.status}")
        certification_id = entry.certification_id
        if certification_id is None:
            return await self._unreplayable(entry_id, by, "the entry names no certification")
        current = await self._queue.current_state(certification_id, organisation_id=self._organisation_id)
        now = self._clock.now()
        try:
            # A new request: what it carries may differ from the failed one. A replay may always
            # unlist: whatever failed, the portal must end up with what the database says now.
            request = request_for(
                uuid.uuid4(),
                now,
                certification_id,
                current,
                may_unlist=True,
                today=now.astimezone(self._zone).date(),
            )
        except UndeliverableState as exc:
            return await self._unreplayable(entry_id, by, str(exc))
        assert request is not None, "a request that may unlist is always a PUT or a DELETE"
        outcome = await self._service.deliver(
            request,
            operation_type=entry.operation_type,
            sink=ReplaySink(self._queue, entry_id, by, self._clock),
            when_open="queue",
        )
        if outcome.outcome is Outcome.DELIVERED:
            await self._queue.record_replay_outcome(
                entry_id,
                status="replayed",
                failure_reason=None,
                attempts=outcome.attempts,
                by=by,
                now=self._clock.now(),
                payload_json=request.to_json_dict(),
            )
            log.info("replay_delivered", entry_id=entry_id, attempts=outcome.attempts, by_operator=True)
            return ReplayResult(entry_id, "replayed", outcome.attempts)
        status: ReplayStatus = outcome.queue_status or "pending"
        return ReplayResult(entry_id, status, outcome.attempts, outcome.reason)

    async def replay_all(
        self,
        *,
        status: str | None,
        by: str,
        on_result: Callable[[ReplayResult], None] | None = None,
    ) -> ReplaySummary:
        """Replay every entry with ``status`` (default: pending), streamed a page at a time.

        Stops when the circuit is open: every further replay would fail at once without a request and
        only raise its entry's replay count. What was not replayed stays as it was.
        """
        summary = ReplaySummary()
        check_circuit = True  # before the first replay, then only after one that failed
        async for row in self._queue.iterate(status=status or "pending"):
            if check_circuit and (retry_at := await self._service.breaker.open_until()) is not None:
                summary.stopped_because = (
                    f"the circuit is open until {retry_at.isoformat(timespec='seconds')}"
                )
                log.warning("replay_stopped_circuit_open", retry_at=retry_at.isoformat())
                break
            result = await self.replay(row.id, by=by)
            check_circuit = result.status != "replayed"
            summary.add(result)
            if on_result is not None:
                on_result(result)
        return summary

    async def _unreplayable(self, entry_id: int, by: str, reason: str) -> ReplayResult:
        """Nothing can be sent: kept for investigation, its payload left exactly as it was written."""
        await self._queue.record_replay_outcome(
            entry_id,
            status="requires_investigation",
            failure_reason=reason,
            attempts=0,
            by=by,
            now=self._clock.now(),
            payload_json=None,
        )
        log.warning("replay_impossible", entry_id=entry_id, reason=reason)
        return ReplayResult(entry_id, "requires_investigation", 0, reason)
