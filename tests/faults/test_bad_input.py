"""Every ``certsync`` command given bad input: the pinned exit code, one line naming what is wrong, no
traceback, and not one row changed (a checksum of every table before and after).

Bad input is exit code 2: malformed arguments, unknown ids, invalid environment values. An operational
failure is exit code 1: the database or the portal unreachable. Each case runs against a fresh database
holding mentors, certifications, their outbox events and one pending retry-queue entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from typer.testing import Result

from certsync.store.pool import Pool
from tests.faults.conftest import seed_mentors, table_checksums
from tests.support.cli import UNREACHABLE_DATABASE, certsync, cli_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNREACHABLE_PORTAL = "http://127.0.0.1:1"
SANDBOX = "http://127.0.0.1:9"  # a portal URL for commands that need one configured; never reached


@dataclass(frozen=True)
class Case:
    """``certsync ARGS`` with ``env`` overrides: exits ``code`` with one line containing ``names``."""

    args: tuple[str, ...]
    code: int
    names: str
    env: dict[str, str] = field(default_factory=dict)
    portal: str | None = SANDBOX

    @property
    def id(self) -> str:
        settings = " ".join(f"{k.removeprefix('CERTSYNC_')}={v}" for k, v in self.env.items())
        return " ".join(self.args) + (f" [{settings}]" if settings else "")


MALFORMED_ARGUMENTS = [
    Case(("queue", "list", "--limit", "many"), 2, "--limit"),
    Case(("queue", "list", "--limit", "-1"), 2, "--limit"),
    Case(("queue", "list", "--status", "lost"), 2, "--status"),
    Case(("queue", "list", "--certification", "not-a-uuid"), 2, "--certification"),
    Case(("queue", "show"), 2, "ID"),
    Case(("queue", "show", "abc"), 2, "'abc'"),
    Case(("queue", "show", "0"), 2, "'0'"),
    Case(("queue", "show", "1", "2"), 2, "unexpected extra argument"),
    Case(("queue", "replay"), 2, "--all"),
    Case(("queue", "replay", "1", "--all"), 2, "not both"),
    Case(("queue", "replay", "1", "--status", "pending"), 2, "--status"),
    Case(("queue", "replay", "x1"), 2, "'x1'"),
    Case(("queue", "replay", "--all", "--by", " "), 2, "--by"),
    Case(("queue", "discard", "1"), 2, "--reason"),
    Case(("queue", "discard", "1", "--reason", "  "), 2, "--reason"),
    Case(("queue", "frobnicate"), 2, "frobnicate"),
    Case(("worker", "--concurrency", "0"), 2, "--concurrency"),
    Case(("worker", "--concurrency", "lots"), 2, "--concurrency"),
    Case(("worker", "--metrics-port", "70000"), 2, "--metrics-port"),
    Case(("sweep", "--today", "2026-01-01"), 2, "--today"),
    Case(("breaker", "explode"), 2, "explode"),
    Case(("breaker", "status", "--yaml"), 2, "--yaml"),
    Case(("contract", "check", "--version", "2"), 2, "--version"),
    Case(("sandbox", "--fail", "777"), 2, "777"),
    Case(("sandbox", "--scope", "all"), 2, "--scope"),
    Case(("sandbox", "--latency-ms", "fast"), 2, "latency"),
    Case(("sandbox", "--rate-limit", "lots"), 2, "rate limit"),
    Case(("console", "--port", "0"), 2, "--port"),
    Case(("migrate", "--to", "latest"), 2, "--to"),
    Case(("launch",), 2, "launch"),
]

UNKNOWN_IDS = [
    Case(("queue", "show", "999999"), 2, "999999"),
    Case(("queue", "replay", "999999"), 2, "999999"),
    Case(("queue", "discard", "999999", "--reason", "duplicate"), 2, "999999"),
    Case(("queue", "list", "--certification", "00000000-0000-4000-8000-000000000000"), 0, ""),
]

INVALID_ENVIRONMENT: list[Case | object] = [
    Case(("sweep",), 2, "CERTSYNC_RETRY_MAX_RETRIES", {"CERTSYNC_RETRY_MAX_RETRIES": "-1"}),
    Case(("sweep",), 2, "CERTSYNC_TIMEZONE", {"CERTSYNC_TIMEZONE": "Mars/Olympus_Mons"}),
    Case(("sweep",), 2, "CERTSYNC_LOG_FORMAT", {"CERTSYNC_LOG_FORMAT": "xml"}),
    Case(("sweep",), 2, "CERTSYNC_LOG_LEVEL", {"CERTSYNC_LOG_LEVEL": "loud"}),
    Case(("queue", "list"), 2, "CERTSYNC_RETRY_BASE_DELAY", {"CERTSYNC_RETRY_BASE_DELAY": "soon"}),
    Case(("breaker", "status"), 2, "CERTSYNC_BREAKER_COOLDOWN", {"CERTSYNC_BREAKER_COOLDOWN": "-1"}),
    Case(
        ("breaker", "reset"),
        2,
        "CERTSYNC_BREAKER_FAILURE_THRESHOLD",
        {"CERTSYNC_BREAKER_FAILURE_THRESHOLD": "0"},
    ),
    Case(("contract", "check"), 2, "CERTSYNC_HTTP_TIMEOUT", {"CERTSYNC_HTTP_TIMEOUT": "0"}),
    Case(
        ("worker", "--once"), 2, "CERTSYNC_DYNAMICS_SYNC_ENABLED", {"CERTSYNC_DYNAMICS_SYNC_ENABLED": "maybe"}
    ),
    Case(("worker", "--once"), 2, "CERTSYNC_WORKER_LEASE_SECONDS", {"CERTSYNC_WORKER_LEASE_SECONDS": "0"}),
    Case(
        ("worker", "--once"),
        2,
        "CERTSYNC_DYNAMICS_SIGNING_SECRET",
        {"CERTSYNC_DYNAMICS_SIGNING_SECRET": "whsec_!!!"},
    ),
    Case(
        ("worker", "--once"),
        2,
        "CERTSYNC_DYNAMICS_CLIENT_ID",
        {"CERTSYNC_DYNAMICS_TOKEN_URL": f"{SANDBOX}/oauth2/token"},
    ),
    Case(("contract", "check"), 2, "CERTSYNC_DYNAMICS_BASE_URL", {}, portal=None),
    Case(("console",), 2, "CERTSYNC_CONSOLE", {}),
    Case(("console",), 2, "CERTSYNC_CONSOLE_SESSION_HOURS", {"CERTSYNC_CONSOLE_SESSION_HOURS": "0"}),
    Case(("queue", "replay", "1"), 2, "CERTSYNC_DYNAMICS_TOKEN", {"CERTSYNC_DYNAMICS_TOKEN": ""}),
    Case(("sweep",), 2, "CERTSYNC_DATABASE_URL", {"CERTSYNC_DATABASE_URL": "not a connection string"}),
]

UNREACHABLE = [
    *(
        Case(args, 1, "database", {"CERTSYNC_DATABASE_URL": UNREACHABLE_DATABASE})
        for args in (
            ("migrate",),
            ("queue", "replay", "1"),
            ("queue", "replay", "--all"),
            ("queue", "discard", "1", "--reason", "duplicate"),
            ("breaker", "reset"),
            ("demo",),
        )
    ),
    Case(("contract", "check"), 1, "Dynamics portal", portal=UNREACHABLE_PORTAL),
]


async def seed_for_bad_input(pool: Pool) -> None:
    """Rows for every table a command could touch: mentors, certifications, events, one queue entry."""
    await seed_mentors(pool, mentors=3)
    async with pool.connection() as conn:
        await conn.execute(
            "insert into public.dynamics_sync_retry_queue (operation_type, payload_json, failure_reason)"
            " values ('certification.created', '{}', 'HTTP 503 Service Unavailable')"
        )


def case_id(case: object) -> str:
    return case.id if isinstance(case, Case) else ""


CASES = [*MALFORMED_ARGUMENTS, *UNKNOWN_IDS, *INVALID_ENVIRONMENT, *UNREACHABLE]


def assert_one_error_line(result: Result) -> None:
    """One line for the person (``error: …``), no traceback. The JSON log lines that also go to stderr
    (e.g. the failed request's ``dynamics_request`` warning) are for machines and not counted."""
    said = [line for line in result.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(said) == 1, result.stderr
    assert said[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", CASES, ids=case_id)
async def test_bad_input_exits_with_the_pinned_code_in_one_line_and_changes_no_row(
    case: Case, pool: Pool, database_url: str
) -> None:
    await seed_for_bad_input(pool)
    before = table_checksums(database_url)
    env = cli_env(database_url, case.portal, **case.env)

    result = await certsync(*case.args, env=env)

    assert result.exit_code == case.code, (result.exit_code, result.output)
    if case.code:
        assert_one_error_line(result)
        assert case.names in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert table_checksums(database_url) == before
