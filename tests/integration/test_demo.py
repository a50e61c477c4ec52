"""`certsync demo`, the main job, end to end on the test server (its own certsync_demo database)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import certsync.cli.demo  # noqa: F401  (registers the command)
from certsync.cli import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_every_path_and_ends_with_a_listing_that_matches_the_database(
    pg_admin_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTSYNC_DATABASE_URL", pg_admin_url)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["demo"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    output = result.output
    assert "matches the database" in output
    assert "closed → open, open → half_open, half_open → closed" in output
    for row in (
        "certifications expired by the sweep",
        "queued for replay (pending)",
        "replayed from the queue",
        "needing investigation (4xx)",
    ):
        line = next(line for line in output.splitlines() if row in line)
        assert int(line.rstrip(" │").split()[-1]) >= 1, line
    assert "certsync queue list" in output
    log = (tmp_path / "certsync" / "log" / "certsync-demo.log").read_text()
    assert '"event": "circuit_transition"' in log
    # No mentor's name in any log line.
    for name in ("Ingrid Berg", "Ola Nordmann", "Per Lie", "Nora Strand"):
        assert name not in log
