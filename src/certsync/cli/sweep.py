"""``certsync sweep``: expires every certification whose ``valid_until`` has passed, in one statement."""

from __future__ import annotations

from certsync import app as composition
from certsync.cli._common import cli, load_settings, out, run
from certsync.resilience.clock import SystemClock
from certsync.store.sweep import expire_due
from certsync.worker import today_in


@cli.command()
def sweep() -> None:
    """Expire every active certification whose valid_until has passed; the outbox carries each change."""
    settings = load_settings()
    today = today_in(settings.zone, SystemClock())

    async def work() -> int:
        async with composition.open_pool_for(settings, max_size=1) as pool:
            return await expire_due(pool, today)

    expired = run(work)
    noun = "certification" if expired == 1 else "certifications"
    out.print(
        f"Expired {expired} {noun} whose valid_until is before {today.isoformat()} ({settings.timezone})."
    )
