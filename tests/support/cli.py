"""Running the ``certsync`` command in a test: its environment, the command in process, its errors."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner, Result

from certsync.cli import cli
from certsync.sandbox.state import DEFAULT_TOKEN

UNREACHABLE_DATABASE = "postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2"


def cli_env(database_url: str, base_url: str | None = None, **overrides: str) -> dict[str, str]:
    """The environment a command runs with: this test's database and, if given, the sandbox."""
    env = {
        "CERTSYNC_DATABASE_URL": database_url,
        "CERTSYNC_LOG_FORMAT": "json",
        "CERTSYNC_LOG_LEVEL": "warning",
        "CERTSYNC_RETRY_BASE_DELAY": "0.01",
        "CERTSYNC_BREAKER_COOLDOWN": "30",
        "CERTSYNC_DYNAMICS_SYNC_ENABLED": "true" if base_url else "false",
        # Off unless a test turns it on: queue tests look at the pending entries a worker run leaves.
        "CERTSYNC_AUTO_REPLAY": "false",
    }
    if base_url is not None:
        env |= {"CERTSYNC_DYNAMICS_BASE_URL": base_url, "CERTSYNC_DYNAMICS_TOKEN": DEFAULT_TOKEN}
    return env | overrides


async def certsync(*args: str, env: dict[str, str]) -> Result:
    """``certsync ARGS`` parsed by Typer, in a worker thread: each command starts its own event loop."""
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env)


def assert_one_line_error(result: Result) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
