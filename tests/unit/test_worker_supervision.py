"""The worker's side tasks are supervised: one that dies ends the worker loudly, and promptly; it leaves
no wait of its own pending; and its housekeeping runs at most once per interval.

No database: the outbox finds nothing to claim, the breaker is the in-memory one, and the heartbeat's
sleep never returns unless a test says so. The poll interval is an hour, so a worker that only noticed
a dead side task on its next poll would hit the ``asyncio.timeout`` guard instead of returning.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from datetime import datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from certsync.delivery.sync_service import HLFDynamicsSyncService
from certsync.resilience.breaker import DynamicsCircuitBreaker, InMemoryBreakerStore
from certsync.resilience.clock import Sleep
from certsync.resilience.testing import ManualClock
from certsync.store.heartbeats import WorkerHeartbeats
from certsync.store.outbox import Claim, Outbox
from certsync.store.pool import Pool
from certsync.worker import (
    Companion,
    HeartbeatRecorder,
    Listener,
    SyncWorker,
    WorkerFailed,
    WorkerOptions,
)

HOUR = 3600.0
IDLE = WorkerOptions(poll_seconds=HOUR, sweep=False)
GUARD_SECONDS = 5.0
"""Real time a test allows the worker to end in; it ends in milliseconds when it notices at once."""


class NothingDue:
    """The outbox calls an idle worker makes, answered without a database: nothing to rescue or claim."""

    async def rescue_expired(self, now: datetime) -> int:
        return 0

    async def claim(self, now: datetime, *, limit: int, lease_seconds: float) -> Claim:
        return Claim(events=(), superseded=0)


class ClosedCircuit:
    """All an idle worker asks of the sync service: its breaker (closed, in memory)."""

    def __init__(self, clock: ManualClock) -> None:
        self.breaker = DynamicsCircuitBreaker("dynamics", InMemoryBreakerStore(), clock)


async def never_wakes(seconds: float) -> None:
    """The heartbeat's sleep: it waits until the worker cancels it."""
    await asyncio.Event().wait()


async def broken_sleep(seconds: float) -> None:
    raise RuntimeError("the heartbeat's timer broke")


class Exploding:
    """A companion (or listener) that raises once the worker is running."""

    async def run(self, *_: asyncio.Event) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")


class ReturnsAtOnce:
    """A listener that ends although nobody asked it to stop."""

    async def run(self, *_: asyncio.Event) -> None:
        return None


def worker(
    *,
    sync: bool = True,
    listener: Listener | None = None,
    companions: tuple[Companion, ...] = (),
    sleep: Sleep = never_wakes,
) -> SyncWorker:
    clock = ManualClock()
    return SyncWorker(
        pool=cast(Pool, None),  # sweep=False and nothing claimed: the worker never touches it
        outbox=cast(Outbox, NothingDue()),
        service=cast(HLFDynamicsSyncService, ClosedCircuit(clock)) if sync else None,
        clock=clock,
        sleep=sleep,
        zone=ZoneInfo("Europe/Oslo"),
        listener=listener,
        companions=companions,
        options=IDLE,
    )


async def run_until_it_fails(subject: SyncWorker) -> tuple[WorkerFailed, list[MutableMapping[str, Any]]]:
    stop = asyncio.Event()
    with capture_logs() as logs, pytest.raises(WorkerFailed) as failed:
        async with asyncio.timeout(GUARD_SECONDS):
            await subject.run(stop)
    assert stop.is_set(), "a failed side task stops the worker as a signal would"
    return failed.value, logs


def the_failure_logged(logs: list[MutableMapping[str, Any]]) -> MutableMapping[str, Any]:
    [line] = [entry for entry in logs if entry["event"] == "worker_side_task_failed"]
    assert line["log_level"] == "error"
    return line


async def test_a_companion_that_raises_ends_the_worker_loudly_and_at_once() -> None:
    failure, logs = await run_until_it_fails(worker(companions=(Exploding(),)))
    line = the_failure_logged(logs)
    assert line["task"] == "Exploding"
    assert line["error"] == "RuntimeError: boom"
    assert str(failure) == "worker stopped: its side task Exploding failed (RuntimeError: boom)"
    assert isinstance(failure.__cause__, RuntimeError)
    assert failure.exit_code == 1


async def test_a_listener_that_raises_ends_the_worker() -> None:
    failure, logs = await run_until_it_fails(worker(listener=Exploding()))
    assert the_failure_logged(logs)["task"] == "outbox-listener"
    assert "outbox-listener failed (RuntimeError: boom)" in str(failure)


async def test_a_listener_that_returns_while_the_worker_runs_ends_it() -> None:
    failure, logs = await run_until_it_fails(worker(listener=ReturnsAtOnce()))
    line = the_failure_logged(logs)
    assert line["task"] == "outbox-listener"
    assert line["error"] == "returned while the worker was running"
    assert "outbox-listener failed (returned while the worker was running)" in str(failure)


async def test_a_heartbeat_that_dies_ends_the_worker() -> None:
    failure, logs = await run_until_it_fails(worker(sleep=broken_sleep))
    assert the_failure_logged(logs)["task"] == "lease-heartbeat"
    assert "RuntimeError: the heartbeat's timer broke" in str(failure)


async def test_a_companion_that_dies_while_sync_is_off_ends_the_worker() -> None:
    failure, _ = await run_until_it_fails(worker(sync=False, companions=(Exploding(),)))
    assert "Exploding failed" in str(failure)


# Options that cannot work together are refused when they are made ----------------------------------


def test_a_drain_grace_longer_than_the_lease_is_refused() -> None:
    with pytest.raises(ValueError, match=r"shutdown_grace_seconds \(30\.0\) must not exceed lease_seconds"):
        WorkerOptions(lease_seconds=10.0, heartbeat_seconds=2.0, shutdown_grace_seconds=30.0)


def test_a_heartbeat_no_shorter_than_the_lease_is_refused() -> None:
    with pytest.raises(ValueError, match=r"heartbeat_seconds \(10\.0\) must be shorter than lease_seconds"):
        WorkerOptions(lease_seconds=10.0, heartbeat_seconds=10.0, shutdown_grace_seconds=5.0)


# Nothing is left pending when the worker ends ---------------------------------------------------------


class RecordedBeats:
    """The heartbeat store, in memory: which beats and stops it was told of."""

    def __init__(self) -> None:
        self.beats = 0
        self.said_stopped = asyncio.Event()

    async def beat(self, worker_id: str, *, now: datetime, started_at: datetime, sending: bool) -> None:
        self.beats += 1

    async def stopped(self, worker_id: str, *, now: datetime) -> None:
        self.said_stopped.set()


class DueOnceTheHeartbeatSleeps(NothingDue):
    """Nothing to claim, answered only once the heartbeat companion is in its sleep, so that the worker
    (``once``) ends and cancels the companion in the middle of that wait."""

    def __init__(self, sleeping: asyncio.Event) -> None:
        self._sleeping = sleeping

    async def claim(self, now: datetime, *, limit: int, lease_seconds: float) -> Claim:
        await self._sleeping.wait()
        return await super().claim(now, limit=limit, lease_seconds=lease_seconds)


async def test_a_worker_that_ends_leaves_no_wait_of_its_own_pending() -> None:
    """The heartbeat companion is cancelled in its sleep when the worker ends; the waits it made on
    the sleep and on ``stop`` go with it. Left pending, they were destroyed with the event loop
    ("Task was destroyed but it is pending!", seen at the end of every benchmark run)."""
    sleeping = asyncio.Event()

    async def sleep(seconds: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    clock = ManualClock()
    beats = RecordedBeats()
    heartbeat = HeartbeatRecorder(cast(WorkerHeartbeats, beats), "w1", clock=clock, sleep=sleep, sending=True)
    subject = SyncWorker(
        pool=cast(Pool, None),
        outbox=cast(Outbox, DueOnceTheHeartbeatSleeps(sleeping)),
        service=cast(HLFDynamicsSyncService, ClosedCircuit(clock)),
        clock=clock,
        sleep=never_wakes,
        zone=ZoneInfo("Europe/Oslo"),
        companions=(heartbeat,),
        options=IDLE,
    )
    before = asyncio.all_tasks()

    async with asyncio.timeout(GUARD_SECONDS):
        await subject.run(asyncio.Event(), once=True)
    await asyncio.sleep(0)  # a cancelled task ends on the loop's next turn

    assert beats.beats == 1, "the companion ran"
    assert beats.said_stopped.is_set(), "and said it stopped"
    left = [task for task in asyncio.all_tasks() - before if not task.done()]
    assert left == [], [task.get_coro() for task in left]


# The once-a-second housekeeping gate --------------------------------------------------------------------


class CountedTicks(NothingDue):
    """Counts the lease rescues; reports each claim (one per pass of the worker's loop)."""

    def __init__(self) -> None:
        self.rescues = 0
        self.passes: asyncio.Queue[None] = asyncio.Queue()

    async def rescue_expired(self, now: datetime) -> int:
        self.rescues += 1
        return 0

    async def claim(self, now: datetime, *, limit: int, lease_seconds: float) -> Claim:
        self.passes.put_nowait(None)
        return await super().claim(now, limit=limit, lease_seconds=lease_seconds)


class Notifications:
    """A listener the test drives: each ``notify`` wakes the idle worker for one more pass."""

    def __init__(self) -> None:
        self._wake: asyncio.Event | None = None

    async def run(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        self._wake = wake
        await stop.wait()

    def notify(self) -> None:
        assert self._wake is not None, "the worker has started its listener"
        self._wake.set()


async def test_expired_leases_are_rescued_at_most_once_per_housekeeping_interval_however_often_it_wakes() -> (
    None
):
    """Every pass of the loop (a notification, a delivery finishing) would otherwise run the rescue
    statement: at a busy worker's rate, one per claim. The injected clock decides; no real time passes."""
    clock = ManualClock()
    outbox = CountedTicks()
    notifications = Notifications()
    subject = SyncWorker(
        pool=cast(Pool, None),
        outbox=cast(Outbox, outbox),
        service=cast(HLFDynamicsSyncService, ClosedCircuit(clock)),
        clock=clock,
        sleep=never_wakes,
        zone=ZoneInfo("Europe/Oslo"),
        listener=notifications,
        options=WorkerOptions(poll_seconds=HOUR, sweep=False, housekeeping_check_seconds=1.0),
    )
    stop = asyncio.Event()

    async def passes(count: int) -> None:
        for _ in range(count):
            notifications.notify()
            await outbox.passes.get()

    async with asyncio.timeout(GUARD_SECONDS):
        running = asyncio.create_task(subject.run(stop))
        await outbox.passes.get()
        assert outbox.rescues == 1, "the first pass rescues"
        await passes(5)
        assert outbox.rescues == 1, "five more passes in the same instant do not"
        clock.advance(0.999)
        await passes(2)
        assert outbox.rescues == 1, "nor a moment before the interval ends"
        clock.advance(0.001)
        await passes(1)
        assert outbox.rescues == 2, "the first pass once it has ended does"
        await passes(3)
        assert outbox.rescues == 2
        stop.set()
        await running
