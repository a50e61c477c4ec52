"""Reconcile's side of the database: what the portal should hold, read in bounded memory, the repair
events, and the record of every run (``reconcile_runs``, ``reconcile_mismatches``).

The expected holdings are read through a server-side cursor inside one REPEATABLE READ, read-only
transaction, ``chunk_size`` rows at a time: memory does not grow with the number of certifications,
and every row is of one snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from certsync.store.db import driver_errors, fetch, transaction
from certsync.store.pool import Pool
from certsync.store.queries import query

__all__ = ["ExpectedHolding", "FreshRead", "MismatchRecord", "ReconcileStore", "RunSummary"]

BATCH = 1000
"""Rows per INSERT … SELECT FROM unnest (repair events, recorded mismatches) and per confirm read."""


@dataclass(frozen=True, slots=True)
class ExpectedHolding:
    """What the database says the portal should hold for one certification in scope."""

    certification_id: UUID
    version: int
    status: str
    publicly_listed: bool
    in_transit: bool  # an outbox event of it is still open: the portal may lag it for now


@dataclass(frozen=True, slots=True)
class FreshRead:
    """One id read again: ``expected`` is None when the database has no such certification in scope."""

    certification_id: UUID
    expected: ExpectedHolding | None
    in_transit: bool


@dataclass(frozen=True, slots=True)
class MismatchRecord:
    certification_id: UUID
    kind: str
    portal_version: int | None
    database_version: int | None


@dataclass(frozen=True, slots=True)
class RunSummary:
    """The last finished run that reached a verdict (what the metrics report)."""

    run_id: UUID
    started_at: datetime
    finished_at: datetime
    outcome: str
    counts: dict[str, int]
    in_transit: int
    repaired: int


class ReconcileStore:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def expected(
        self, *, today: date, organisation_id: UUID | None, chunk_size: int = 5000
    ) -> AsyncIterator[ExpectedHolding]:
        """Every certification in scope, ordered by id, ``chunk_size`` rows per fetch from the server."""
        params = {"today": today, "organisation_id": organisation_id}
        with driver_errors("reconcile_expected"):
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("set transaction isolation level repeatable read, read only")
                async with conn.cursor(name="certsync_reconcile", row_factory=tuple_row) as cur:
                    cur.itersize = chunk_size
                    await cur.execute(query("reconcile_expected"), params)
                    while rows := await cur.fetchmany(chunk_size):
                        for cert_id, version, status, listed, in_transit in rows:
                            yield ExpectedHolding(
                                cert_id, int(version), str(status), bool(listed), bool(in_transit)
                            )

    async def confirm(
        self, ids: Sequence[UUID], *, today: date, organisation_id: UUID | None
    ) -> dict[UUID, FreshRead]:
        """A fresh read of just ``ids`` (each its own statement snapshot per batch)."""
        found: dict[UUID, FreshRead] = {}
        for start in range(0, len(ids), BATCH):
            rows = await fetch(
                self._pool,
                "reconcile_confirm",
                {"ids": list(ids[start : start + BATCH]), "today": today, "organisation_id": organisation_id},
            )
            for row in rows:
                cert_id: UUID = row["id"]
                in_transit = bool(row["in_transit"])
                expected = None
                if row["version"] is not None:
                    expected = ExpectedHolding(
                        cert_id,
                        int(row["version"]),
                        str(row["status"]),
                        bool(row["publicly_listed"]),
                        in_transit,
                    )
                found[cert_id] = FreshRead(cert_id, expected, in_transit)
        return found

    async def claim_scheduled_run(
        self, now: datetime, *, interval_seconds: float, started_by: str
    ) -> UUID | None:
        """Start a scheduled run unless one started less than an interval ago (or another worker is
        claiming right now): one per interval across every worker. Two statements in one transaction,
        so the check's snapshot is taken after the lock is held."""
        async with transaction(self._pool, "reconcile_claim") as conn:
            cur = await conn.execute(query("reconcile_try_lock"))
            held = await cur.fetchone()
            if held is None or not held["held"]:
                return None
            cur = await conn.execute(query("reconcile_last_scheduled_start"))
            last = await cur.fetchone()
            last_start = last["started_at"] if last is not None else None
            if last_start is not None and (now - last_start).total_seconds() < interval_seconds:
                return None
            cur = await conn.execute(
                query("reconcile_start_run"), {"now": now, "started_by": started_by, "scheduled": True}
            )
            row = await cur.fetchone()
            assert row is not None
            run_id: UUID = row["id"]
            return run_id

    async def start_run(self, now: datetime, *, started_by: str) -> UUID:
        """An operator's run (``certsync reconcile``): recorded, never skipped."""
        rows = await fetch(
            self._pool, "reconcile_start_run", {"now": now, "started_by": started_by, "scheduled": False}
        )
        run_id: UUID = rows[0]["id"]
        return run_id

    async def finish_run(
        self,
        run_id: UUID,
        now: datetime,
        *,
        mismatches: Sequence[MismatchRecord],
        counts: dict[str, int],
        in_transit: int,
        repair: bool,
    ) -> int:
        """Record the verdict and, with ``repair``, write one repair event per mismatch (batched INSERT …
        SELECT FROM unnest) and wake the workers: one transaction, so the record says what was queued.
        Returns how many repair events were written."""
        repaired = 0
        async with transaction(self._pool, "reconcile_finish_run") as conn:
            for start in range(0, len(mismatches), BATCH):
                batch = mismatches[start : start + BATCH]
                ids = [m.certification_id for m in batch]
                portal_versions = [m.portal_version for m in batch]
                await conn.execute(
                    query("reconcile_record_mismatches"),
                    {
                        "run_id": run_id,
                        "ids": ids,
                        "kinds": [m.kind for m in batch],
                        "portal_versions": portal_versions,
                        "database_versions": [m.database_version for m in batch],
                    },
                )
                if repair:
                    cur = await conn.execute(
                        query("reconcile_repair_events"), {"ids": ids, "portal_versions": portal_versions}
                    )
                    row = await cur.fetchone()
                    repaired += int(row["repaired"]) if row is not None else 0
            if repaired:
                await conn.execute(query("reconcile_notify"))
            await conn.execute(
                query("reconcile_finish_run"),
                {
                    "run_id": run_id,
                    "now": now,
                    "outcome": "mismatches" if mismatches else "agreed",
                    "counts": Jsonb(counts),
                    "in_transit": in_transit,
                    "repaired": repaired,
                    "error": None,
                },
            )
            await conn.execute(query("reconcile_prune_mismatches"))
        return repaired

    async def fail_run(self, run_id: UUID, now: datetime, error: str) -> None:
        await fetch(
            self._pool,
            "reconcile_finish_run",
            {
                "run_id": run_id,
                "now": now,
                "outcome": "failed",
                "counts": Jsonb({}),
                "in_transit": 0,
                "repaired": 0,
                "error": error,
            },
        )

    async def last_finished(self) -> RunSummary | None:
        rows = await fetch(self._pool, "reconcile_last_finished", {})
        if not rows:
            return None
        row: dict[str, Any] = rows[0]
        return RunSummary(
            run_id=row["id"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            outcome=str(row["outcome"]),
            counts={str(k): int(v) for k, v in dict(row["counts"]).items()},
            in_transit=int(row["in_transit"]),
            repaired=int(row["repaired"]),
        )

    async def run_mismatches(self, run_id: UUID, *, limit: int) -> list[MismatchRecord]:
        """One run's recorded mismatches, at most ``limit`` (the console's Reconcile page)."""
        rows = await fetch(self._pool, "reconcile_run_mismatches", {"run_id": run_id, "limit": limit})
        return [
            MismatchRecord(r["certification_id"], r["kind"], r["portal_version"], r["database_version"])
            for r in rows
        ]
