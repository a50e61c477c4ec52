"""The normalised renewal history, ``certification_renewal_events``: install it, fill it from the JSONB
histories in resumable batches, and check that both agree. Queries: ``sql/renewal_events.sql``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import structlog

from certsync.store.db import fetch
from certsync.store.pool import Pool

log = structlog.get_logger(__name__)

DEFAULT_BATCH_SIZE = 1000
"""Certifications per batch: each batch is one short transaction that locks only the rows it inserts."""


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    """Where the backfill stands: it has scanned every certification up to ``after_id``."""

    after_id: UUID
    finished: bool
    total_entries: int
    entries_done: int

    @property
    def resumes(self) -> bool:
        """An earlier run committed at least one batch: this one carries on after it."""
        return self.after_id != UUID(int=0)


@dataclass(frozen=True, slots=True)
class Batch:
    """One committed batch: the certifications it scanned, the entries it read and those it copied."""

    last_id: UUID | None
    certifications: int
    entries_read: int
    entries_copied: int
    finished: bool


@dataclass(frozen=True, slots=True)
class Agreement:
    """``events`` rows in the table; ``mismatched``: certifications whose JSONB holds another number."""

    events: int
    mismatched: int


@dataclass(frozen=True, slots=True)
class BackfillReport:
    started: BackfillProgress
    batches: int
    certifications: int
    entries_read: int
    entries_copied: int


async def install(pool: Pool, *, restart: bool = False) -> BackfillProgress:
    """Create the table, its policy, the copy triggers and the backfill mark (idempotent)."""
    await fetch(pool, "install_renewal_events", None)
    if restart:
        await fetch(pool, "restart_renewal_events_backfill", {})
    return await progress(pool)


async def progress(pool: Pool) -> BackfillProgress:
    [row] = await fetch(pool, "renewal_events_backfill_progress", {})
    return BackfillProgress(
        after_id=row["after_id"],
        finished=bool(row["finished"]),
        total_entries=int(row["total_entries"]),
        entries_done=int(row["entries_done"]),
    )


async def copy_batch(pool: Pool, batch_size: int = DEFAULT_BATCH_SIZE) -> Batch:
    """Copy the entries of the next ``batch_size`` certifications, and move the mark past them."""
    [row] = await fetch(pool, "copy_renewal_events_batch", {"batch_size": batch_size})
    return Batch(
        last_id=row["last_id"],
        certifications=int(row["certifications"]),
        entries_read=int(row["entries_read"]),
        entries_copied=int(row["entries_copied"]),
        finished=bool(row["finished"]),
    )


async def backfill(
    pool: Pool,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    restart: bool = False,
    on_batch: Callable[[Batch], None] | None = None,
) -> BackfillReport:
    """Install, then copy batch after batch until every certification has been scanned.

    Resumes after the last committed batch of an earlier run (``restart``: from the first
    certification again). ``on_batch`` hears of each batch once it is committed.
    """
    started = await install(pool, restart=restart)
    batches = certifications = entries_read = entries_copied = 0
    finished = started.finished
    while not finished:
        batch = await copy_batch(pool, batch_size)
        batches += 1
        certifications += batch.certifications
        entries_read += batch.entries_read
        entries_copied += batch.entries_copied
        finished = batch.finished
        log.debug(
            "renewal_events_batch",
            last_id=str(batch.last_id) if batch.last_id else None,
            certifications=batch.certifications,
            entries_copied=batch.entries_copied,
        )
        if on_batch is not None:
            on_batch(batch)
    report = BackfillReport(started, batches, certifications, entries_read, entries_copied)
    log.info(
        "renewal_events_backfilled",
        batches=batches,
        certifications=certifications,
        entries_copied=entries_copied,
        resumed=started.resumes,
    )
    return report


async def agreement(pool: Pool) -> Agreement:
    [row] = await fetch(pool, "renewal_events_agreement", {})
    return Agreement(events=int(row["events"]), mismatched=int(row["mismatched"]))
