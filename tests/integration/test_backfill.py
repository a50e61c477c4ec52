"""``certsync backfill`` against real PostgreSQL and the sandbox: certifications written with the capture
triggers bypassed (no event was captured, as for rows that predate certsync or a restored portal) are
queued and delivered by ``worker --once``."""

from __future__ import annotations

import uuid
from typing import Any
from uuid import UUID

import pytest

from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from tests.support.cli import assert_one_line_error, certsync, cli_env
from tests.support.runtime import puts

pytestmark = pytest.mark.integration

BACKFILLED = "certification.backfilled"


async def plant_without_capture(pool: Pool, mentors: int, per_mentor: int) -> dict[str, Any]:
    """Two organisations with a chapter each; ``mentors`` peer mentors in the first, one in the second,
    each with ``per_mentor`` certifications, all written as a replica would (no trigger fires)."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        org_a, org_b = uuid.uuid4(), uuid.uuid4()
        chapter_a, chapter_b = uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "insert into public.organisations (id, name) values (%s, 'A'), (%s, 'B')", (org_a, org_b)
        )
        await conn.execute(
            "insert into public.chapters (id, organisation_id, name) values (%s, %s, 'a'), (%s, %s, 'b')",
            (chapter_a, org_a, chapter_b, org_b),
        )
        cur = await conn.execute(
            """
            with u as (
              insert into auth.users (id) select gen_random_uuid() from generate_series(1, %(n)s + 1)
              returning id),
            numbered as (select id, row_number() over (order by id) as n from u),
            ms as (
              insert into public.chapter_memberships (user_id, chapter_id, role)
              select id, case when n <= %(n)s then %(a)s::uuid else %(b)s::uuid end, 'peer_mentor'
              from numbered returning user_id),
            pm as (
              insert into public.peer_mentors (user_id, display_name)
              select id, 'Mentor' from numbered returning id, user_id)
            insert into public.certifications (peer_mentor_id, valid_from, valid_until, status)
            select pm.id, date '2020-01-01', date '2099-01-01', 'active'
            from pm, generate_series(1, %(per)s)
            returning id, peer_mentor_id
            """,
            {"n": mentors, "a": chapter_a, "b": chapter_b, "per": per_mentor},
        )
        certifications = [dict(r) for r in await cur.fetchall()]
        cur = await conn.execute(
            """
            select c.id from public.certifications c
            join public.peer_mentors pm on pm.id = c.peer_mentor_id
            join public.chapter_memberships m on m.user_id = pm.user_id
            where m.chapter_id = %s
            """,
            (chapter_b,),
        )
        in_b = {r["id"] for r in await cur.fetchall()}
    return {"org_a": org_a, "org_b": org_b, "all": {c["id"] for c in certifications}, "in_b": in_b}


async def events(pool: Pool) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select certification_id, certification_version, operation_type, status, state"
            " from public.certification_sync_events"
        )
        return [dict(r) for r in await cur.fetchall()]


async def test_backfill_all_queues_every_certification_once_and_the_worker_delivers_them(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    planted = await plant_without_capture(pool, mentors=4, per_mentor=420)  # 2100: three batches
    assert await events(pool) == []
    env = cli_env(database_url, sandbox.url)

    dry = await certsync("backfill", "--all", "--dry-run", env=env)
    assert dry.exit_code == 0, dry.output
    assert "Would queue 2100 certifications" in dry.stdout
    assert await events(pool) == []

    first = await certsync("backfill", "--all", env=env)
    assert first.exit_code == 0, first.output
    assert "Queued 2100 certifications" in first.stdout
    queued = await events(pool)
    assert len(queued) == 2100
    assert {e["certification_id"] for e in queued} == planted["all"]
    assert {(e["operation_type"], e["status"], e["certification_version"]) for e in queued} == {
        (BACKFILLED, "waiting", 1)
    }
    assert all(e["state"]["id"] == str(e["certification_id"]) for e in queued)

    # Idempotent: while the first run's events wait, a second queues nothing.
    second = await certsync("backfill", "--all", env=env)
    assert second.exit_code == 0, second.output
    assert "Queued 0 certifications" in second.stdout
    assert "2100 certifications already waiting" in second.stdout
    assert len(await events(pool)) == 2100

    worker = await certsync("worker", "--once", env=env)
    assert worker.exit_code == 0, worker.output
    assert {e["status"] for e in await events(pool)} == {"delivered"}
    assert set(sandbox.sandbox.snapshot()["certifications"]) == {str(c) for c in planted["all"]}
    assert len(puts(sandbox)) == 2100


async def test_backfill_by_organisation_and_by_id(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    planted = await plant_without_capture(pool, mentors=2, per_mentor=3)
    env = cli_env(database_url, sandbox.url)

    by_org = await certsync("backfill", "--organisation", str(planted["org_b"]), env=env)
    assert by_org.exit_code == 0, by_org.output
    assert {e["certification_id"] for e in await events(pool)} == planted["in_b"]

    some = sorted(planted["all"] - planted["in_b"])[:2]
    by_id = await certsync("backfill", "--certification", str(some[0]), str(some[1]), env=env)
    assert by_id.exit_code == 0, by_id.output
    assert "Queued 2 certifications" in by_id.stdout
    assert {e["certification_id"] for e in await events(pool)} == planted["in_b"] | set(some)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "give exactly one of"),
        (("--all", "--organisation", str(UUID(int=1))), "--all and --organisation were given"),
        (("--certification", "not-a-uuid"), "is not a certification id"),
    ],
)
async def test_a_bad_selection_exits_2_with_one_line(
    database_url: str, args: tuple[str, ...], says: str
) -> None:
    result = await certsync("backfill", *args, env=cli_env(database_url))
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert says in result.stderr


async def test_unknown_ids_exit_2_naming_them_and_queue_nothing(pool: Pool, database_url: str) -> None:
    planted = await plant_without_capture(pool, mentors=1, per_mentor=1)
    known = sorted(planted["all"])[0]
    missing = [UUID(int=7), UUID(int=9)]
    result = await certsync(
        "backfill", "--certification", str(known), str(missing[0]), str(missing[1]), env=cli_env(database_url)
    )
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert f"{missing[0]}, {missing[1]}" in result.stderr
    assert str(known) not in result.stderr
    assert await events(pool) == []

    unknown_org = await certsync("backfill", "--organisation", str(UUID(int=5)), env=cli_env(database_url))
    assert unknown_org.exit_code == 2
    assert "no such organisation" in unknown_org.stderr
