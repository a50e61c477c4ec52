"""An open circuit with nothing to send heals by itself: after the cool-down the worker probes the
portal with one cheap authorised read (contract v1: GET /api/v1/contract), over loopback."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from certsync.app import open_runtime
from certsync.resilience.breaker import DYNAMICS_BREAKER, CircuitState
from certsync.sandbox import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from tests.support.runtime import FAST, settings_for

Conn = psycopg.Connection[Any]

pytestmark = pytest.mark.integration


def open_circuit(superuser: Conn, seconds_ago: float) -> None:
    superuser.execute(
        "insert into public.dynamics_circuit_breakers (name, state, consecutive_failures, opened_at)"
        " values (%s, 'open', 3, now() - make_interval(secs => %s))",
        (DYNAMICS_BREAKER, seconds_ago),
    )


def contract_reads(sandbox: SandboxServer) -> list[int | None]:
    return [r.status for r in sandbox.sandbox.requests() if r.path == "/api/v1/contract"]


async def test_after_the_cool_down_an_idle_worker_probes_and_closes_the_circuit(
    database_url: str, superuser: Conn, sandbox: SandboxServer
) -> None:
    open_circuit(superuser, seconds_ago=60)

    async with open_runtime(settings_for(database_url, sandbox, breaker_cooldown=30)) as runtime:
        stats = await runtime.worker(FAST, listen=False).run(once=True)
        status = await runtime.breaker.status()

    assert contract_reads(sandbox) == [200]
    assert status.state is CircuitState.CLOSED
    assert stats.probes == 1


async def test_no_probe_during_the_cool_down_and_a_failed_probe_keeps_it_open(
    database_url: str, superuser: Conn, sandbox: SandboxServer
) -> None:
    open_circuit(superuser, seconds_ago=5)
    settings = settings_for(database_url, sandbox, breaker_cooldown=30)
    async with open_runtime(settings) as runtime:
        await runtime.worker(FAST, listen=False).run(once=True)
    assert contract_reads(sandbox) == []

    superuser.execute("update public.dynamics_circuit_breakers set opened_at = now() - interval '1 minute'")
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=None),)))
    async with open_runtime(settings) as runtime:
        await runtime.worker(FAST, listen=False).run(once=True)
        status = await runtime.breaker.status()

    assert contract_reads(sandbox) == [503]
    assert status.state is CircuitState.OPEN
    assert status.open_until is not None  # a new cool-down began with the failed probe
