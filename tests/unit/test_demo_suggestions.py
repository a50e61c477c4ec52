"""The commands `certsync demo` suggests work as typed: certsync's real path when it is not on the
PATH (``make demo`` runs ``.venv/bin/certsync``), the database, and a console sign-in token."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from certsync.cli import demo as demo_cli


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
