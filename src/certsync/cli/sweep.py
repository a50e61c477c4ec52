"""``certsync sweep``: expires every certification whose ``valid_until`` has passed, in one statement."""

from __future__ import annotations

from datetime import date
from typing import Annotated

import typer

from certsync import app as composition
from certsync.cli._common import cli, load_settings, out, run


@cli.command()
def sweep(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say how many would expire; change nothing.")
    ] = False,
) -> None:
    """Expire every active certification whose valid_until has passed; the outbox carries each change."""
    settings = load_settings()

    async def work() -> tuple[int, date]:
        async with composition.open_runtime(settings, max_pool_size=1) as rt:
            return (await rt.count_expiring() if dry_run else await rt.expire_due()), rt.today()

    expired, today = run(work)
    noun = "certification" if expired == 1 else "certifications"
    if dry_run:
        out.print(
            f"Dry run: {expired} {noun} would expire (valid_until before {today.isoformat()},"
            f" {settings.timezone}); nothing was changed."
        )
        return
    out.print(
        f"Expired {expired} {noun} whose valid_until is before {today.isoformat()} ({settings.timezone})."
    )
