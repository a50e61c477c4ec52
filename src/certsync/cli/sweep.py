"""``certsync sweep``: expires every certification whose ``valid_until`` has passed, in one statement."""

from __future__ import annotations

from datetime import date

from certsync import app as composition
from certsync.cli._common import cli, load_settings, out, run


@cli.command()
def sweep() -> None:
    """Expire every active certification whose valid_until has passed; the outbox carries each change."""
    settings = load_settings()

    async def work() -> tuple[int, date]:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            return await rt.expire_due(), rt.today()

    expired, today = run(work)
    noun = "certification" if expired == 1 else "certifications"
    out.print(
        f"Expired {expired} {noun} whose valid_until is before {today.isoformat()} ({settings.timezone})."
    )
