"""Memory yardsticks for the bounded-memory tests (tracemalloc)."""

from __future__ import annotations

import gc
import tracemalloc

from certsync.store.retry_queue import RetryQueue


async def traced_bytes_of_all_entries(queue: RetryQueue, count: int) -> int:
    """What holding every entry at once would take: the yardstick a streamed replay must stay well under."""
    gc.collect()
    tracemalloc.start()
    try:
        rows = await queue.list_entries(status="pending", limit=count)
        held, _ = tracemalloc.get_traced_memory()
        assert len(rows) == count
    finally:
        tracemalloc.stop()
    return held
