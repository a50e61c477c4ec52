"""Seeding and changing certifications for delivery tests: plain SQL as the superuser, as the dashboard
would."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import date
from typing import cast
from uuid import UUID

import psycopg

from certsync.store.pool import Pool


async def seed_certifications(
    pool: Pool, count: int, *, valid_until: date = date(2099, 1, 1), status: str = "active"
) -> list[UUID]:
    """``count`` certifications of one new mentor; each insert is captured as an outbox event."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """
            with u as (insert into auth.users (id) values (gen_random_uuid()) returning id),
                 m as (insert into public.peer_mentors (user_id, display_name)
                       select id, 'Mentor' from u returning id)
            insert into public.certifications (peer_mentor_id, valid_from, valid_until, status)
            select m.id, date '2020-01-01', %s, %s from m, generate_series(1, %s)
            returning id
            """,
            (valid_until, status, count),
        )
        return [cast(UUID, r["id"]) for r in await cur.fetchall()]


@asynccontextmanager
async def rules_disabled(conn: psycopg.AsyncConnection[dict[str, object]]) -> AsyncIterator[None]:
    """The documented repair path (docs/security.md): the owner disables the rules trigger for one
    transaction, to plant rows as they were before the rules or as a data migration writes them."""
    await conn.execute("alter table public.certifications disable trigger certifications_assert_rules")
    yield
    await conn.execute("alter table public.certifications enable trigger certifications_assert_rules")


async def set_status(pool: Pool, certification_ids: list[UUID], status: str) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "update public.certifications set status = %s where id = any(%s)", (status, certification_ids)
        )


async def outbox_statuses(pool: Pool) -> dict[str, int]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select status, count(*) as n from public.certification_sync_events group by status"
        )
        return {str(r["status"]): cast(int, r["n"]) for r in await cur.fetchall()}


async def change_some(pool: Pool, certifications: list[UUID], rng: random.Random, count: int) -> int:
    """One plain-SQL statement changing ``count`` random certifications; returns the rows it changed."""
    if count <= 0:
        return 0
    chosen = rng.sample(certifications, min(count, len(certifications)))
    async with pool.connection() as conn:
        cur = await conn.execute(
            "update public.certifications"
            " set status = case status when 'active' then 'suspended' else 'active' end"
            " where id = any(%s)",
            (chosen,),
        )
        return cur.rowcount


async def seed_pending_entries(pool: Pool, count: int) -> None:
    """``count`` pending entries over ten certifications, with full request bodies, in one statement."""
    certifications = await seed_certifications(pool, 10)
    async with pool.connection() as conn:
        await conn.execute(
            """
            insert into public.dynamics_sync_retry_queue
              (operation_type, certification_id, payload_json, failure_reason, attempt_count, status,
               failure_history)
            select 'certification.status_changed', (%(ids)s::uuid[])[1 + i %% 10],
                   jsonb_build_object('contract_version', 1, 'event_id', gen_random_uuid(),
                                      'occurred_at', now(), 'publicly_listed', true,
                                      'certification', private.certification_sync_state(c)),
                   'retries exhausted: HTTP 503 Service Unavailable after 4 calls', 4, 'pending',
                   jsonb_build_array(jsonb_build_object('at', now(), 'status', 'pending', 'attempts', 4))
            from generate_series(1, %(count)s) as i
            join public.certifications c on c.id = (%(ids)s::uuid[])[1 + i %% 10]
            """,
            {"ids": certifications, "count": count},
        )
