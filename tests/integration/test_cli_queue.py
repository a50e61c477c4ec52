"""``certsync queue list|show|replay|discard`` end to end: real PostgreSQL, the real sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import getpass
import json
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import typer

from certsync.cli import cli
from certsync.resilience.breaker import DYNAMICS_BREAKER
from certsync.sandbox.faults import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from certsync.sandbox.state import SandboxConfig
from certsync.store.pool import Pool
from certsync.store.retry_queue import NewRetryEntry, RetryQueue
from tests.support.cli import assert_one_line_error, certsync, cli_env
from tests.support.memory import traced_bytes_of_all_entries
from tests.support.runtime import puts
from tests.support.seed import seed_certifications, seed_pending_entries, set_status

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig()) as server:
        yield server


async def add_entry(
    pool: Pool,
    certification_id: UUID | None,
    *,
    minutes: int = 0,
    status: str = "pending",
    operation_type: str = "certification.status_changed",
) -> int:
    """A retry queue entry created ``minutes`` after T0, as the worker would write it."""
    entry = NewRetryEntry(
        operation_type=operation_type,
        certification_id=certification_id,
        event_id=None,
        payload_json={"contract_version": 1, "certification": {"id": str(certification_id), "version": 1}},
        failure_reason="retries exhausted: HTTP 503 Service Unavailable",
        attempt_count=4,
        status=status,  # type: ignore[arg-type]
    )
    return await RetryQueue(pool).add(entry, T0 + timedelta(minutes=minutes))


def listed(stdout: str) -> list[dict[str, Any]]:
    rows = json.loads(stdout)
    assert isinstance(rows, list)
    return rows


# list -------------------------------------------------------------------------------------------------


async def test_queue_list_json_prints_the_entries_newest_first(pool: Pool, database_url: str) -> None:
    ids = [await add_entry(pool, None, minutes=m) for m in (1, 3, 2)]
    result = await certsync("queue", "list", "--json", env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    assert [row["id"] for row in listed(result.stdout)] == [ids[1], ids[2], ids[0]]


async def test_queue_list_filters_by_status_operation_and_certification(
    pool: Pool, database_url: str
) -> None:
    [cert_a, cert_b] = await seed_certifications(pool, 2)
    wanted = await add_entry(pool, cert_a, status="requires_investigation")
    await add_entry(pool, cert_a, status="pending")
    await add_entry(pool, cert_b, status="requires_investigation")
    await add_entry(pool, cert_a, status="requires_investigation", operation_type="certification.created")
    env = cli_env(database_url)

    result = await certsync(
        "queue", "list", "--json", "--status", "requires_investigation",
        "--operation-type", "certification.status_changed", "--certification", str(cert_a),
        env=env,
    )  # fmt: skip

    assert [row["id"] for row in listed(result.stdout)] == [wanted]


async def test_queue_list_stops_at_the_limit(pool: Pool, database_url: str) -> None:
    for minute in range(7):
        await add_entry(pool, None, minutes=minute)
    result = await certsync("queue", "list", "--json", "--limit", "3", env=cli_env(database_url))
    assert len(listed(result.stdout)) == 3


async def test_queue_list_shows_a_table_for_people(pool: Pool, database_url: str) -> None:
    entry_id = await add_entry(pool, None)
    result = await certsync("queue", "list", env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.stdout.splitlines() if "pending" in line]
    assert row.split("│")[1].strip() == str(entry_id)
    assert "retries exhausted: HTTP 503 Service Unavailable" in row


async def test_queue_list_says_so_when_nothing_matches(database_url: str) -> None:
    result = await certsync("queue", "list", env=cli_env(database_url))
    assert result.exit_code == 0
    assert "No retry queue entries match." in result.stdout


@pytest.mark.parametrize(
    "arguments",
    [
        ["list", "--status", "failed"],
        ["list", "--certification", "not-a-uuid"],
        ["list", "--limit", "-1"],
        ["show", "seven"],
        ["replay", "1", "--all"],
        ["replay"],
        ["replay", "1", "--status", "pending"],
        ["replay", "--all", "--status", "lost"],
        ["replay", "0"],
        ["discard", "1", "--reason", "  "],
        ["discard", "1"],
    ],
    ids=" ".join,
)
async def test_bad_input_exits_2_with_one_line(arguments: list[str], database_url: str) -> None:
    result = await certsync("queue", *arguments, env=cli_env(database_url, "http://127.0.0.1:9"))
    assert result.exit_code == 2
    assert_one_line_error(result)


# show -------------------------------------------------------------------------------------------------


async def test_queue_show_json_has_the_payload_and_the_failure_history(pool: Pool, database_url: str) -> None:
    entry_id = await add_entry(pool, None)
    result = await certsync("queue", "show", str(entry_id), "--json", env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    assert entry["payload_json"]["contract_version"] == 1
    [failure] = entry["failure_history"]
    assert failure["reason"] == "retries exhausted: HTTP 503 Service Unavailable"


async def test_queue_show_for_people_prints_the_payload_and_history(pool: Pool, database_url: str) -> None:
    entry_id = await add_entry(pool, None)
    result = await certsync("queue", "show", str(entry_id), env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    assert f"Retry queue entry #{entry_id}" in result.stdout
    assert '"contract_version": 1' in result.stdout
    assert "failure history" in result.stdout


@pytest.mark.parametrize("command", [["show", "999"], ["replay", "999"], ["discard", "999", "--reason", "x"]])
async def test_an_unknown_entry_id_exits_2(
    command: list[str], database_url: str, sandbox: SandboxServer
) -> None:
    result = await certsync("queue", *command, env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert "999" in result.stderr
    assert puts(sandbox) == []


# replay -----------------------------------------------------------------------------------------------


async def test_queue_replay_sends_the_current_state_and_prints_each_outcome(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    certs = await seed_certifications(pool, 2)
    await set_status(pool, certs, "suspended")
    ids = [await add_entry(pool, cert) for cert in certs]

    result = await certsync(
        "queue", "replay", *map(str, ids), "--by", "ops-on-call", env=cli_env(database_url, sandbox.url)
    )

    assert result.exit_code == 0, result.output
    for entry_id in ids:
        assert f"#{entry_id} replayed (1 call)" in result.stdout
    held = sandbox.sandbox.snapshot()["certifications"]
    assert {held[str(c)]["certification"]["status"] for c in certs} == {"suspended"}
    assert (await RetryQueue(pool).get(ids[0])).last_replayed_by == "ops-on-call"


async def test_queue_replay_records_the_os_user_when_no_name_is_given(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    [cert] = await seed_certifications(pool, 1)
    entry_id = await add_entry(pool, cert)
    result = await certsync("queue", "replay", str(entry_id), env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 0, result.output
    assert (await RetryQueue(pool).get(entry_id)).last_replayed_by == getpass.getuser()


async def test_queue_replay_exits_1_when_a_replay_fails(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=502, times=None, scope="put"),)))
    [cert] = await seed_certifications(pool, 1)
    entry_id = await add_entry(pool, cert)
    result = await certsync("queue", "replay", str(entry_id), env=cli_env(database_url, sandbox.url))
    assert result.exit_code == 1
    assert f"#{entry_id} pending" in result.stdout
    assert "502" in result.stdout


async def test_queue_replay_all_replays_every_pending_entry(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    certs = await seed_certifications(pool, 3)
    pending = [await add_entry(pool, cert) for cert in certs]
    investigated = await add_entry(pool, certs[0], status="requires_investigation")

    result = await certsync("queue", "replay", "--all", env=cli_env(database_url, sandbox.url))

    assert result.exit_code == 0, result.output
    assert "Replay by" in result.stdout
    assert "3 replayed." in result.stdout
    queue = RetryQueue(pool)
    assert [(await queue.get(i)).status for i in pending] == ["replayed"] * 3
    assert (await queue.get(investigated)).status == "requires_investigation"


async def test_queue_replay_refuses_while_the_sync_flag_is_off(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    [cert] = await seed_certifications(pool, 1)
    entry_id = await add_entry(pool, cert)
    env = cli_env(database_url, sandbox.url, CERTSYNC_DYNAMICS_SYNC_ENABLED="false")
    result = await certsync("queue", "replay", str(entry_id), env=env)
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert puts(sandbox) == []


async def test_queue_replay_without_a_portal_names_the_base_url_not_the_flag(
    pool: Pool, database_url: str
) -> None:
    [cert] = await seed_certifications(pool, 1)
    entry_id = await add_entry(pool, cert)
    env = cli_env(database_url)
    del env["CERTSYNC_DYNAMICS_SYNC_ENABLED"]  # never set, as on a first use
    result = await certsync("queue", "replay", str(entry_id), env=env)
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert "CERTSYNC_DYNAMICS_BASE_URL is not set" in result.stderr
    assert "SYNC_ENABLED" not in result.stderr


async def test_queue_replay_all_with_the_circuit_open_says_nothing_was_replayed_once(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    certs = await seed_certifications(pool, 2)
    for cert in certs:
        await add_entry(pool, cert)
    async with pool.connection() as conn:
        await conn.execute(
            "insert into public.dynamics_circuit_breakers (name, state, consecutive_failures, opened_at)"
            " values (%s, 'open', 3, now())"
            " on conflict (name) do update set state = 'open', opened_at = now()",
            (DYNAMICS_BREAKER,),
        )

    result = await certsync("queue", "replay", "--all", env=cli_env(database_url, sandbox.url))

    assert result.exit_code == 1
    assert "Nothing replayed: the circuit is open until" in result.stdout
    assert "nothing to replay" not in result.stdout
    assert "Stopped" not in result.stdout
    assert puts(sandbox) == []


async def test_queue_replay_dry_run_lists_what_would_be_replayed_and_sends_nothing(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    certs = await seed_certifications(pool, 2)
    pending = [await add_entry(pool, cert) for cert in certs]
    done = await add_entry(pool, certs[0], status="replayed")
    env = cli_env(database_url, sandbox.url)

    named = await certsync("queue", "replay", str(pending[0]), str(done), "--dry-run", env=env)
    everything = await certsync("queue", "replay", "--all", "--dry-run", env=env)

    assert named.exit_code == 0, named.output
    assert f"would replay #{pending[0]}" in named.stdout
    assert f"would skip #{done}: already" in named.stdout
    assert "Dry run: 1 entry would be replayed, 1 skipped; nothing was sent or changed." in named.stdout
    assert everything.exit_code == 0, everything.output
    assert "Dry run: 2 entries would be replayed" in everything.stdout
    assert puts(sandbox) == []
    queue = RetryQueue(pool)
    assert [(await queue.get(i)).replay_count for i in pending] == [0, 0]


# discard ----------------------------------------------------------------------------------------------


async def test_queue_discard_keeps_the_entries_with_the_reason(pool: Pool, database_url: str) -> None:
    ids = [await add_entry(pool, None, minutes=m) for m in range(2)]
    result = await certsync(
        "queue", "discard", *map(str, ids), "--reason", "mentor left HLF", "--by", "ops-on-call",
        env=cli_env(database_url),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    queue = RetryQueue(pool)
    for entry_id in ids:
        entry = await queue.get(entry_id)
        assert (entry.status, entry.discarded_reason, entry.discarded_by) == (
            "discarded",
            "mentor left HLF",
            "ops-on-call",
        )


async def test_queue_discard_dry_run_changes_nothing_and_both_warn_about_the_portal(
    pool: Pool, database_url: str
) -> None:
    [cert] = await seed_certifications(pool, 1)
    entry_id = await add_entry(pool, cert)
    env = cli_env(database_url)

    dry = await certsync("queue", "discard", str(entry_id), "--reason", "stale", "--dry-run", env=env)
    assert (await RetryQueue(pool).get(entry_id)).status == "pending"
    real = await certsync("queue", "discard", str(entry_id), "--reason", "stale", env=env)

    assert dry.exit_code == 0, dry.output
    assert f"would discard #{entry_id}" in dry.stdout
    assert "Dry run: 1 entry would be discarded; nothing was changed." in dry.stdout
    assert real.exit_code == 0, real.output
    assert (await RetryQueue(pool).get(entry_id)).status == "discarded"
    for result in (dry, real):
        assert "The portal keeps the state it last received" in result.stderr
        assert "certsync reconcile --repair" in result.stderr


async def test_queue_discard_leaves_a_replayed_entry_as_it_is(pool: Pool, database_url: str) -> None:
    entry_id = await add_entry(pool, None, status="pending")
    async with pool.connection() as conn:
        await conn.execute(
            "update public.dynamics_sync_retry_queue set status = 'replayed' where id = %s", (entry_id,)
        )
    result = await certsync("queue", "discard", str(entry_id), "--reason", "late", env=cli_env(database_url))
    assert result.exit_code == 0
    assert "already replayed" in result.stdout
    assert (await RetryQueue(pool).get(entry_id)).status == "replayed"


# streaming --------------------------------------------------------------------------------------------


def list_json_into(path: Path) -> int:
    """``certsync queue list --json --limit 0`` with stdout going to a file (not kept in memory)."""
    command = typer.main.get_command(cli)
    with path.open("w") as stream, contextlib.redirect_stdout(stream):
        return int(command.main(["queue", "list", "--json", "--limit", "0"], standalone_mode=False) or 0)


ENTRIES = 10_000


@pytest.mark.slow
async def test_queue_list_json_streams_ten_thousand_entries_in_bounded_memory(
    pool: Pool, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed_pending_entries(pool, ENTRIES)
    for name, value in cli_env(database_url).items():
        monkeypatch.setenv(name, value)
    all_at_once = await traced_bytes_of_all_entries(RetryQueue(pool), ENTRIES)
    output = tmp_path / "queue.json"

    gc.collect()
    tracemalloc.start()
    try:
        code = await asyncio.to_thread(list_json_into, output)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert code == 0
    assert len(json.loads(output.read_text())) == ENTRIES
    # Pages of 500 rows (5 % of them) are written as they arrive; holding all 10,000 would cost
    # ``all_at_once`` on its own, so the peak (settings, pool, Typer included) stays under half of it.
    print(f"queue list --json peak {peak / 1e6:.2f} MB; all rows at once {all_at_once / 1e6:.2f} MB")
    assert peak < all_at_once / 2
