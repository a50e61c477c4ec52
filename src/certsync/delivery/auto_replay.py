"""Automatic replay: the worker re-sends ``pending`` retry-queue entries itself (``CERTSYNC_AUTO_REPLAY``).

A pending entry (its retries ran out, or the circuit opened while it was retried) is replayed through
``ReplayService.replay`` — its certification's current state, the same retry policy and breaker as
a manual replay, the outcome recorded on the entry — by ``auto-replay`` instead of an operator:

    queued pending ──▶ replay 1 as soon as the circuit lets a call through (closed, or half-open:
                       │                                  the replay is then the probe)
                       ├ fails ──▶ replay 2 one minute later, 3 five minutes, 4 fifteen, 5 sixty
                       └ after the fifth failed replay: next_auto_replay_at = null, it waits for a person

``requires_investigation`` entries always wait for a person (their schedule is null where they are
written). A replay refused by the open circuit before any call made (another worker opened it a
moment ago) uses up no automatic replay: it is due again when the circuit may let a call through.
The claim (``RetryQueue.claim_auto_replays``) leases each entry to one worker; the lease is the
schedule column itself, so a worker that dies mid-replay leaves its entry due once the lease passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import structlog

from certsync.delivery.replay import ReplayResult, ReplayService
from certsync.resilience.breaker import CircuitState, DynamicsCircuitBreaker
from certsync.resilience.clock import Clock
from certsync.resilience.instrumentation import AutoReplayFinished, Instrumentation
from certsync.store.retry_queue import MAX_AUTO_REPLAYS, AutoReplayClaim, RetryQueue

__all__ = [
    "AUTO_REPLAY_BY",
    "AutoReplayOutcome",
    "AutoReplaySchedule",
    "AutoReplayer",
]

log = structlog.get_logger(__name__)

AUTO_REPLAY_BY = "auto-replay"
"""The replayer's name in ``last_replayed_by`` and the failure history (operators' names differ)."""

AutoReplayOutcome = Literal["replayed", "failed", "exhausted", "requires_investigation", "refused", "skipped"]
"""``failed``: still pending, due again later; ``exhausted``: still pending, now waits for a person;
``refused``: the open circuit refused it before any call (no replay used up); ``skipped``: the entry
was no longer pending (replayed or discarded meanwhile)."""


@dataclass(frozen=True, slots=True)
class AutoReplaySchedule:
    """When the next automatic replay is due after a failed one: ``delays[n - 1]`` seconds after the
    n-th. The first replay is due when the entry is queued; ``len(delays) + 1`` replays in all."""

    delays: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0)

    def __post_init__(self) -> None:
        if len(self.delays) + 1 != MAX_AUTO_REPLAYS:
            raise ValueError(f"{MAX_AUTO_REPLAYS} automatic replays need {MAX_AUTO_REPLAYS - 1} delays")

    @property
    def max_replays(self) -> int:
        return len(self.delays) + 1

    def after_failure(self, replays_made: int, now: datetime) -> datetime | None:
        """Due time after the ``replays_made``-th automatic replay failed; None: wait for a person."""
        if replays_made >= self.max_replays:
            return None
        return now + timedelta(seconds=self.delays[replays_made - 1])


class AutoReplayer:
    """Claims due pending entries and replays each; any number of workers may run one."""

    def __init__(
        self,
        queue: RetryQueue,
        replays: ReplayService,
        breaker: DynamicsCircuitBreaker,
        clock: Clock,
        *,
        schedule: AutoReplaySchedule | None = None,
        lease_seconds: float = 300.0,
        instrumentation: Instrumentation | None = None,
        on_outcome: Callable[[AutoReplayOutcome], None] | None = None,
    ) -> None:
        self._queue = queue
        self._replays = replays
        self._breaker = breaker
        self._clock = clock
        self._schedule = schedule or AutoReplaySchedule()
        self._lease_seconds = lease_seconds
        self._instrumentation = instrumentation or Instrumentation()
        self._on_outcome = on_outcome

    async def capacity(self, wanted: int, *, others_in_flight: int) -> int:
        """How many may be claimed now: ``wanted`` while the circuit is closed, none while it is open,
        one when the cool-down is over and nothing else of this worker is in flight (the probe)."""
        if wanted <= 0:
            return 0
        status = await self._breaker.status()
        if status.state is CircuitState.CLOSED:
            return wanted
        if status.open_until is not None or others_in_flight > 0:
            return 0
        return 1

    async def claim(self, limit: int) -> list[AutoReplayClaim]:
        if limit <= 0:
            return []
        return await self._queue.claim_auto_replays(
            self._clock.now(), limit=limit, lease_seconds=self._lease_seconds
        )

    async def replay(self, claim: AutoReplayClaim) -> AutoReplayOutcome:
        """Replay one claimed entry and set its next automatic replay from the result."""
        result = await self._replays.replay(claim.id, by=AUTO_REPLAY_BY)
        outcome, counted, next_at = await self._next(claim, result)
        await self._queue.schedule_auto_replay(claim.id, counted=counted, next_at=next_at)
        log.info(
            "auto_replay_finished",
            entry_id=claim.id,
            outcome=outcome,
            attempts=result.attempts,
            auto_replays=claim.auto_replay_count + int(counted),
            next_at=next_at.isoformat() if next_at is not None else None,
        )
        self._instrumentation.emit(AutoReplayFinished(outcome))
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return outcome

    async def release(self, claim: AutoReplayClaim) -> None:
        """Hand a claimed entry back unfinished (the worker is stopping): due again now, no replay
        used up. An entry the interrupted replay already closed keeps no schedule."""
        await self._queue.schedule_auto_replay(claim.id, counted=False, next_at=self._clock.now())

    async def _next(
        self, claim: AutoReplayClaim, result: ReplayResult
    ) -> tuple[AutoReplayOutcome, bool, datetime | None]:
        """(outcome, whether it used up an automatic replay, when the next one is due)."""
        if result.status == "replayed":
            return "replayed", True, None
        if result.status == "requires_investigation":
            return "requires_investigation", True, None
        if result.status == "skipped":
            return "skipped", False, None
        now = self._clock.now()
        if result.attempts == 0:
            # The circuit refused it before any call: due again when the circuit may let one through.
            return "refused", False, await self._breaker.open_until() or now
        made = claim.auto_replay_count + 1
        next_at = self._schedule.after_failure(made, now)
        return ("failed" if next_at is not None else "exhausted"), True, next_at
