"""The composition root: the one place that wires settings, adapters and services together.

Nothing here runs at import; callers enter ``open_pool_for(settings)`` (and, as they arrive, the
service builders) from the CLI, the worker or the console.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from certsync.settings import Settings
from certsync.store.embedded import embedded_database_url
from certsync.store.pool import Pool, open_pool


async def resolve_database_url(settings: Settings) -> str:
    """``CERTSYNC_DATABASE_URL`` when set, else the embedded PostgreSQL (started on first use)."""
    if settings.database_url:
        return settings.database_url
    data_dir = Path(settings.data_dir) if settings.data_dir else None
    return await asyncio.to_thread(embedded_database_url, data_dir)


@asynccontextmanager
async def open_pool_for(settings: Settings, *, max_size: int = 10) -> AsyncIterator[Pool]:
    pool = await open_pool(await resolve_database_url(settings), max_size=max_size)
    try:
        yield pool
    finally:
        await pool.close()
