"""`certsync demo`, the main job, end to end on the test server (its own certsync_demo database):
the contract-v1 run, and the Dataverse run (``--api dataverse``) checked against the emulator's own
rows and request log."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from typer.testing import CliRunner

import certsync.cli.demo  # noqa: F401  (registers the command)
from certsync.cli import cli
from certsync.demo import COHORT, run_demo
from certsync.dynamics.dataverse import STATUS_CHOICES
from certsync.settings import Settings

# Every run drops and recreates the one certsync_demo database: under xdist they share a worker.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("certsync_demo")]


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


async def test_the_dataverse_demo_goes_in_bulk_isolates_the_refused_row_and_reconciles(
    pg_admin_url: str, tmp_path: Path
) -> None:
    settings = Settings(_env_file=None, database_url=pg_admin_url, log_format="json")
    steps: list[str] = []

    report = await run_demo(settings, tmp_path, steps.append, api="dataverse")

    assert report.portal is not None
    emulator = report.portal.dataverse
    requests = emulator.requests()
    state = emulator.snapshot()
    with psycopg.connect(report.database_url) as conn:
        certifications = {
            str(r[0]): (r[1], r[2]) for r in conn.execute("select id, status, version from certifications")
        }
        queue = conn.execute("select certification_id, status from dynamics_sync_retry_queue").fetchall()
        events: dict[str, int] = dict(
            conn.execute("select status, count(*) from certification_sync_events group by status").fetchall()
        )

    # Bulk: the sample data and the cohort's mass expiry went out in UpsertMultiple calls of up to 100.
    bulk = [r for r in requests if r.method == "POST" and r.targets is not None and r.status == 200]
    assert max(r.targets or 0 for r in bulk) == settings.dataverse_batch_size
    assert sum(1 for r in bulk if (r.targets or 0) > 1) >= 6
    assert sum(r.targets or 0 for r in bulk) > 2 * COHORT
    # Service protection: as many 429s as the circuit's threshold, and the circuit never moved.
    limited = [r for r in requests if r.status == 429]
    assert len(limited) == settings.breaker_failure_threshold
    assert report.transitions == []
    assert report.retries == 0
    # The plug-in's refusal: bulk calls refused whole, split down to one PATCH of the one row.
    refused = [r for r in requests if r.outcome == "refused"]
    [alone] = [r for r in refused if r.method == "PATCH"]
    assert all(r.method == "POST" and (r.targets or 0) > 1 for r in refused if r is not alone)
    assert alone.key is not None
    assert report.investigated == [alone.key]
    assert [(str(c), s) for c, s in queue] == [(alone.key, "replayed")]
    # Every other change delivered: the refused one's event went to the queue, nothing else waits.
    assert events == {"delivered": report.delivered, "queued": 1}
    # A DELETE, and the table holds exactly what the database does.
    [gone] = state["deleted"]
    assert gone not in certifications
    assert set(state["rows"]) == set(certifications)
    for certification_id, (status, version) in certifications.items():
        row = state["rows"][certification_id]
        assert (row["hlf_status"], row["hlf_sourceversion"]) == (STATUS_CHOICES[status], version)
    assert (report.reconcile_mismatches, report.reconcile_read) == (0, len(certifications))
    assert report.succeeded
    assert len(steps) >= 7


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["demo", "--api", "dataverse"], {}),
        (["demo"], {"CERTSYNC_DYNAMICS_API": "dataverse"}),
    ],
    ids=["option", "environment"],
)
def test_demo_api_dataverse_exits_0_with_its_summary_and_next_commands(
    pg_admin_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, Any],
) -> None:
    monkeypatch.setenv("CERTSYNC_DATABASE_URL", pg_admin_url)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "200", **env})
    assert result.exit_code == 0, result.output
    output = result.output
    assert "What happened (Dataverse Web API)" in output
    assert "The Dataverse table agrees with the database." in output

    def count(row: str) -> str:
        line = next(line for line in output.splitlines() if row in line)
        return line.rstrip(" │").split("│")[-1].strip()

    assert count("certifications expired by the sweep") == str(COHORT + 3)
    assert count("targets per accepted call").startswith("up to 100 ")
    assert int(count("UpsertMultiple calls refused whole")) >= 1
    assert int(count("429s from service protection")) == 3
    assert count("circuit transitions") == "none"
    assert count("rows split out for investigation") == "1"
    assert count("reconcile: mismatches") == "0"
    for command in ("sandbox --api dataverse --port 8765", "contract check", "worker --once", "reconcile"):
        assert command in output
    assert "CERTSYNC_DYNAMICS_API=dataverse" in output
    [history] = [line for line in output.splitlines() if " history " in line]
    UUID(history.split()[-1])
    log = (tmp_path / "certsync" / "log" / "certsync-demo.log").read_text()
    assert "UpsertMultiple" in log
    for personal in ("Cohort mentor", "@example.org", "Nora Strand", "Maja Vik"):
        assert personal not in log
