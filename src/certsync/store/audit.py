"""Persists cross-organisation reads that the RLS audit could only announce.

PostgREST runs GET requests in read-only transactions, where the audit cannot insert; it sends a
``certsync_access_audit`` notification instead (see ``docs/security.md``). This listener stores
each one through ``private.record_cross_organisation_read``. The worker runs it; a notification sent
while no listener runs is still in the server log.
"""

from __future__ import annotations

import asyncio

import psycopg
import structlog

from certsync.store.errors import first_line

AUDIT_CHANNEL = "certsync_access_audit"

log = structlog.get_logger(__name__)


class AccessAuditRecorder:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.recorded = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Store every audit notification until ``stop`` is set; reconnect with back-off if dropped."""
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
                            await conn.execute(
                                "select private.record_cross_organisation_read(%s::jsonb)", (payload,)
                            )
                        self.recorded += len(payloads)
            except psycopg.Error as exc:
                log.warning("access_audit_listener_lost", error=first_line(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
