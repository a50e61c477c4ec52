"""Is any worker alive? Each running worker records a heartbeat in the database and that it stopped;
every process reads the same answer (the console's metrics too, when every worker is down)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from certsync.app import open_runtime
from certsync.metrics import SystemStatusCollector
from certsync.resilience.clock import SystemClock, real_sleep
from certsync.sandbox.server import SandboxServer
from certsync.store.heartbeats import WorkerHeartbeats
from certsync.store.pool import Pool
from certsync.worker import HeartbeatRecorder
from tests.support.runtime import FAST, settings_for, wait_until

pytestmark = pytest.mark.integration

MINUTE = timedelta(minutes=1)


async def test_a_recorder_beats_while_running_and_says_when_it_stopped(pool: Pool) -> None:
    beats = WorkerHeartbeats(pool)
    clock = SystemClock()
    recorder = HeartbeatRecorder(beats, "host:1", clock=clock, sleep=real_sleep, sending=True, interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))

    async def beating() -> bool:
        return (await beats.latest(now=clock.now(), within=MINUTE)).alive == 1

    await wait_until(beating, "the first heartbeat")
    first = (await beats.latest(now=clock.now(), within=MINUTE)).last_beat_at
    await asyncio.sleep(0.2)
    later = (await beats.latest(now=clock.now(), within=MINUTE)).last_beat_at
    stop.set()
    await asyncio.wait_for(task, 5)
    after = await beats.latest(now=clock.now(), within=MINUTE)

    assert first is not None and later is not None and later > first  # noqa: PT018
    assert (after.alive, after.last_beat_at) == (0, None)  # a worker that stopped is not alive


async def test_the_status_every_process_reads_counts_the_running_workers(
    database_url: str, sandbox: SandboxServer
) -> None:
    async with open_runtime(settings_for(database_url, sandbox)) as runtime:
        stop = asyncio.Event()
        worker = asyncio.create_task(runtime.worker(FAST).run(stop))

        async def one_alive() -> bool:
            status = await runtime.system_status()
            return status.workers is not None and status.workers.alive == 1

        await wait_until(one_alive, "the worker's heartbeat")
        status = await runtime.system_status()
        collected = {m.name: m for m in SystemStatusCollector(lambda: status).collect()}
        stop.set()
        await asyncio.wait_for(worker, 15)
        after = await runtime.system_status()

    assert collected["certsync_workers_alive"].samples[0].value == 1
    assert "certsync_worker_last_heartbeat_timestamp_seconds" in collected
    assert after.workers is not None
    assert after.workers.alive == 0
