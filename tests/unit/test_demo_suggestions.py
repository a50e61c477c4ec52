"""The commands `certsync demo` suggests work as typed: certsync's real path when it is not on the
PATH (``make demo`` runs ``.venv/bin/certsync``), the database, and a console sign-in token."""

from __future__ import annotations

import inspect
import shlex
import sys
from pathlib import Path

import pytest

from certsync.cli import demo as demo_cli
from certsync.cli import sandbox as sandbox_cli


def test_off_the_path_the_suggestions_name_the_running_script(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / ".venv" / "bin" / "certsync"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])

    lines = demo_cli.next_commands("postgresql://localhost/certsync_demo")

    for line in lines:
        words = shlex.split(line)
        assert words[0] == "CERTSYNC_DATABASE_URL=postgresql://localhost/certsync_demo"
        assert str(script.resolve()) in words
    console = next(line for line in lines if " console" in line)
    token = next(w for w in shlex.split(console) if w.startswith("CERTSYNC_CONSOLE_OPERATOR_TOKEN="))
    assert len(token.split("=", 1)[1]) >= 24  # what the console requires of a token


def test_on_the_path_the_suggestions_say_certsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: "/usr/local/bin/certsync")

    assert demo_cli.certsync_command() == "certsync"
    assert all(" certsync " in line for line in demo_cli.next_commands("postgresql://h/db"))


def test_the_dataverse_runs_suggestions_point_every_command_at_the_emulators_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: "/usr/local/bin/certsync")
    refused = "0b6f2a8e-6d1c-4c1e-9d55-3f8f6c0d2a11"

    lines = demo_cli.dataverse_next_commands("user=postgres dbname=certsync_demo", [refused])

    assert lines[0].startswith(f"certsync sandbox --api dataverse --port {demo_cli.SANDBOX_PORT} ")
    assert inspect.signature(sandbox_cli.sandbox).parameters["port"].default == demo_cli.SANDBOX_PORT
    words = shlex.split(lines[1])
    assert words[0] == "export"
    assert dict(word.split("=", 1) for word in words[1:]) == {
        "CERTSYNC_DATABASE_URL": "user=postgres dbname=certsync_demo",
        "CERTSYNC_DYNAMICS_API": "dataverse",
        "CERTSYNC_DYNAMICS_BASE_URL": f"http://127.0.0.1:{demo_cli.SANDBOX_PORT}",
        "CERTSYNC_DYNAMICS_TOKEN": "sandbox-token",
    }
    assert lines[2:] == [
        "certsync contract check",
        "certsync backfill --all",
        "certsync worker --once",
        "certsync reconcile",
        f"certsync history {refused}",
    ]
