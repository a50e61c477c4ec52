"""The expiry sweep: expires every active certification whose ``valid_until`` has passed, in one
statement. It bypasses the per-row domain call on purpose: the rule (active and past its end date →
expired) is the domain's ``expire`` transition applied to a set, and the trigger captures each row."""

from __future__ import annotations

from datetime import date

from certsync.store.db import fetch
from certsync.store.pool import Pool


async def expire_due(pool: Pool, today: date) -> int:
    """Expire every active certification with ``valid_until < today``; returns how many."""
    rows = await fetch(pool, "expire_due_certifications", {"today": today})
    return int(rows[0]["expired"])


async def count_due(pool: Pool, today: date) -> int:
    """How many ``expire_due`` would expire now; changes nothing."""
    rows = await fetch(pool, "count_due_certifications", {"today": today})
    return int(rows[0]["due"])


async def next_expiry(pool: Pool) -> date | None:
    """The earliest ``valid_until`` of an active certification (it expires the day after)."""
    rows = await fetch(pool, "next_expiry", {})
    value = rows[0]["valid_until"]
    return value if isinstance(value, date) else None
