"""Benchmarks against the libraries and queues a team would pick instead (issue 7), and their harness.

This module owns what every script shares: where the PostgreSQL server is and how to get a fresh
migrated database on it, the sandbox portal in a process of its own, and the timing and statistics
helpers (interleaved rounds, medians, percentiles). ``python -m bench`` runs the scripts
(``bench/__main__.py``); ``bench/_report.py`` prints and records their tables.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from tests.support.databases import admin_url as default_admin_url
from tests.support.databases import create_database, create_migrated_template, drop_database, unique_name
from tests.support.runtime import portal_settings

from certsync.sandbox.faults import FaultScript
from certsync.settings import Settings

DATABASE_ENV = "CERTSYNC_TEST_DATABASE_URL"


@dataclass(frozen=True, slots=True)
class Options:
    """What every script is given: the admin connection string (``None``: the embedded server) and scale."""

    database_url: str | None = None
    quick: bool = False
    repeat: int = 1  # how many measured runs, for the scripts that take it (``REPEATABLE``)

    def admin_url(self) -> str:
        if self.database_url:
            return self.database_url
        return default_admin_url()


@contextmanager
def fresh_database(options: Options, prefix: str = "certsync_bench") -> Iterator[str]:
    """A new database with every migration applied, dropped afterwards; yields its connection string."""
    admin = options.admin_url()
    template = create_migrated_template(admin)
    name = unique_name(prefix)
    try:
        yield create_database(admin, name, template=template)
    finally:
        drop_database(admin, name)
        drop_database(admin, template)


def certsync_settings(database_url: str, portal: str, **overrides: Any) -> Settings:
    """Settings as a deployment against ``portal`` would have them (JSON logs, static sandbox token)."""
    return portal_settings(database_url, portal, **overrides)


# --- the sandbox portal, in its own process so that it does not share our GIL ----------------------

_SANDBOX_CHILD = """
import json, sys
from certsync.logs import configure_logging
from certsync.sandbox.faults import parse_fault_script
from certsync.sandbox.server import run_sandbox
from certsync.sandbox.state import SandboxConfig

configure_logging("json", "warning")
config = SandboxConfig(faults=parse_fault_script(json.loads(sys.argv[1])))

def announce(url):
    print(url, flush=True)

run_sandbox("127.0.0.1", 0, config, on_listening=announce)
"""


@contextmanager
def sandbox_process(faults: FaultScript | None = None) -> Iterator[str]:
    """The sandbox (``certsync.sandbox``) served by uvicorn in a child process; yields its base URL.

    Its own logs are at warning level: the portal's logging is not what is being measured.
    """
    with child_server(_SANDBOX_CHILD, json.dumps((faults or FaultScript()).to_json_dict())) as url:
        yield url


_DATAVERSE_CHILD = """
import json, sys
from certsync.logs import configure_logging
from certsync.sandbox.dataverse_limits import parse_limits
from certsync.sandbox.dataverse_state import DataverseConfig
from certsync.sandbox.server import run_sandbox

configure_logging("json", "warning")
config = DataverseConfig(limits=parse_limits(json.loads(sys.argv[1])))

def announce(url):
    print(url, flush=True)

run_sandbox("127.0.0.1", 0, config, on_listening=announce)
"""


@contextmanager
def dataverse_process(limits: dict[str, Any]) -> Iterator[str]:
    """The Dataverse emulator in a child process, with ``limits`` (fields of ``ServiceLimits``)."""
    with child_server(_DATAVERSE_CHILD, json.dumps(limits), probe="/_sandbox/state") as url:
        yield url


@contextmanager
def child_server(
    script: str, argument: str, *, probe: str = "/_sandbox/faults", timeout: float = 15.0
) -> Iterator[str]:
    """``script`` (which prints its URL once listening) in a child process; yields that URL."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, argument],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError("the portal process did not start")
        _wait_until_serving(url, timeout=timeout, probe=probe)
        yield url
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _wait_until_serving(url: str, timeout: float = 15.0, probe: str = "/_sandbox/faults") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"{url}{probe}", timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def sandbox_requests(url: str) -> list[dict[str, Any]]:
    """The sandbox's request log (admin API), oldest first."""
    return list(httpx.get(f"{url}/_sandbox/requests", timeout=30.0).json()["requests"])


# --- timing -------------------------------------------------------------------------------------------

AsyncBody = Callable[[int], Awaitable[float]]
"""Runs ``n`` calls and returns the seconds they took (so set-up stays outside the timed region)."""


def calls_of(function: Callable[[], Awaitable[object]]) -> AsyncBody:
    """A body that awaits ``function()`` ``n`` times."""

    async def body(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await function()
        return time.perf_counter() - started

    return body


def interleaved(
    contenders: dict[str, AsyncBody], *, rounds: int, calls: int, warmup: int = 2_000
) -> dict[str, list[float]]:
    """Seconds per call for each contender, one figure per round; rounds alternate between contenders
    so that noise from other work on the machine spreads over all of them alike."""

    async def run() -> dict[str, list[float]]:
        for body in contenders.values():
            await body(warmup)
        results: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, body in contenders.items():
                results[name].append(await body(calls) / calls)
        return results

    return asyncio.run(run())


def best(samples: Sequence[float]) -> float:
    return min(samples)


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` 0.99 = p99) of unsorted samples."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def micro(seconds: float) -> str:
    return f"{seconds * 1e6:.2f}"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×" if reference > 0 else "n/a"


def cpu_count() -> int:
    return os.cpu_count() or 1
