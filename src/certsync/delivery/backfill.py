"""Backfill: queue the current state of chosen certifications for delivery (go-live, a restored portal,
a new organisation), one outbox event per certification, merged with any that already waits.

Idempotent: a certification with a waiting event gets no second one, so running it twice queues
nothing the second time while the first run's events wait. It walks the certifications by id in
keyset batches, one INSERT … SELECT each in its own short transaction, and notifies the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

import structlog

from certsync.errors import BadInput
from certsync.store.backfill import (
    Selection,
    backfill_batch,
    organisation_exists,
    selected_count,
    unknown_certifications,
)
from certsync.store.pool import Pool

__all__ = ["BackfillReport", "BackfillService", "Selection", "selection_of"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class BackfillReport:
    selected: int = 0  # certifications the selection names
    queued: int = 0  # events written (dry run: that would be)
    already_waiting: int = 0  # merged with an event that already waits
    dry_run: bool = False


def selection_of(
    *, everything: bool, certification_ids: Sequence[UUID], organisation_id: UUID | None
) -> Selection:
    """Exactly one selector, or BadInput saying so."""
    given = [
        name
        for name, used in (
            ("--all", everything),
            ("--certification", bool(certification_ids)),
            ("--organisation", organisation_id is not None),
        )
        if used
    ]
    if len(given) != 1:
        which = "none was" if not given else " and ".join(given) + " were"
        raise BadInput(f"give exactly one of --all, --certification ID..., --organisation ID ({which} given)")
    return Selection(everything, tuple(dict.fromkeys(certification_ids)), organisation_id)


class BackfillService:
    def __init__(self, pool: Pool, *, batch_size: int = 1000) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._pool = pool
        self._batch_size = batch_size

    async def check(self, selection: Selection) -> int:
        """BadInput naming unknown ids or an unknown organisation; else how many are selected."""
        if selection.certification_ids:
            unknown = await unknown_certifications(self._pool, selection.certification_ids)
            if unknown:
                noun = "certification" if len(unknown) == 1 else "certifications"
                raise BadInput(f"no such {noun}: {', '.join(str(u) for u in unknown)}")
        if selection.organisation_id is not None and not await organisation_exists(
            self._pool, selection.organisation_id
        ):
            raise BadInput(f"no such organisation: {selection.organisation_id}")
        return await selected_count(self._pool, selection)

    async def run(
        self,
        selection: Selection,
        *,
        dry_run: bool = False,
        on_batch: Callable[[int], None] | None = None,
        selected: int | None = None,
    ) -> BackfillReport:
        """Queue (``dry_run``: count) the selection a batch at a time; ``on_batch(chosen)`` after each.
        ``selected``: what ``check`` answered for it already (else it is checked here)."""
        if selected is None:
            selected = await self.check(selection)
        report = BackfillReport(selected=selected, dry_run=dry_run)
        after: UUID | None = None
        while True:
            batch = await backfill_batch(
                self._pool, selection, after=after, limit=self._batch_size, dry_run=dry_run
            )
            report.queued += batch.eligible if dry_run else batch.queued
            report.already_waiting += batch.chosen - batch.eligible
            if on_batch is not None and batch.chosen:
                on_batch(batch.chosen)
            if batch.last_id is None or batch.chosen < self._batch_size:
                break
            after = batch.last_id
        log.info(
            "backfill_finished",
            selected=report.selected,
            queued=report.queued,
            already_waiting=report.already_waiting,
            dry_run=dry_run,
        )
        return report
