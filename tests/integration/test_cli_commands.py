"""The operator commands end to end: ``certsync`` parsed by Typer, real PostgreSQL, the real sandbox.

Each command runs in a worker thread (``asyncio.to_thread``) because it starts its own event loop.
"""

from __future__ import annotations

import io
import json
from datetime import date
from uuid import UUID

import pytest
from rich.console import Console

from certsync.app import breaker_for
from certsync.cli import _common as cli_common
from certsync.cli import worker as cli_worker
from certsync.resilience.clock import SystemClock
from certsync.sandbox.faults import FaultScript, FaultStep, Latency
from certsync.sandbox.server import SandboxServer
from certsync.settings import Settings
from certsync.store.pool import Pool
from tests.support.cli import UNREACHABLE_DATABASE, assert_one_line_error, certsync, cli_env
from tests.support.runtime import puts
from tests.support.seed import outbox_statuses, seed_certifications

pytestmark = pytest.mark.integration

# Exit codes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["queue", "list"], ["queue", "show", "1"], ["sweep"], ["breaker", "status"], ["worker", "--once"]],
    ids=" ".join,
)
async def test_an_unreachable_database_exits_1_with_one_line_and_no_traceback(command: list[str]) -> None:
    result = await certsync(*command, env=cli_env(UNREACHABLE_DATABASE))
    assert result.exit_code == 1
    assert_one_line_error(result)
    assert "database" in result.stderr


async def test_an_invalid_setting_exits_2_naming_the_variable(database_url: str) -> None:
    result = await certsync("sweep", env=cli_env(database_url, CERTSYNC_RETRY_MAX_RETRIES="many"))
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert "CERTSYNC_RETRY_MAX_RETRIES" in result.stderr


async def test_a_usage_error_exits_2_with_one_line(database_url: str) -> None:
    result = await certsync("worker", "--concurrency", "lots", env=cli_env(database_url))
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert "--concurrency" in result.stderr


# breaker ----------------------------------------------------------------------------------------------


async def open_the_circuit(pool: Pool, database_url: str) -> None:
    settings = Settings(_env_file=None, database_url=database_url)
    breaker = breaker_for(pool, settings, SystemClock())
    for _ in range(breaker.failure_threshold):
        await breaker.record_failure("HTTP 503 Service Unavailable")


async def test_breaker_status_json_prints_one_object_with_the_state(database_url: str) -> None:
    result = await certsync("breaker", "status", "--json", env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["state"] == "closed"
    assert status["consecutive_failures"] == 0


async def test_breaker_status_shows_when_an_open_circuit_opened_and_may_probe(
    pool: Pool, database_url: str
) -> None:
    await open_the_circuit(pool, database_url)
    result = await certsync("breaker", "status", "--json", env=cli_env(database_url))
    status = json.loads(result.stdout)
    assert (status["state"], status["consecutive_failures"]) == ("open", 3)
    assert status["opened_at"] is not None
    assert status["next_probe_at"] > status["opened_at"]
    assert status["last_failure_reason"] == "HTTP 503 Service Unavailable"


async def test_breaker_status_says_what_happens_once_the_probe_is_due(pool: Pool, database_url: str) -> None:
    await open_the_circuit(pool, database_url)
    env = cli_env(database_url, CERTSYNC_BREAKER_COOLDOWN="30", COLUMNS="200")
    cooling = await certsync("breaker", "status", env=env)
    async with pool.connection() as conn:
        await conn.execute(
            "update public.dynamics_circuit_breakers set opened_at = now() - interval '1 hour'"
        )
    due = await certsync("breaker", "status", env=env)

    assert "until then nothing is sent" in cooling.stdout
    assert "due since" in due.stdout
    assert "the next call is the probe" in due.stdout


async def test_breaker_reset_closes_an_open_breaker(pool: Pool, database_url: str) -> None:
    await open_the_circuit(pool, database_url)
    result = await certsync("breaker", "reset", env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    assert "it was open" in result.stdout
    status = await certsync("breaker", "status", "--json", env=cli_env(database_url))
    assert json.loads(status.stdout)["state"] == "closed"


# contract ---------------------------------------------------------------------------------------------


async def test_contract_check_passes_when_the_portal_accepts_version_1(
    database_url: str, sandbox: SandboxServer
) -> None:
    result = await certsync("contract", "check", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output
    assert "accepts contract v1" in result.stdout


async def test_contract_check_fails_loudly_when_the_portal_moved_to_version_2(
    database_url: str, sandbox: SandboxServer
) -> None:
    sandbox.sandbox.set_contract_versions((2,))
    result = await certsync("contract", "check", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 1
    assert_one_line_error(result)
    assert "CONTRACT MISMATCH" in result.stderr
    assert "accepts v2, but certsync sends v1" in result.stderr


async def test_contract_check_without_a_portal_configured_exits_2(database_url: str) -> None:
    result = await certsync("contract", "check", env=cli_env(database_url))
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert "CERTSYNC_DYNAMICS_BASE_URL" in result.stderr


# sweep ------------------------------------------------------------------------------------------------


async def statuses_of(pool: Pool, ids: list[UUID]) -> list[str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select status from public.certifications where id = any(%s) order by status", (ids,)
        )
        return [str(r["status"]) for r in await cur.fetchall()]


async def test_sweep_expires_exactly_the_due_certifications(pool: Pool, database_url: str) -> None:
    due = await seed_certifications(pool, 3, valid_until=date(2020, 6, 1))
    current = await seed_certifications(pool, 2, valid_until=date(2099, 1, 1))
    revoked = await seed_certifications(pool, 1, valid_until=date(2020, 6, 1), status="revoked")

    result = await certsync("sweep", env=cli_env(database_url))

    assert result.exit_code == 0, result.output
    assert "Expired 3 certifications" in result.stdout
    assert await statuses_of(pool, due) == ["expired"] * 3
    assert await statuses_of(pool, current) == ["active"] * 2
    assert await statuses_of(pool, revoked) == ["revoked"]


async def test_sweep_dry_run_says_how_many_would_expire_and_changes_nothing(
    pool: Pool, database_url: str
) -> None:
    due = await seed_certifications(pool, 3, valid_until=date(2020, 6, 1))
    await seed_certifications(pool, 2, valid_until=date(2099, 1, 1))
    before = await outbox_statuses(pool)

    result = await certsync("sweep", "--dry-run", env=cli_env(database_url))

    assert result.exit_code == 0, result.output
    assert "Dry run: 3 certifications would expire" in result.stdout
    assert await statuses_of(pool, due) == ["active"] * 3
    assert await outbox_statuses(pool) == before


# worker -----------------------------------------------------------------------------------------------


async def test_worker_once_delivers_everything_due_and_prints_a_summary(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    await seed_certifications(pool, 5)
    result = await certsync("worker", "--once", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output
    assert "delivered: 5" in result.stdout
    assert len(puts(sandbox)) == 5
    assert await outbox_statuses(pool) == {"delivered": 5}


async def test_worker_once_with_the_flag_off_sends_nothing_and_says_how_many_wait(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    await seed_certifications(pool, 4)
    env = cli_env(database_url, sandbox.url, CERTSYNC_DYNAMICS_SYNC_ENABLED="false")
    result = await certsync("worker", "--once", env=env)
    assert result.exit_code == 0, result.output
    assert "sync is off" in result.stdout
    assert "4 events wait" in result.stdout
    assert puts(sandbox) == []
    assert await outbox_statuses(pool) == {"waiting": 4}


async def test_worker_once_with_the_circuit_open_says_how_many_events_wait_and_exits_0(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=None, scope="put"),)))
    await seed_certifications(pool, 10)
    result = await certsync("worker", "--once", "--concurrency", "1", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output
    # Three failed calls open the circuit: the event being tried is queued, the other nine wait.
    assert "circuit is open" in result.stdout
    assert "9 events wait" in result.stdout
    assert await outbox_statuses(pool) == {"queued": 1, "waiting": 9}


async def test_worker_with_a_lease_shorter_than_the_default_grace_shortens_the_grace(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    await seed_certifications(pool, 2)
    env = cli_env(database_url, sandbox.url, CERTSYNC_WORKER_LEASE_SECONDS="10")
    result = await certsync("worker", "--once", env=env)
    assert result.exit_code == 0, result.output
    assert await outbox_statuses(pool) == {"delivered": 2}


class BrokenAuditRecorder:
    """Stands in for the access-audit recorder the worker runs beside it; it fails with a bug."""

    def __init__(self, dsn: str) -> None:
        pass

    async def run(self, stop: object) -> None:
        raise RuntimeError("audit recorder bug")


async def test_worker_whose_side_task_dies_exits_1_with_one_line_naming_it(
    pool: Pool, database_url: str, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("certsync.app.AccessAuditRecorder", BrokenAuditRecorder)
    result = await certsync("worker", "--once", env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 1, result.output
    *logged, last = result.stderr.strip().splitlines()
    assert last == (
        "error: worker stopped: its side task BrokenAuditRecorder failed (RuntimeError: audit recorder bug)"
    )
    [failure] = [json.loads(line) for line in logged if "worker_side_task_failed" in line]
    assert failure["task"] == "BrokenAuditRecorder"
    assert failure["level"] == "error"


async def test_worker_once_on_a_terminal_shows_its_progress_through_the_backlog(
    pool: Pool, database_url: str, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed_certifications(pool, 30)
    # Slow enough (30 × 40 ms, one at a time) for the bar to be drawn before the run ends.
    sandbox.sandbox.load_faults(FaultScript(latency=Latency(min_ms=40)))
    # A terminal: Rich draws its (transient) progress bar only on one.
    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, color_system=None, width=120)
    monkeypatch.setattr(cli_common, "out", terminal)
    monkeypatch.setattr(cli_worker, "out", terminal)

    result = await certsync("worker", "--once", "--concurrency", "1", env=cli_env(database_url, sandbox.url))

    assert result.exit_code == 0, result.output
    drawn = screen.getvalue()
    assert "delivering" in drawn
    assert "30/30" in drawn.replace(" ", "")
    assert "delivered: 30" in drawn
