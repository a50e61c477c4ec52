"""The operator console's signed-in sessions in PostgreSQL (``console_sessions``), shared by every console
process: a session lives while its row does; signing out deletes it, and so does revoking all of them."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from certsync.store.db import fetch
from certsync.store.pool import Pool

__all__ = ["ConsoleSessions"]


class ConsoleSessions:
    """Records sign-ins and answers whether one still holds. Times come from the caller's clock."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def open(self, operator: str, now: datetime, expires_at: datetime) -> str:
        """A new session for ``operator``; its id goes in the signed cookie."""
        rows = await fetch(
            self._pool, "open_console_session", {"operator": operator, "now": now, "expires_at": expires_at}
        )
        return str(rows[0]["id"])

    async def operator_of(self, session_id: str, now: datetime) -> str | None:
        """The operator of a live session; None once it was closed, revoked or has expired."""
        key = _uuid(session_id)
        if key is None:
            return None
        rows = await fetch(self._pool, "live_console_session_operator", {"id": key, "now": now})
        return str(rows[0]["operator"]) if rows else None

    async def close(self, session_id: str) -> None:
        if (key := _uuid(session_id)) is not None:
            await fetch(self._pool, "close_console_session", {"id": key})

    async def close_all(self) -> int:
        """Revoke every session of every console process; how many there were."""
        rows = await fetch(self._pool, "close_every_console_session", {})
        return int(rows[0]["closed"])


def _uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None
