"""The delivery loop: claim → sync → record, until told to stop.

Claims the newest waiting event per certification (``Outbox.claim``: SKIP LOCKED, never two in
flight for one certification), delivers each through ``HLFDynamicsSyncService`` as its own task (so
one event's 2 + 4 + 8 s of back-off never stalls the others), and closes it fenced by its claim. It
wakes on LISTEN/NOTIFY and polls as a fallback, keeps its claims alive with a heartbeat, stops
claiming while the shared circuit is open, and expires certifications the moment they pass.

Beside the outbox it replays due ``pending`` retry-queue entries by itself (``AutoReplayer``, as
tasks beside the deliveries, within the same concurrency and the same circuit rules) and deletes old
finished rows (``Retention``, at most every ``retention_check_seconds``). With the flag off it sends
nothing, but the expiry sweep and retention still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import partial
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog

from certsync.delivery.auto_replay import AutoReplayer
from certsync.delivery.requests import PortalRequest, UndeliverableState, request_for
from certsync.delivery.sinks import OutboxFailureSink
from certsync.delivery.sync_service import (
    BulkItem,
    DeliveryFailure,
    DeliveryOutcome,
    HLFDynamicsSyncService,
    Outcome,
)
from certsync.dynamics.contract import CertificationUpsert
from certsync.errors import CertsyncError
from certsync.resilience.breaker import CircuitState
from certsync.resilience.clock import Clock, Sleep
from certsync.store.errors import DatabaseUnavailable
from certsync.store.heartbeats import WorkerHeartbeats
from certsync.store.outbox import ClaimedEvent, DeliveredClose, DeliveredCloser, Outbox
from certsync.store.pool import Pool
from certsync.store.retention import Retention
from certsync.store.retry_queue import AutoReplayClaim
from certsync.store.sweep import expire_due, next_expiry

log = structlog.get_logger(__name__)

OUT_OF_SCOPE = "not sent: the mentor is outside the portal's organisation"


class Listener(Protocol):
    """Sets ``wake`` whenever there may be new work (``OutboxListener``: LISTEN/NOTIFY)."""

    async def run(self, wake: asyncio.Event, stop: asyncio.Event) -> None: ...


class Companion(Protocol):
    """Background work that lives as long as the worker (``AccessAuditRecorder``)."""

    async def run(self, stop: asyncio.Event) -> None: ...


class HeartbeatRecorder:
    """A ``Companion``: records this worker's heartbeat in the database every ``interval`` seconds, and
    that it stopped when it stops, so any process can tell whether a worker is alive. An unreachable
    database is logged and ridden out (the next beat tries again); it never stops the worker."""

    def __init__(
        self,
        beats: WorkerHeartbeats,
        worker_id: str,
        *,
        clock: Clock,
        sleep: Sleep,
        sending: bool,
        interval: float = 10.0,
    ) -> None:
        self._beats = beats
        self._worker_id = worker_id
        self._clock = clock
        self._sleep = sleep
        self._sending = sending
        self._interval = interval

    async def run(self, stop: asyncio.Event) -> None:
        started_at = self._clock.now()
        try:
            while not stop.is_set():
                try:
                    await self._beats.beat(
                        self._worker_id, now=self._clock.now(), started_at=started_at, sending=self._sending
                    )
                except DatabaseUnavailable as exc:
                    log.warning("worker_heartbeat_failed", error=str(exc))
                await _sleep_unless(stop, self._sleep(self._interval))
        finally:
            # Also when the worker cancels its side tasks after the drain: say it stopped.
            with contextlib.suppress(DatabaseUnavailable):
                await asyncio.shield(self._beats.stopped(self._worker_id, now=self._clock.now()))


class _HeapFreeze:
    """While a worker runs, what existed when it started (modules, validators, the runtime, a test's
    fixtures) is out of the garbage collector's sight (``gc.freeze``), so each full collection walks
    only what the deliveries made. Over a 20,000-event bulk drain the full collections took 426 ms
    of the worker's 1.45 s of CPU, walking ~150,000 objects each time; 11–22 ms frozen. Both calls
    are constant time; the last worker of the process to stop (tests and the demo run several) hands
    everything back (``gc.unfreeze``)."""

    running = 0

    @classmethod
    @contextlib.contextmanager
    def held(cls) -> Iterator[None]:
        if cls.running == 0:
            gc.freeze()
        cls.running += 1
        try:
            yield
        finally:
            cls.running -= 1
            if cls.running == 0:
                gc.unfreeze()


async def _first_of(
    waits: Iterable[Awaitable[object]],
    *,
    also: Iterable[asyncio.Future[Any]] = (),
    at_most: float | None = None,
) -> None:
    """Until the first of ``waits`` or ``also`` is done, or ``at_most`` seconds pass. ``waits`` are made
    for this wait and cancelled however it ends, a cancellation of the caller included (the heartbeat is
    cancelled in its sleep when the worker stops): left behind, a pending ``stop.wait()`` was destroyed
    with the event loop ("Task was destroyed but it is pending!"). ``also`` (deliveries) are left running."""
    own = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait([*own, *also], timeout=at_most, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in own:
            task.cancel()


async def _sleep_unless(stop: asyncio.Event, sleeping: Awaitable[None]) -> None:
    """Wait for ``sleeping`` or ``stop``, whichever comes first."""
    await _first_of([sleeping, stop.wait()])


class WorkerFailed(CertsyncError):
    """A side task the worker cannot run without (the outbox listener, the lease heartbeat, a
    companion such as the access-audit recorder) died, so the worker stopped; the message names it."""

    exit_code = 1


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How one worker claims and lets go. The heartbeat must tick inside a lease, and the drain at
    shutdown must not outlast one: a claim left to expire mid-drain is rescued and sent again."""

    # Dataverse allows 52 concurrent requests per user; stay well inside it by default.
    concurrency: int = 16
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 15.0
    poll_seconds: float = 5.0
    sweep_check_seconds: float = 5.0
    shutdown_grace_seconds: float = 30.0
    sweep: bool = True
    # Certifications per portal call when the portal takes bulk upserts (CERTSYNC_DATAVERSE_BATCH_SIZE).
    batch_size: int = 1
    # Retention deletes in small batches; checking more often than every few minutes gains nothing.
    retention_check_seconds: float = 300.0
    # Automatic replays claimed at one time (each also takes a delivery slot while it runs).
    auto_replay_batch: int = 4
    # How often to look for expired claims, and for due automatic replays once a look found none.
    # Both wait minutes (a lease, a replay schedule), so once a second is soon enough; looking at
    # every claim cost two statements per claim at a high delivery rate.
    housekeeping_check_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be 1 or more, not {self.batch_size}")
        if not self.heartbeat_seconds < self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than lease_seconds"
                f" ({self.lease_seconds}): claims would expire between two heartbeats"
            )
        if self.shutdown_grace_seconds > self.lease_seconds:
            raise ValueError(
                f"shutdown_grace_seconds ({self.shutdown_grace_seconds}) must not exceed lease_seconds"
                f" ({self.lease_seconds}): a delivery still draining would be rescued and sent again"
            )


@dataclass(slots=True)
class WorkerStats:
    """What one run did; the demo's summary and the worker's exit message read it."""

    delivered: int = 0
    queued_pending: int = 0
    queued_investigation: int = 0
    held: int = 0
    out_of_scope: int = 0
    probes: int = 0
    superseded: int = 0
    stale_results: int = 0
    rescued: int = 0
    expired_by_sweep: int = 0
    auto_replayed: int = 0
    auto_replay_failed: int = 0
    pruned: int = 0
    crashed: int = 0
    database_outages: int = 0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def today_in(zone: ZoneInfo, clock: Clock) -> date:
    return clock.now().astimezone(zone).date()


@dataclass(frozen=True, slots=True)
class _Planned:
    """Claimed work not yet started: a bulk call's events, or one event, and how to deliver them."""

    events: tuple[ClaimedEvent, ...]
    name: str
    start: Callable[[], Coroutine[object, object, None]]


class SyncWorker:
    """One worker process's delivery loop. Any number of them may run against one database.

    ``service=None`` is the feature flag off: nothing is sent and every change waits in the outbox.
    """

    def __init__(
        self,
        *,
        pool: Pool,
        outbox: Outbox,
        service: HLFDynamicsSyncService | None,
        clock: Clock,
        sleep: Sleep,
        zone: ZoneInfo,
        listener: Listener | None = None,
        companions: tuple[Companion, ...] = (),
        options: WorkerOptions | None = None,
        on_progress: Callable[[WorkerStats], None] | None = None,
        auto_replay: AutoReplayer | None = None,
        retention: Retention | None = None,
    ) -> None:
        self._pool = pool
        self._outbox = outbox
        # Delivered closes share statements (group commit): one round trip for many deliveries.
        self._closer = DeliveredCloser(outbox)
        self._service = service
        self._clock = clock
        self._sleep = sleep
        self._zone = zone
        self._listener = listener
        self._companions = companions
        self._wake = asyncio.Event()
        self._options = options or WorkerOptions()
        self._on_progress = on_progress
        # Each delivery task and the claims it holds (several for a bulk call).
        self._tasks: dict[asyncio.Task[None], tuple[ClaimedEvent, ...]] = {}
        # One round of work claimed ahead and planned, started as slots free (by the task that frees
        # one), so the portal is not left idle while the next claim runs.
        self._ready: deque[_Planned] = deque()
        self._accepting = True
        self._auto_replay = auto_replay
        self._replays: set[asyncio.Task[None]] = set()
        self._retention = retention
        self._next_retention: datetime | None = None
        self._next_rescue: datetime | None = None
        self._next_auto_replay: datetime | None = None
        self._next_sweep_check: datetime | None = None
        self._failure: WorkerFailed | None = None
        self.stats = WorkerStats()

    async def run(self, stop: asyncio.Event | None = None, *, once: bool = False) -> WorkerStats:
        """Deliver until ``stop`` is set; with ``once``, until nothing more is due now, then return.

        The side tasks (companions, the outbox listener, the lease heartbeat) are supervised: one that
        raises, or returns while the worker is not stopping, is logged (``worker_side_task_failed``)
        and sets ``stop`` as a signal would; the deliveries in flight drain, then ``WorkerFailed``
        is raised. The heartbeat outlives the drain, so no claim expires while it is being finished.
        """
        stop = stop or asyncio.Event()
        self._failure = None
        with _HeapFreeze.held():
            return await self._run(stop, once=once)

    async def _run(self, stop: asyncio.Event, *, once: bool) -> WorkerStats:
        background = [self._side_task(c.run(stop), type(c).__name__, stop) for c in self._companions]
        try:
            if self._service is None:
                log.warning(
                    "dynamics_sync_disabled", hint="CERTSYNC_DYNAMICS_SYNC_ENABLED=false: changes wait"
                )
                await self._housekeep_until(stop, once=once)
            else:
                background.append(self._side_task(self._heartbeat(), "lease-heartbeat", stop))
                if self._listener is not None:
                    listening = self._listener.run(self._wake, stop)
                    background.append(self._side_task(listening, "outbox-listener", stop))
                await self._deliver_until(stop, once=once)
        finally:
            await self._drain(stop)
            for task in background:
                task.cancel()
            # Each side task's end was judged by ``_side_task_ended`` as it happened.
            await asyncio.gather(*background, return_exceptions=True)
        if self._failure is not None:
            raise self._failure
        return self.stats

    def _side_task(
        self, work: Coroutine[object, object, None], name: str, stop: asyncio.Event
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(lambda ended: self._side_task_ended(ended, stop))
        return task

    def _side_task_ended(self, task: asyncio.Task[None], stop: asyncio.Event) -> None:
        """Fail fast rather than restart: every side task already rides out the failures it expects
        (a lost connection, an unreachable database) with its own back-off, so one that ends anyway
        is a bug, and running on without it would silently lose audit records, notifications or
        leases. The process supervisor restarts the worker; its claims are handed back first."""
        if task.cancelled():
            return  # cancelled by ``run`` once the drain is over
        error = task.exception()
        if error is None and stop.is_set():
            return  # ended because the worker is stopping
        reason = "returned while the worker was running" if error is None else _describe(error)
        log.error("worker_side_task_failed", task=task.get_name(), error=reason, exc_info=error)
        if self._failure is None:
            self._failure = WorkerFailed(f"worker stopped: its side task {task.get_name()} failed ({reason})")
            self._failure.__cause__ = error
        stop.set()

    async def _deliver_until(self, stop: asyncio.Event, *, once: bool) -> None:
        outage_backoff = 0.5
        last_look = False
        while not stop.is_set():
            # Every database call of an iteration sits inside this one ``try``: an outage met while
            # deciding how long to idle (the breaker snapshot) must be ridden out like one met while
            # claiming, never end the loop.
            try:
                claimed = await self._tick()
                if self._on_progress is not None:
                    self._on_progress(self.stats)
                if claimed:
                    last_look = False
                elif once and not self._tasks and not self._replays and not self._ready:
                    if last_look or self._next_auto_replay is None:
                        return
                    # Before leaving, one look for replays that fell due since the last (gated) one.
                    self._next_auto_replay, last_look = None, True
                    continue
                idle: float | None = None
                if claimed == 0 or self._free_slots() < self._claim_batch():
                    idle = await self._idle_seconds()
                outage_backoff = 0.5
            except DatabaseUnavailable as exc:
                self.stats.database_outages += 1
                log.error("database_unavailable", error=str(exc), retry_in=outage_backoff)
                await self._wait_for_work(stop, outage_backoff)
                outage_backoff = min(outage_backoff * 2, 30.0)
                continue
            if idle is not None:
                await self._wait_for_work(stop, idle)

    def _free_slots(self) -> int:
        return self._options.concurrency - len(self._tasks) - len(self._replays)

    def _claim_capacity(self) -> int:
        """Deliveries to claim for: the free slots and one more round of slots, kept ready, so that a
        finishing delivery starts the next at once instead of waiting for the loop's next claim (a
        bulk call is over in milliseconds, so every slot freed together and the portal waited for
        each claim: 70 % of a 20,000-event drain), and claims are fewer and larger."""
        return self._free_slots() + self._options.concurrency - len(self._ready)

    def _claim_batch(self) -> int:
        """Claim again once a quarter of the slots are free, not after every single delivery: one
        claim query per delivery would cost as much as the delivery itself at high rates."""
        return max(1, self._options.concurrency // 4)

    @property
    def _sync(self) -> HLFDynamicsSyncService:
        assert self._service is not None, "run() returns early when sync is disabled"
        return self._service

    async def _tick(self) -> int:
        now = self._clock.now()
        if self._options.sweep:
            await self._sweep_if_due(now)
        await self._retain_if_due(now)
        if self._due(self._next_rescue, now):
            self._next_rescue = now + timedelta(seconds=self._options.housekeeping_check_seconds)
            self.stats.rescued += await self._outbox.rescue_expired(now)
        self._start_ready()
        batch_size = self._batch_size()
        limit = await self._claim_limit(self._claim_capacity())
        if limit <= 0:
            return 0
        claim = await self._outbox.claim(
            now, limit=limit * batch_size, lease_seconds=self._options.lease_seconds
        )
        self.stats.superseded += claim.superseded
        singles, batches = self._plan(claim.events, batch_size)
        for event in singles:
            self._ready.append(_Planned((event,), f"deliver-{event.id}", partial(self._deliver, event)))
        for batch in batches:
            events = tuple(event for event, _ in batch)
            name = f"deliver-batch-{events[0].id}"
            self._ready.append(_Planned(events, name, partial(self._deliver_batch, batch)))
        self._start_ready()
        started = len(claim.events) + await self._start_auto_replays(now)
        if started == 0 and not self._tasks and not self._replays:
            await self._probe_if_due()
        return started

    async def _probe_if_due(self) -> None:
        """Nothing to send and the cool-down over: probe the portal with a cheap read, so an open
        circuit heals by itself on a quiet night instead of waiting for the next change."""
        status = await self._sync.breaker.status()
        if status.state is CircuitState.CLOSED or status.open_until is not None:
            return
        healed = await self._sync.probe()
        if healed is not None:
            self.stats.probes += 1

    def _start(
        self, work: Coroutine[object, object, None], name: str, events: tuple[ClaimedEvent, ...]
    ) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks[task] = events
        task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task)
        self._start_ready()

    def _start_ready(self) -> None:
        """Start claimed work as far as free slots allow (never once the worker is stopping)."""
        while self._ready and self._accepting and self._free_slots() > 0:
            planned = self._ready.popleft()
            self._start(planned.start(), planned.name, planned.events)

    def _batch_size(self) -> int:
        """Certifications per portal call: ``batch_size`` when the portal takes bulk upserts, else 1."""
        if self._options.batch_size <= 1:
            return 1
        return self._options.batch_size if self._sync.bulk else 1

    def _plan(
        self, events: tuple[ClaimedEvent, ...], batch_size: int
    ) -> tuple[list[ClaimedEvent], list[list[tuple[ClaimedEvent, CertificationUpsert]]]]:
        """Which events go one by one (deletes, no request, undeliverable, a lone upsert) and which
        upserts share one bulk call, at most ``batch_size`` per call."""
        if batch_size <= 1:
            return list(events), []
        singles: list[ClaimedEvent] = []
        upserts: list[tuple[ClaimedEvent, CertificationUpsert]] = []
        today = today_in(self._zone, self._clock)
        for event in events:
            try:
                request = self._request(event, today)
            except UndeliverableState:
                singles.append(event)  # ``_deliver`` keeps it for investigation
                continue
            if isinstance(request, CertificationUpsert):
                upserts.append((event, request))
            else:
                singles.append(event)
        batches = [upserts[i : i + batch_size] for i in range(0, len(upserts), batch_size)]
        if batches and len(batches[-1]) == 1:
            singles.append(batches.pop()[0][0])
        return singles, batches

    @staticmethod
    def _request(event: ClaimedEvent, today: date) -> PortalRequest | None:
        return request_for(
            event.id,
            event.occurred_at,
            event.certification_id,
            event.current,
            may_unlist=event.may_unlist,
            today=today,
        )

    async def _claim_limit(self, capacity: int) -> int:
        """Closed: fill capacity. Open: nothing until the cool-down ends. Then one probe at a time."""
        status = await self._sync.breaker.status()
        if status.state is CircuitState.CLOSED:
            return capacity
        if status.open_until is not None:
            return 0
        return min(capacity, 1) if not self._tasks and not self._replays and not self._ready else 0

    async def _idle_seconds(self) -> float:
        seconds = self._options.poll_seconds
        open_until = await self._sync.breaker.open_until()
        if open_until is not None:
            seconds = min(seconds, (open_until - self._clock.now()).total_seconds())
        return max(seconds, 0.01)

    async def _wait_for_work(self, stop: asyncio.Event, seconds: float) -> None:
        """Until a notification, a delivery finishing, ``stop``, or ``seconds`` pass."""
        if self._wake.is_set():
            self._wake.clear()
            return
        await _first_of(
            [stop.wait(), self._wake.wait()], also=[*self._tasks, *self._replays], at_most=seconds
        )
        self._wake.clear()

    async def _deliver(self, event: ClaimedEvent) -> None:
        sink = OutboxFailureSink(self._outbox, event, self._clock)
        try:
            try:
                request = self._request(event, today_in(self._zone, self._clock))
            except UndeliverableState as exc:
                await self._keep_undeliverable(event, sink, exc)
                return
            if request is None:
                await self._not_this_portals(event)
                return
            outcome = await self._sync.deliver(
                request,
                operation_type=event.operation_type,
                sink=sink,
                when_open="hold",
                attempts=sink.attempts,
            )
            if outcome.outcome is Outcome.DELIVERED:
                if await self._closer.close(event, self._clock.now(), attempt_log=sink.attempts.entries):
                    self.stats.delivered += 1
                else:
                    self._stale(event)
            else:
                await self._settle(event, outcome, sink)
        except asyncio.CancelledError:
            # Shutting down mid-delivery: hand the event back now rather than wait for the lease.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._outbox.release(
                        event,
                        available_at=self._clock.now(),
                        detail="worker stopped",
                        attempt_log=sink.attempts.entries,
                    )
                )
            raise
        except Exception:
            # Kept in flight: its lease runs out and another claim delivers it. Never lost, never fatal.
            self.stats.crashed += 1
            log.exception(
                "delivery_crashed", event_id=str(event.id), certification_id=str(event.certification_id)
            )

    async def _settle(self, event: ClaimedEvent, outcome: DeliveryOutcome, sink: OutboxFailureSink) -> None:
        """An outcome other than delivered: held events wait again; queued ones are counted."""
        if outcome.outcome is Outcome.HELD:
            self.stats.held += 1
            open_until = await self._sync.breaker.open_until()
            await self._outbox.release(
                event,
                available_at=open_until or self._clock.now(),
                detail="circuit open",
                attempt_log=sink.attempts.entries,
            )
        elif sink.lost_claim:
            self._stale(event)
        elif outcome.queue_status == "requires_investigation":
            self.stats.queued_investigation += 1
        else:
            self.stats.queued_pending += 1

    async def _deliver_batch(self, batch: list[tuple[ClaimedEvent, CertificationUpsert]]) -> None:
        """Several upserts in one bulk call; the delivered events closed in one statement."""
        sinks = [OutboxFailureSink(self._outbox, event, self._clock) for event, _ in batch]
        try:
            outcomes = await self._sync.deliver_bulk(
                [
                    BulkItem(request, event.operation_type, sink, sink.attempts)
                    for (event, request), sink in zip(batch, sinks, strict=True)
                ],
                when_open="hold",
            )
            delivered = [
                DeliveredClose(event, sink.attempts.entries)
                for (event, _), outcome, sink in zip(batch, outcomes, sinks, strict=True)
                if outcome.outcome is Outcome.DELIVERED
            ]
            closed = await self._outbox.mark_delivered_many(delivered, self._clock.now())
            self.stats.delivered += len(closed)
            for close in delivered:
                if close.event.id not in closed:
                    self._stale(close.event)
            for (event, _), outcome, sink in zip(batch, outcomes, sinks, strict=True):
                if outcome.outcome is not Outcome.DELIVERED:
                    await self._settle(event, outcome, sink)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                for (event, _), sink in zip(batch, sinks, strict=True):
                    await asyncio.shield(
                        self._outbox.release(
                            event,
                            available_at=self._clock.now(),
                            detail="worker stopped",
                            attempt_log=sink.attempts.entries,
                        )
                    )
            raise
        except Exception:
            # Kept in flight: the leases run out and other claims deliver them. Never lost, never fatal.
            self.stats.crashed += len(batch)
            log.exception("bulk_delivery_crashed", events=len(batch), first_event_id=str(batch[0][0].id))

    async def _keep_undeliverable(
        self, event: ClaimedEvent, sink: OutboxFailureSink, exc: UndeliverableState
    ) -> None:
        """A stored state that no longer fits the contract: reported and kept for investigation."""
        log.error("event_state_invalid", event_id=str(event.id), problems=exc.problems)
        await sink.record(
            DeliveryFailure(
                operation_type=event.operation_type,
                certification_id=event.certification_id,
                event_id=event.id,
                payload={"state": event.current.state},
                failure_reason=str(exc),
                attempt_count=0,
                status="requires_investigation",
            )
        )
        self.stats.queued_investigation += 1

    async def _not_this_portals(self, event: ClaimedEvent) -> None:
        """A mentor outside the portal's organisation whom this change cannot have unlisted: no
        request at all (the portal is not told about other organisations' mentors); closed as done."""
        if await self._closer.close(event, self._clock.now(), detail=OUT_OF_SCOPE):
            self.stats.out_of_scope += 1
        else:
            self._stale(event)

    def _stale(self, event: ClaimedEvent) -> None:
        self.stats.stale_results += 1
        log.warning(
            "stale_result_discarded", event_id=str(event.id), reason="claim was rescued by another worker"
        )

    async def _sweep_if_due(self, now: datetime) -> None:
        if self._next_sweep_check is not None and now < self._next_sweep_check:
            return
        self._next_sweep_check = now + timedelta(seconds=self._options.sweep_check_seconds)
        earliest = await next_expiry(self._pool)
        today = now.astimezone(self._zone).date()
        if earliest is None or earliest >= today:
            if earliest is not None:
                # Wake exactly when the next certification passes its end date.
                expires_at = datetime.combine(earliest + timedelta(days=1), time(0), self._zone)
                self._next_sweep_check = min(self._next_sweep_check, expires_at)
            return
        expired = await expire_due(self._pool, today)
        self.stats.expired_by_sweep += expired
        log.info("expiry_sweep", expired=expired, today=today.isoformat())

    @staticmethod
    def _due(next_check: datetime | None, now: datetime) -> bool:
        return next_check is None or now >= next_check

    async def _start_auto_replays(self, now: datetime) -> int:
        """Claim the pending retry-queue entries due for an automatic replay, as far as free slots and
        the circuit allow (after this tick's outbox claim: when half-open, one probe in all). After a
        look that found none, the next is ``housekeeping_check_seconds`` later."""
        if self._auto_replay is None or not self._due(self._next_auto_replay, now):
            return 0
        wanted = min(self._free_slots(), self._options.auto_replay_batch)
        limit = await self._auto_replay.capacity(
            wanted, others_in_flight=len(self._tasks) + len(self._replays)
        )
        claims = await self._auto_replay.claim(limit)
        if not claims and limit > 0:
            self._next_auto_replay = now + timedelta(seconds=self._options.housekeeping_check_seconds)
        for claim in claims:
            task = asyncio.create_task(self._replay_entry(claim), name=f"auto-replay-{claim.id}")
            self._replays.add(task)
            task.add_done_callback(self._replays.discard)
        return len(claims)

    async def _replay_entry(self, claim: AutoReplayClaim) -> None:
        assert self._auto_replay is not None
        try:
            outcome = await self._auto_replay.replay(claim)
            if outcome == "replayed":
                self.stats.auto_replayed += 1
            elif outcome in ("failed", "exhausted", "requires_investigation"):
                self.stats.auto_replay_failed += 1
        except asyncio.CancelledError:
            # Shutting down mid-replay: due again now rather than when the lease runs out.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._auto_replay.release(claim))
            raise
        except Exception:
            # The lease runs out and the entry is due again. Never lost, never fatal.
            self.stats.crashed += 1
            log.exception("auto_replay_crashed", entry_id=claim.id)

    async def _retain_if_due(self, now: datetime) -> None:
        """Retention (``store/retention.py``) at most every ``retention_check_seconds``; sooner while a
        run stopped at its bound with more left to delete."""
        if self._retention is None or (self._next_retention is not None and now < self._next_retention):
            return
        self._next_retention = now + timedelta(seconds=self._options.retention_check_seconds)
        report = await self._retention.run(now)
        if not report.complete:
            self._next_retention = now
        self.stats.pruned += report.total
        if report.total:
            log.info(
                "retention",
                outbox_events=report.deleted("outbox"),
                queue_entries=report.deleted("queue"),
                audit_records=report.deleted("audit"),
                complete=report.complete,
            )

    async def _housekeep_until(self, stop: asyncio.Event, *, once: bool) -> None:
        """The flag off: nothing is sent, yet statuses stay true in the database (the expiry sweep)
        and retention runs; every change waits in the outbox. ``once``: one pass, then return."""
        outage_backoff = 0.5
        while not stop.is_set():
            try:
                now = self._clock.now()
                if self._options.sweep:
                    await self._sweep_if_due(now)
                await self._retain_if_due(now)
                if self._on_progress is not None:
                    self._on_progress(self.stats)
                wait = self._options.sweep_check_seconds
                outage_backoff = 0.5
            except DatabaseUnavailable as exc:
                self.stats.database_outages += 1
                log.error("database_unavailable", error=str(exc), retry_in=outage_backoff)
                wait = outage_backoff
                outage_backoff = min(outage_backoff * 2, 30.0)
            else:
                if once:
                    return
            await self._wait_for_work(stop, wait)

    async def _heartbeat(self) -> None:
        """Extend the claims held until ``run`` cancels this, after the drain: not at ``stop``, when
        the deliveries still in flight need their leases most."""
        while True:
            await self._sleep(self._options.heartbeat_seconds)
            if self._tasks or self._ready:
                lease_until = self._clock.now() + timedelta(seconds=self._options.lease_seconds)
                try:
                    held = [event for events in self._tasks.values() for event in events]
                    held += [event for planned in self._ready for event in planned.events]
                    await self._outbox.extend_leases(held, lease_until)
                except DatabaseUnavailable as exc:
                    log.error("lease_heartbeat_failed", error=str(exc))

    async def _drain(self, stop: asyncio.Event) -> None:
        """Let in-flight deliveries finish within the grace period; hand back the rest, and the work
        claimed but not started at once."""
        self._accepting = False
        if self._ready:
            unstarted = [event for planned in self._ready for event in planned.events]
            self._ready.clear()
            with contextlib.suppress(DatabaseUnavailable):  # else their leases run out: never lost
                await self._outbox.release_many(
                    unstarted, available_at=self._clock.now(), detail="worker stopped"
                )
        if not self._tasks and not self._replays:
            return
        log.info("worker_draining", in_flight=len(self._tasks) + len(self._replays), stopping=stop.is_set())
        tasks = set(self._tasks) | self._replays
        _, pending = await asyncio.wait(tasks, timeout=self._options.shutdown_grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
