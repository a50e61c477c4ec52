"""``certsync migrate``."""

from __future__ import annotations

from certsync import app as composition
from certsync.cli._common import cli, load_settings, out, run


@cli.command()
def migrate() -> None:
    """Apply supabase/migrations/*.sql (after the local Supabase shims on a plain PostgreSQL). Idempotent."""
    settings = load_settings()
    report = run(lambda: composition.migrate_database(settings))
    if report.shims_applied:
        out.print("Applied the local Supabase shims (roles, auth schema, auth.uid()/auth.jwt()).")
    for name in report.applied:
        out.print(f"[green]applied[/]  {name}")
    out.print(
        f"{len(report.applied)} migration(s) applied, {len(report.already_applied)} already up to date."
    )
