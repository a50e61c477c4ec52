"""Persists the cross-organisation reads that the RLS audit could only announce.

PostgREST runs GET requests in read-only transactions, where the audit cannot insert; the database then
sends a ``certsync_access_audit`` notification carrying the record sealed with a key only the database
owner can read (see ``docs/security.md``). This listener hands each notification back to the database
(``private.record_access_notification``), which checks the seal and stores the record it carries. Nothing
here reads or trusts the payload: anyone may NOTIFY the channel, so a forged, garbled or replayed
notification is simply not recorded, counted in ``rejected``, and the listener carries on. The worker
runs it; a sealed record sent while no listener runs is still in the server log.
"""

from __future__ import annotations

import asyncio

import psycopg
import structlog
from psycopg import AsyncConnection
from psycopg.rows import scalar_row

from certsync.store.errors import first_line
from certsync.store.queries import query

AUDIT_CHANNEL = "certsync_access_audit"

log = structlog.get_logger(__name__)


class AccessAuditRecorder:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.recorded = 0
        self.rejected = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Store every sealed audit notification until ``stop`` is set; reconnect with back-off if dropped."""
        backoff = 0.5
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
                    await conn.execute(f"listen {AUDIT_CHANNEL}")
                    backoff = 0.5
                    while not stop.is_set():
                        # Collected first: the connection is busy while notifies() is being iterated.
                        payloads = [n.payload async for n in conn.notifies(timeout=1.0, stop_after=100)]
                        for payload in payloads:
                            await self._record(conn, payload)
            except psycopg.Error as exc:
                log.warning("access_audit_listener_lost", error=first_line(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _record(self, conn: AsyncConnection[object], payload: str) -> None:
        try:
            async with conn.cursor(row_factory=scalar_row) as cur:
                await cur.execute(query("record_access_notification"), {"token": payload})
                stored = bool(await cur.fetchone())
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise  # the connection is gone: reconnect
            # Whatever a notification holds, it cannot stop the listener (each statement is its own
            # transaction here, so the next one runs on a clean connection).
            self._rejected(reason=first_line(exc))
            return
        if stored:
            self.recorded += 1
        else:
            self._rejected(reason="not a sealed record, or already recorded")

    def _rejected(self, *, reason: str) -> None:
        self.rejected += 1
        # Anyone can send these, so the log is bounded: the 1st, 2nd, 4th, 8th, … rejection is logged.
        if self.rejected & (self.rejected - 1) == 0:
            log.warning("access_audit_notification_rejected", reason=reason, rejected_total=self.rejected)
