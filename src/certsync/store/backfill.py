"""``certsync backfill`` in the database: one keyset batch of chosen certifications queued as outbox
events per statement (``store/sql/backfill.sql``), and the checks of a selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from certsync.store.db import fetch, transaction
from certsync.store.pool import Pool
from certsync.store.queries import query


@dataclass(frozen=True, slots=True)
class Selection:
    """Which certifications: every one, these ids, or those of one organisation's peer mentors."""

    everything: bool = False
    certification_ids: tuple[UUID, ...] = ()
    organisation_id: UUID | None = None

    def params(self) -> dict[str, Any]:
        return {
            "everything": self.everything,
            "ids": list(self.certification_ids),
            "organisation_id": self.organisation_id,
        }


@dataclass(frozen=True, slots=True)
class BackfillBatch:
    last_id: UUID | None  # None: nothing was left to choose
    chosen: int
    eligible: int  # chosen and without a waiting event
    queued: int  # eligible and written (0 on a dry run)


async def backfill_batch(
    pool: Pool, selection: Selection, *, after: UUID | None, limit: int, dry_run: bool
) -> BackfillBatch:
    """One batch in its own transaction; the workers are notified when it queued anything."""
    params = selection.params() | {"after": after, "limit": limit, "dry_run": dry_run}
    async with transaction(pool, "backfilling the outbox") as conn:
        cur = await conn.execute(query("backfill_batch"), params)
        row = await cur.fetchone()
        assert row is not None
        batch = BackfillBatch(**dict(row))
        if batch.queued:
            await conn.execute(query("backfill_notify"))
    return batch


async def selected_count(pool: Pool, selection: Selection) -> int:
    rows = await fetch(pool, "backfill_selected_count", selection.params())
    return int(rows[0]["selected"])


async def unknown_certifications(pool: Pool, ids: tuple[UUID, ...]) -> list[UUID]:
    """The ids of ``ids`` that name no certification, in the order given."""
    rows = await fetch(pool, "backfill_unknown_certifications", {"ids": list(ids)})
    return [UUID(str(r["id"])) for r in rows]


async def organisation_exists(pool: Pool, organisation_id: UUID) -> bool:
    rows = await fetch(pool, "backfill_organisation_exists", {"organisation_id": organisation_id})
    return bool(rows[0]["found"])
