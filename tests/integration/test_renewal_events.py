"""``certsync renewal-events migrate``: the normalised table filled from the JSONB histories in resumable
batches, kept in step by its trigger afterwards, and visible exactly when its certification is."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, cast
from uuid import UUID

import psycopg
import pytest
from psycopg.types.json import Jsonb

from certsync.resilience.testing import ManualClock
from certsync.store import renewal_events
from certsync.store.certifications import CertificationRepository
from certsync.store.pool import Pool
from certsync.store.renewal_events import Batch
from tests.support.cli import UNREACHABLE_DATABASE, assert_one_line_error, certsync, cli_env
from tests.support.rls import TwoOrganisations, as_user
from tests.support.rule_cases import entry

pytestmark = pytest.mark.integration

COORDINATOR = UUID("00000000-0000-4000-8000-00000000c001")


async def seed_histories(pool: Pool, certifications: int, entries_each: int) -> None:
    """``certifications`` certifications of one mentor with ``entries_each`` v1 entries each, in one
    statement; each entry different (time, dates, a note on every third)."""
    async with pool.connection() as conn:
        await conn.execute(
            """
            with u as (insert into auth.users (id) select gen_random_uuid() returning id),
                 m as (insert into public.peer_mentors (user_id, display_name)
                       select id, 'Mentor' from u returning id, user_id)
            insert into public.certifications (peer_mentor_id, valid_from, valid_until, renewal_history)
            select m.id, date '2000-01-01', date '2000-01-01' + %(each)s * 30 + 30,
                   (select coalesce(jsonb_agg(jsonb_build_object(
                      'schema_version', 1,
                      'renewed_at', to_char(
                        (timestamptz '2000-01-01 00:00+00' + (g * 1000 + i) * interval '1 minute')
                          at time zone 'UTC',
                        'YYYY-MM-DD"T"HH24:MI:SS"+00:00"'),
                      'previous_valid_until', (date '2000-01-01' + (i - 1) * 30)::text,
                      'new_valid_until', (date '2000-01-01' + i * 30)::text,
                      'renewed_by', m.user_id::text,
                      'note', case when i %% 3 = 0 then 'course ' || g || '/' || i end) order by i), '[]')
                    from generate_series(1, %(each)s) as i)
            from m, generate_series(1, %(certifications)s) as g
            """,
            {"each": entries_each, "certifications": certifications},
        )


async def disagreements(pool: Pool) -> int:
    """Entries present on one side only, or whose fields differ between the JSONB and the table."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """
            with j as (
              select c.id, e.ordinal, e.entry
              from public.certifications c
              cross join lateral jsonb_array_elements(c.renewal_history) with ordinality as e (entry, ordinal)
            )
            select count(*) as n
            from j full join public.certification_renewal_events r
              on r.certification_id = j.id and r.ordinal = j.ordinal
            where j.id is null or r.certification_id is null
               or ((j.entry ->> 'schema_version')::int, (j.entry ->> 'renewed_at')::timestamptz,
                   (j.entry ->> 'previous_valid_until')::date, (j.entry ->> 'new_valid_until')::date,
                   (j.entry ->> 'renewed_by')::uuid, j.entry ->> 'note')
                  is distinct from
                  (r.schema_version, r.renewed_at, r.previous_valid_until, r.new_valid_until,
                   r.renewed_by, r.note)
            """
        )
        row = await cur.fetchone()
    assert row is not None
    return cast(int, row["n"])


async def events_count(pool: Pool) -> int:
    return (await renewal_events.agreement(pool)).events


@pytest.mark.slow
async def test_migrate_copies_100k_entries_and_the_table_agrees_with_the_jsonb(
    pool: Pool, database_url: str
) -> None:
    await seed_histories(pool, 1000, 100)

    result = await certsync("renewal-events", "migrate", "--batch-size", "100", env=cli_env(database_url))

    assert result.exit_code == 0, result.output
    assert "Copied 100000 renewal entries from 1000 certifications in 11 batches." in result.stdout
    assert "holds 100000 entries and agrees with renewal_history" in result.stdout
    assert await disagreements(pool) == 0
    assert await renewal_events.agreement(pool) == renewal_events.Agreement(events=100_000, mismatched=0)


async def test_an_interrupted_migration_resumes_after_its_last_batch_and_copies_nothing_twice(
    pool: Pool, database_url: str
) -> None:
    await seed_histories(pool, 50, 4)

    def interrupt(batch: Batch) -> None:
        raise KeyboardInterrupt  # as Ctrl-C between two batches

    with pytest.raises(KeyboardInterrupt):
        await renewal_events.backfill(pool, batch_size=10, on_batch=interrupt)
    assert await events_count(pool) == 40
    stopped = await renewal_events.progress(pool)
    assert (stopped.entries_done, stopped.total_entries, stopped.finished) == (40, 200, False)

    result = await certsync("renewal-events", "migrate", "--batch-size", "10", env=cli_env(database_url))

    assert result.exit_code == 0, result.output
    # 40 certifications left: four full batches and the empty one that finds the end.
    assert (
        "Copied 160 renewal entries from 40 certifications in 5 batches (resumed after an earlier run)."
        in (result.stdout)
    )
    assert await disagreements(pool) == 0
    again = await certsync("renewal-events", "migrate", env=cli_env(database_url))
    assert again.exit_code == 0, again.output
    assert "already finished" in again.stdout
    restarted = await certsync("renewal-events", "migrate", "--restart", env=cli_env(database_url))
    assert "Copied 0 renewal entries from 50 certifications in 1 batches." in restarted.stdout
    assert await events_count(pool) == 200


async def test_after_the_migration_every_append_is_mirrored(
    pool: Pool, database_url: str, superuser: psycopg.Connection[Any]
) -> None:
    clock = ManualClock()
    today = clock.now().date()
    repository = CertificationRepository(pool, clock=clock)
    await seed_histories(pool, 3, 2)
    result = await certsync("renewal-events", "migrate", env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    async with pool.connection() as conn:
        cur = await conn.execute("select id, peer_mentor_id from public.certifications order by id limit 1")
        first = await cur.fetchone()
    assert first is not None

    renewed = await repository.renew(
        cast(UUID, first["id"]),
        new_valid_until=today + timedelta(days=400),
        renewed_by=COORDINATOR,
        note="refresher",
    )
    end = today + timedelta(days=30)
    superuser.execute(
        "insert into public.certifications (peer_mentor_id, valid_from, valid_until, renewal_history)"
        " values (%s, %s, %s, %s)",
        (first["peer_mentor_id"], date(2020, 1, 1), end, Jsonb([entry(date(2020, 1, 1), end)])),
    )

    rows = superuser.execute(
        "select ordinal, renewed_by, note, new_valid_until from public.certification_renewal_events"
        " where certification_id = %s order by ordinal",
        (renewed.id,),
    ).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[2][1:] == (COORDINATOR, "refresher", today + timedelta(days=400))
    assert await disagreements(pool) == 0
    assert await renewal_events.agreement(pool) == renewal_events.Agreement(
        events=3 * 2 + 1 + 1, mismatched=0
    )


async def test_renewal_events_are_visible_exactly_when_their_certification_is(
    pool: Pool, api: psycopg.Connection[Any], world: TwoOrganisations
) -> None:
    await renewal_events.backfill(pool)
    end = date.today() + timedelta(days=400)
    with as_user(api, world.coordinator_a1) as c:  # a renewal through the API lands in the table too
        c.execute(
            "update public.certifications set valid_until = %s, renewal_history = renewal_history || %s"
            " where id = %s",
            (end, Jsonb([entry(date(2027, 1, 1), end)]), world.cert_a1),
        )
    with as_user(api, world.coordinator_a1) as c:
        mine = c.execute("select certification_id from public.certification_renewal_events").fetchall()
    with as_user(api, world.coordinator_b1) as c:
        theirs = c.execute("select certification_id from public.certification_renewal_events").fetchall()
    with as_user(api, world.mentor_a1.user_id) as c:
        own = c.execute("select certification_id from public.certification_renewal_events").fetchall()
    assert (mine, theirs, own) == ([(world.cert_a1,)], [], [(world.cert_a1,)])
    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_user(api, world.coordinator_a1) as c:
        c.execute("delete from public.certification_renewal_events")


async def test_migrate_exits_1_when_the_database_is_unreachable_and_2_on_a_bad_batch_size(
    database_url: str,
) -> None:
    unreachable = await certsync("renewal-events", "migrate", env=cli_env(UNREACHABLE_DATABASE))
    assert unreachable.exit_code == 1
    assert_one_line_error(unreachable)
    bad = await certsync("renewal-events", "migrate", "--batch-size", "0", env=cli_env(database_url))
    assert bad.exit_code == 2
    assert_one_line_error(bad)
    assert "--batch-size" in bad.stderr
