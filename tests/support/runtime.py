"""Running certsync in a test: the settings it runs with, the worker options, and waiting for it.

- ``portal_settings``: settings as a deployment against a portal would have them (the benchmarks use it);
  ``settings_for``: the same against the test's sandbox, with short retry and cool-down delays and
  automatic replay off (most tests look at the pending entries a worker run leaves; the tests of
  automatic replay, tests/integration/test_auto_replay.py, turn it on).
- ``FAST``: worker options with short polls, heartbeats and leases.
- ``puts``: the certification PUTs the sandbox received.
- ``wait_until``: poll a condition (plain or async) until it holds, failing the test naming what it
  waited for.

The ``sandbox`` fixture (the sandbox portal on a free loopback port) is in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from certsync.sandbox.server import SandboxServer
from certsync.sandbox.state import DEFAULT_TOKEN, RecordedRequest
from certsync.settings import Settings
from certsync.worker import WorkerOptions

FAST = WorkerOptions(
    concurrency=8, poll_seconds=0.2, heartbeat_seconds=0.5, lease_seconds=10, shutdown_grace_seconds=10
)


def portal_settings(database_url: str, portal: str, **overrides: Any) -> Settings:
    """Settings as a deployment against ``portal`` would have them (JSON logs, static sandbox token)."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "dynamics_base_url": portal,
        "dynamics_token": DEFAULT_TOKEN,
        "log_format": "json",
    }
    return Settings(_env_file=None, **(values | overrides))


def settings_for(database_url: str, sandbox: SandboxServer, **overrides: Any) -> Settings:
    """Settings against the test's sandbox: retries and the breaker's cool-down are short."""
    values: dict[str, Any] = {"retry_base_delay": 0.01, "breaker_cooldown": 0.5, "auto_replay": False}
    return portal_settings(database_url, sandbox.url, **(values | overrides))


def puts(sandbox: SandboxServer) -> list[RecordedRequest]:
    return [r for r in sandbox.sandbox.requests() if r.method == "PUT"]


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], what: str, seconds: float = 20.0, every: float = 0.02
) -> None:
    """Poll ``condition()`` (plain or async) every ``every`` seconds until it is true; fail naming
    ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(every)
