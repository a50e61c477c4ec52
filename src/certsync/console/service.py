"""What an operator can see and do, shared by the HTML pages and the JSON API: one place that reads the
queue, replays and discards (recording who), and resets the breaker.

Input arrives as ``QueueFilterParams`` (one validation for query strings, forms and JSON bodies) and
cursors as opaque strings; a bad value is ``BadInput`` (422), never an error from the database.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID
from zoneinfo import ZoneInfo

import structlog
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from certsync.app import Runtime
from certsync.delivery.history import CertificationHistory, LastReconcile
from certsync.delivery.queue import (
    QueueCursor,
    QueueFilters,
    ReplayResult,
    ReplaySummary,
    RetryEntry,
    RetryEntrySummary,
)
from certsync.delivery.reconcile import ReconcileReport
from certsync.delivery.status import SystemStatus, Transition
from certsync.errors import BadInput

log = structlog.get_logger(__name__)

StatusFilter = Literal["pending", "requires_investigation", "replayed", "discarded"]
ACTIONABLE = ("pending", "requires_investigation")
MAX_SELECTION = 10_000
"""A filtered replay or discard acts on at most this many entries (the confirmation says so)."""

# PostgreSQL text cannot hold NUL: refused as bad input (422) rather than failing in the database.
_NO_NUL = r"^[^\x00]*$"
Reason = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=_NO_NUL)
]


class QueueFilterParams(BaseModel):
    """Queue filters as typed by an operator: empty fields mean "any"; naive times are local time."""

    model_config = ConfigDict(extra="ignore")

    status: StatusFilter | None = None
    operation_type: (
        Annotated[str, StringConstraints(strip_whitespace=True, max_length=100, pattern=_NO_NUL)] | None
    ) = None
    certification_id: UUID | None = None
    created_from: datetime | None = Field(default=None, description="created at or after")
    created_to: datetime | None = Field(default=None, description="created before")

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_any(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _ordered_range(self) -> QueueFilterParams:
        if (
            self.created_from is not None
            and self.created_to is not None
            and (self.created_from.tzinfo is None) == (self.created_to.tzinfo is None)
            and self.created_from >= self.created_to
        ):
            raise ValueError("created_from must be before created_to")
        return self

    def to_filters(self, zone: ZoneInfo) -> QueueFilters:
        def aware(moment: datetime | None) -> datetime | None:
            if moment is None or moment.tzinfo is not None:
                return moment
            return moment.replace(tzinfo=zone)

        return QueueFilters(
            status=self.status,
            operation_type=self.operation_type or None,
            certification_id=self.certification_id,
            created_from=aware(self.created_from),
            created_to=aware(self.created_to),
        )

    def query_items(self) -> list[tuple[str, str]]:
        """The filters as query-string pairs (for links that keep them)."""
        return [(k, v.isoformat() if isinstance(v, datetime) else str(v)) for k, v in self if v is not None]


def encode_cursor(cursor: QueueCursor) -> str:
    raw = f"{cursor.created_at.isoformat()}|{cursor.id}".encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str | None) -> QueueCursor | None:
    if not text:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
        moment, entry_id = raw.split("|")
        created_at = datetime.fromisoformat(moment)
        if created_at.tzinfo is None:
            raise ValueError("naive")
        return QueueCursor(created_at=created_at, id=int(entry_id))
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise BadInput("the page cursor is not one this console made") from None


@dataclass(frozen=True, slots=True)
class QueuePage:
    entries: list[RetryEntrySummary]
    next_cursor: str | None


class ConsoleService:
    """The console's operations over one ``Runtime``; ``by`` is always the signed-in operator's name."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._queue = runtime.queue_service()

    @property
    def zone(self) -> ZoneInfo:
        return self._runtime.settings.zone

    async def status(self) -> SystemStatus:
        return await self._runtime.system_status()

    async def page(self, filters: QueueFilters, cursor: str | None, limit: int) -> QueuePage:
        # One row more than shown says whether there is a next page without a second query.
        rows = await self._queue.page(filters, after=decode_cursor(cursor), limit=limit + 1)
        shown = rows[:limit]
        has_more = len(rows) > limit
        last = shown[-1] if shown else None
        next_cursor = encode_cursor(QueueCursor(last.created_at, last.id)) if has_more and last else None
        return QueuePage(shown, next_cursor)

    async def operation_types(self) -> list[str]:
        return await self._queue.operation_types()

    async def entry(self, entry_id: int) -> RetryEntry:
        return await self._queue.get(entry_id)

    async def replay(self, entry_id: int, *, by: str) -> ReplayResult:
        result = await self._queue.replay(entry_id, by=by)
        log.info("console_replay", entry_id=entry_id, outcome=result.status, operator=by)
        return result

    async def discard(self, entry_id: int, *, reason: str, by: str) -> bool:
        discarded = (await self._queue.discard(entry_id, reason=reason, by=by)).discarded
        log.info("console_discard", entry_id=entry_id, discarded=discarded, operator=by)
        return discarded

    async def selection_size(self, filters: QueueFilters) -> int:
        """How many entries a filtered replay or discard would act on (only pending / investigation)."""
        return min(await self._queue.matching(filters, actionable_only=True), MAX_SELECTION)

    async def replay_selection(self, filters: QueueFilters, *, by: str) -> ReplaySummary:
        summary = ReplaySummary()
        for entry_id in await self._selection_ids(filters):
            summary.add(await self._queue.replay(entry_id, by=by))
        log.info("console_replay_selection", results=summary.results, operator=by)
        return summary

    async def discard_selection(self, filters: QueueFilters, *, reason: str, by: str) -> int:
        discarded = 0
        for entry_id in await self._selection_ids(filters):
            discarded += (await self._queue.discard(entry_id, reason=reason, by=by)).discarded
        log.info("console_discard_selection", discarded=discarded, operator=by)
        return discarded

    async def reset_breaker(self, *, by: str) -> Transition | None:
        transition = await self._runtime.breaker.reset()
        log.info("console_breaker_reset", changed=transition is not None, operator=by)
        return transition

    async def history(self, certification_id: UUID) -> CertificationHistory:
        """One certification's sync history; ``NotFound`` (404) when nothing was ever captured for it."""
        return await self._runtime.history().certification(certification_id)

    async def mentor_history(self, peer_mentor_id: UUID) -> list[CertificationHistory]:
        return await self._runtime.history().mentor(peer_mentor_id)

    async def last_reconcile(self, *, limit: int = 500) -> LastReconcile | None:
        """The last finished reconcile's verdict and (up to ``limit``) its mismatches; None before any."""
        return await self._runtime.history().last_reconcile(limit=limit)

    async def repair(self, *, by: str) -> ReconcileReport:
        """A reconcile with repair, as ``certsync reconcile --repair``: recorded, started by the operator."""
        report = await self._runtime.reconciler().reconcile(repair=True, started_by=f"console {by}")
        log.info(
            "console_reconcile_repair",
            operator=by,
            mismatches=len(report.mismatches),
            repaired=report.repaired,
        )
        return report

    async def _selection_ids(self, filters: QueueFilters) -> list[int]:
        """The ids first, then the actions: acting changes status, which must not move the pages."""
        ids: list[int] = []
        cursor: QueueCursor | None = None
        while len(ids) < MAX_SELECTION:
            limit = min(500, MAX_SELECTION - len(ids))
            rows = await self._queue.page(filters, after=cursor, limit=limit, actionable_only=True)
            ids.extend(row.id for row in rows)
            if len(rows) < limit:
                break
            cursor = QueueCursor(rows[-1].created_at, rows[-1].id)
        return ids
