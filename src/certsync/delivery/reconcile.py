"""Reconcile: proof that the portal's listing equals the database's, and its repair.

Two id-ordered streams are merge-joined — what the portal holds (``Portal.holdings``, paged) and what
the database says it should hold (``ReconcileStore.expected``, a server-side cursor over one snapshot)
— so memory stays bounded in the number of certifications; only the mismatches are kept. Each
mismatch is then confirmed against a fresh read of just those ids: a change that landed during the
scan (its outbox event still open, or already delivered) is neither reported nor repaired.

Kinds, first match wins (docs/listing-truth.md, "Reconcile"):

* ``listed_but_should_not_be`` — the portal lists it publicly; the database says it must not be
  listed (it lacks it, it is outside this portal's scope, or it is not publicly listed there);
* ``unknown_to_database`` — the portal holds it; the database has no such certification in scope;
* ``missing`` — the database has it in scope; the portal lacks it;
* ``stale`` — the portal's version is older, or its status or listing differs.

A certification with an open outbox event is "in transit": the worker is about to correct the portal,
so it is counted apart, never a mismatch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from typing import Any, Protocol, TypeVar
from uuid import UUID

import structlog

from certsync.dynamics.port import Portal, PortalHolding
from certsync.errors import CertsyncError
from certsync.resilience.clock import Clock, Sleep
from certsync.store.reconcile import ExpectedHolding, FreshRead, MismatchRecord, ReconcileStore

__all__ = [
    "KINDS",
    "ExpectedHolding",
    "Mismatch",
    "MismatchKind",
    "PeriodicReconcile",
    "PortalHolding",
    "ReconcileReport",
    "ReconcileStreamError",
    "Reconciler",
    "Scan",
    "classify",
    "confirm",
    "merge",
]

log = structlog.get_logger(__name__)


class MismatchKind(StrEnum):
    LISTED_BUT_SHOULD_NOT_BE = "listed_but_should_not_be"
    UNKNOWN_TO_DATABASE = "unknown_to_database"
    MISSING = "missing"
    STALE = "stale"


KINDS: tuple[MismatchKind, ...] = tuple(MismatchKind)


class ReconcileStreamError(CertsyncError):
    """A side's listing was not strictly ordered by id: a merge over it would report nonsense."""

    exit_code = 1
    http_status = 502


@dataclass(frozen=True, slots=True)
class Mismatch:
    certification_id: UUID
    kind: MismatchKind
    portal: PortalHolding | None
    database: ExpectedHolding | None

    @property
    def portal_version(self) -> int | None:
        return self.portal.version if self.portal is not None else None

    @property
    def database_version(self) -> int | None:
        return self.database.version if self.database is not None else None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "certification_id": str(self.certification_id),
            "kind": str(self.kind),
            "portal_version": self.portal_version,
            "database_version": self.database_version,
        }

    def record(self) -> MismatchRecord:
        return MismatchRecord(
            self.certification_id, str(self.kind), self.portal_version, self.database_version
        )


def classify(portal: PortalHolding | None, database: ExpectedHolding | None) -> MismatchKind | None:
    """The kind of disagreement between the two sides for one id (None: they agree). First match wins."""
    if portal is not None and portal.publicly_listed and (database is None or not database.publicly_listed):
        return MismatchKind.LISTED_BUT_SHOULD_NOT_BE
    if portal is not None and database is None:
        return MismatchKind.UNKNOWN_TO_DATABASE
    if portal is None and database is not None:
        return MismatchKind.MISSING
    if (
        portal is not None
        and database is not None
        and (
            portal.version < database.version
            or portal.status != database.status
            or portal.publicly_listed != database.publicly_listed
        )
    ):
        return MismatchKind.STALE
    return None


@dataclass(slots=True)
class Scan:
    """What one merge found: the mismatches (unconfirmed), and what it skipped or counted."""

    mismatches: list[Mismatch] = field(default_factory=list)
    in_transit: int = 0
    portal_held: int = 0
    database_expected: int = 0


_H = TypeVar("_H", PortalHolding, ExpectedHolding)


async def _ascending(items: AsyncIterator[_H], side: str) -> AsyncGenerator[_H, None]:
    """``items``, checked to be strictly ascending by id; closes ``items`` (its connection, its
    transaction) however the merge ends."""
    previous: UUID | None = None
    try:
        async for item in items:
            if previous is not None and not previous < item.certification_id:
                raise ReconcileStreamError(
                    f"the {side}'s listing is not ordered by id ({item.certification_id} after {previous}):"
                    " reconcile cannot compare it"
                )
            previous = item.certification_id
            yield item
    finally:
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()


async def merge(
    portal: AsyncIterator[PortalHolding],
    database: AsyncIterator[ExpectedHolding],
    *,
    on_progress: Callable[[int], None] | None = None,
    progress_every: int = 1000,
) -> Scan:
    """Merge-join two streams ordered by id (``uuid.UUID`` order: PostgreSQL's uuid order, the
    portal's lower-case byte order). ``on_progress`` gets the number of ids seen so far."""
    scan = Scan()
    seen = 0

    def compare(held: PortalHolding | None, expected: ExpectedHolding | None) -> None:
        nonlocal seen
        seen += 1
        if on_progress is not None and seen % progress_every == 0:
            on_progress(seen)
        if held is not None:
            scan.portal_held += 1
        if expected is not None:
            scan.database_expected += 1
            if expected.in_transit:
                scan.in_transit += 1
                return
        kind = classify(held, expected)
        side = held if held is not None else expected
        if kind is not None and side is not None:
            scan.mismatches.append(Mismatch(side.certification_id, kind, held, expected))

    async with (
        aclosing(_ascending(portal, "portal")) as portal_items,
        aclosing(_ascending(database, "database")) as database_items,
    ):
        held = await anext(portal_items, None)
        expected = await anext(database_items, None)
        while held is not None or expected is not None:
            if expected is None or (held is not None and held.certification_id < expected.certification_id):
                compare(held, None)
                held = await anext(portal_items, None)
            elif held is None or expected.certification_id < held.certification_id:
                compare(None, expected)
                expected = await anext(database_items, None)
            else:
                compare(held, expected)
                held = await anext(portal_items, None)
                expected = await anext(database_items, None)
    if on_progress is not None:
        on_progress(seen)
    return scan


def confirm(found: Sequence[Mismatch], fresh: Mapping[UUID, FreshRead]) -> tuple[list[Mismatch], int]:
    """Keep the mismatches a fresh read of the database still shows; returns them and how many are in
    transit now (a change that landed during the scan: its outbox event is open)."""
    kept: list[Mismatch] = []
    in_transit = 0
    for mismatch in found:
        read = fresh.get(mismatch.certification_id)
        expected = read.expected if read is not None else None
        if read is not None and read.in_transit:
            in_transit += 1
            continue
        kind = classify(mismatch.portal, expected)
        if kind is not None:
            kept.append(Mismatch(mismatch.certification_id, kind, mismatch.portal, expected))
    return kept, in_transit


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    run_id: UUID
    mismatches: tuple[Mismatch, ...]
    in_transit: int
    repaired: int
    portal_held: int
    database_expected: int

    @property
    def agreed(self) -> bool:
        return not self.mismatches

    @property
    def counts(self) -> dict[str, int]:
        counts = {str(kind): 0 for kind in KINDS}
        for mismatch in self.mismatches:
            counts[str(mismatch.kind)] += 1
        return counts

    def to_json_dict(self) -> dict[str, Any]:
        """The pinned object (interface.md section 1), plus ``in_transit`` at the top level."""
        return {
            "mismatches": [m.to_json_dict() for m in self.mismatches],
            "counts": self.counts,
            "in_transit": self.in_transit,
        }


class Reconciler:
    """One reconcile: scan, confirm, record the run and (``repair``) queue the corrections."""

    def __init__(
        self,
        portal: Portal,
        store: ReconcileStore,
        *,
        clock: Clock,
        today: Callable[[], date],
        organisation_id: UUID | None,
        page_size: int = 1000,
        chunk_size: int = 5000,
    ) -> None:
        self._portal = portal
        self._store = store
        self._clock = clock
        self._today = today
        self._organisation_id = organisation_id
        self._page_size = page_size
        self._chunk_size = chunk_size

    async def reconcile(
        self, *, repair: bool, started_by: str, on_progress: Callable[[int], None] | None = None
    ) -> ReconcileReport:
        """An operator's reconcile (``certsync reconcile``): always runs, recorded in ``reconcile_runs``."""
        run_id = await self._store.start_run(self._clock.now(), started_by=started_by)
        return await self._run(run_id, repair=repair, on_progress=on_progress)

    async def reconcile_if_due(self, *, interval_seconds: float, started_by: str) -> ReconcileReport | None:
        """A worker's scheduled reconcile, with repair, unless another worker ran one this interval."""
        run_id = await self._store.claim_scheduled_run(
            self._clock.now(), interval_seconds=interval_seconds, started_by=started_by
        )
        if run_id is None:
            return None
        return await self._run(run_id, repair=True, on_progress=None)

    async def _run(
        self, run_id: UUID, *, repair: bool, on_progress: Callable[[int], None] | None
    ) -> ReconcileReport:
        today = self._today()
        try:
            scan = await merge(
                self._portal.holdings(page_size=self._page_size),
                self._store.expected(
                    today=today, organisation_id=self._organisation_id, chunk_size=self._chunk_size
                ),
                on_progress=on_progress,
            )
            fresh = await self._store.confirm(
                [m.certification_id for m in scan.mismatches],
                today=today,
                organisation_id=self._organisation_id,
            )
            mismatches, moved = confirm(scan.mismatches, fresh)
            report = ReconcileReport(
                run_id=run_id,
                mismatches=tuple(mismatches),
                in_transit=scan.in_transit + moved,
                repaired=0,
                portal_held=scan.portal_held,
                database_expected=scan.database_expected,
            )
            repaired = await self._store.finish_run(
                run_id,
                self._clock.now(),
                mismatches=[m.record() for m in mismatches],
                counts=report.counts,
                in_transit=report.in_transit,
                repair=repair,
            )
        except Exception as exc:
            try:
                await self._store.fail_run(run_id, self._clock.now(), _one_line(exc))
            except Exception as record_error:  # the database may be what failed
                log.warning("reconcile_run_not_recorded", run_id=str(run_id), error=_one_line(record_error))
            raise
        finished = ReconcileReport(
            run_id=run_id,
            mismatches=report.mismatches,
            in_transit=report.in_transit,
            repaired=repaired,
            portal_held=report.portal_held,
            database_expected=report.database_expected,
        )
        log.info(
            "reconcile_finished",
            run_id=str(run_id),
            portal_held=finished.portal_held,
            database_expected=finished.database_expected,
            in_transit=finished.in_transit,
            repaired=finished.repaired,
            **{f"mismatches_{kind}": n for kind, n in finished.counts.items()},
        )
        return finished


class _ScheduledReconciler(Protocol):
    async def reconcile_if_due(
        self, *, interval_seconds: float, started_by: str
    ) -> ReconcileReport | None: ...


class PeriodicReconcile:
    """A worker companion: reconciles and repairs every ``interval_seconds``, one worker per interval.

    A failed reconcile (the portal down, the database away) is logged and tried again an interval
    later; it never ends this loop, so it never stops the worker. Clock and sleep are injected.
    """

    def __init__(
        self,
        reconciler: _ScheduledReconciler,
        *,
        interval_seconds: float,
        sleep: Sleep,
        started_by: str,
        check_seconds: float | None = None,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive (0 means: build no PeriodicReconcile)")
        self._reconciler = reconciler
        self._interval = interval_seconds
        self._sleep = sleep
        self._started_by = started_by
        # Checking more often than the interval keeps one run per interval when several workers take
        # turns; the claim, not this loop, decides whether a run is due.
        self._check = check_seconds if check_seconds is not None else min(interval_seconds, 60.0)
        self.runs = 0
        self.failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                report = await self._reconciler.reconcile_if_due(
                    interval_seconds=self._interval, started_by=self._started_by
                )
                if report is not None:
                    self.runs += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged and retried next interval: never fatal to the worker
                self.failures += 1
                log.error("reconcile_failed", error=_one_line(exc), retry_in_seconds=self._interval)
            await self._pause(stop, self._check)

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        if stop.is_set():
            return
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            stopping.cancel()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
