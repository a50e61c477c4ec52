"""Certifications in PostgreSQL: issue, renew, suspend, reinstate, revoke, expire and read one.

Every change runs in one transaction: lock the row (``for update``), let the pure domain decide,
write one UPDATE. The database owns ``version`` (a BEFORE trigger bumps it on every write) and the
outbox capture (an AFTER trigger), so neither is touched here. Queries: ``sql/certifications.sql``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, tzinfo
from typing import cast
from uuid import UUID

import psycopg
import structlog
from psycopg.types.json import Jsonb

from certsync.domain.certification import (
    RENEWAL_HISTORY_WARNING_THRESHOLD,
    Certification,
    CertificationStatus,
    Operation,
    RenewalEntry,
    issue_status,
)
from certsync.resilience.clock import Clock, SystemClock
from certsync.store.errors import NotFound
from certsync.store.pool import Pool
from certsync.store.queries import query

log = structlog.get_logger(__name__)

_Connection = psycopg.AsyncConnection[dict[str, object]]


class CertificationRepository:
    """Certifications through one pool. Acts with the pool's own role (RLS is not applied here).

    ``zone`` decides what "today" is for the date guards (expiry, reinstatement, issue, renewal):
    pass ``Settings.zone`` so that it agrees with the sweep and the public listing.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        clock: Clock | None = None,
        zone: tzinfo = UTC,
        history_warning_threshold: int = RENEWAL_HISTORY_WARNING_THRESHOLD,
    ) -> None:
        self._pool = pool
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._zone = zone
        self._history_warning_threshold = history_warning_threshold

    async def issue(
        self,
        *,
        peer_mentor_id: UUID,
        valid_from: date,
        valid_until: date,
        certification_type: str = "peer_mentor",
        certification_id: UUID | None = None,
    ) -> Certification:
        """Create an active certification; NotFound if the peer mentor does not exist."""
        status = issue_status(valid_from=valid_from, valid_until=valid_until, today=self._today())
        params = {
            "id": certification_id,
            "peer_mentor_id": peer_mentor_id,
            "certification_type": certification_type,
            "status": status.value,
            "valid_from": valid_from,
            "valid_until": valid_until,
        }
        try:
            async with self._pool.connection() as conn:
                row = await _one(conn, "insert_certification", params)
        except psycopg.errors.ForeignKeyViolation as exc:
            raise NotFound(f"peer mentor {peer_mentor_id} does not exist") from exc
        assert row is not None  # insert … returning always yields the row
        certification = _certification(row)
        log.info(
            "certification_issued",
            certification_id=str(certification.id),
            peer_mentor_id=str(peer_mentor_id),
            version=certification.version,
        )
        return certification

    async def get(self, certification_id: UUID) -> Certification:
        async with self._pool.connection() as conn:
            row = await _one(conn, "get_certification", {"id": certification_id})
        if row is None:
            raise NotFound(f"certification {certification_id} does not exist")
        return _certification(row)

    async def suspend(self, certification_id: UUID) -> Certification:
        return await self._change_status(certification_id, Operation.SUSPEND)

    async def reinstate(self, certification_id: UUID) -> Certification:
        return await self._change_status(certification_id, Operation.REINSTATE)

    async def revoke(self, certification_id: UUID) -> Certification:
        return await self._change_status(certification_id, Operation.REVOKE)

    async def expire(self, certification_id: UUID) -> Certification:
        """Expire one certification whose validity has passed (the sweep does many at once)."""
        return await self._change_status(certification_id, Operation.EXPIRE)

    async def renew(
        self,
        certification_id: UUID,
        *,
        new_valid_until: date,
        renewed_by: UUID,
        note: str | None = None,
    ) -> Certification:
        """Extend validity through ``new_valid_until`` and append an entry; rules: Certification.renewal."""
        async with self._pool.connection() as conn:
            current = await self._lock(conn, certification_id)
            renewal = current.renewal(
                new_valid_until=new_valid_until,
                renewed_by=renewed_by,
                renewed_at=self._clock.now(),
                note=note,
            )
            row = await _one(
                conn,
                "append_certification_renewal",
                {
                    "id": certification_id,
                    "status": renewal.status.value,
                    "valid_until": renewal.valid_until,
                    "entries": Jsonb([renewal.entry.to_json()]),
                },
            )
        assert row is not None  # the row is locked by this transaction: it cannot have gone
        renewed = _certification(row)
        self._log_change(current, renewed, Operation.RENEW)
        renewal_count = cast(int, row["renewal_count"])
        if renewal_count > self._history_warning_threshold:
            log.warning(
                "certification_renewal_history_long",
                certification_id=str(certification_id),
                renewal_count=renewal_count,
                threshold=self._history_warning_threshold,
                see="docs/renewal-history.md",
            )
        return renewed

    async def _change_status(self, certification_id: UUID, operation: Operation) -> Certification:
        async with self._pool.connection() as conn:
            current = await self._lock(conn, certification_id)
            status = current.status_after(operation, today=self._today())
            row = await _one(
                conn, "update_certification_status", {"id": certification_id, "status": status.value}
            )
        assert row is not None  # the row is locked by this transaction: it cannot have gone
        changed = _certification(row)
        self._log_change(current, changed, operation)
        return changed

    async def _lock(self, conn: _Connection, certification_id: UUID) -> Certification:
        row = await _one(conn, "lock_certification", {"id": certification_id})
        if row is None:
            raise NotFound(f"certification {certification_id} does not exist")
        return _certification(row)

    def _now(self) -> datetime:
        return self._clock.now().astimezone(self._zone)

    def _today(self) -> date:
        return self._now().date()

    @staticmethod
    def _log_change(before: Certification, after: Certification, operation: Operation) -> None:
        log.info(
            "certification_changed",
            certification_id=str(after.id),
            operation=operation.value,
            from_status=before.status.value,
            to_status=after.status.value,
            version=after.version,
        )


async def _one(conn: _Connection, name: str, params: Mapping[str, object]) -> dict[str, object] | None:
    cur = await conn.execute(query(name), params)
    return await cur.fetchone()


def _certification(row: Mapping[str, object]) -> Certification:
    history = cast(Sequence[Mapping[str, object]], row["renewal_history"])
    return Certification(
        id=cast(UUID, row["id"]),
        peer_mentor_id=cast(UUID, row["peer_mentor_id"]),
        certification_type=cast(str, row["certification_type"]),
        status=CertificationStatus(cast(str, row["status"])),
        valid_from=cast(date, row["valid_from"]),
        valid_until=cast(date, row["valid_until"]),
        renewal_history=tuple(RenewalEntry.from_json(entry) for entry in history),
        version=cast(int, row["version"]),
    )
