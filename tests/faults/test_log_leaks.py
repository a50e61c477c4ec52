"""``certsync demo``'s logs, captured whole, hold no mentor name, no email, no token and no secret.

The demo runs as a subprocess on this suite's own PostgreSQL (it recreates a ``certsync_demo``
database wherever it runs, so it stays off the shared server) with debug-level JSON logs. The fault
suite's own runs check their logs the same way (``assert_no_leaks`` in every module).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from certsync.demo import DEMO_DATABASE
from tests.faults.conftest import CLIENT_SECRET, STATIC_TOKEN, PrivateServer, assert_no_leaks
from tests.support.databases import with_dbname

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_demos_logs_leak_no_name_email_token_or_secret(
    private_server: PrivateServer, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "CERTSYNC_DATABASE_URL": private_server.url,
        "CERTSYNC_LOG_FORMAT": "json",
        "CERTSYNC_LOG_LEVEL": "debug",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "COLUMNS": "200",
    }
    demo = subprocess.run(
        [sys.executable, "-m", "certsync", "demo"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    log_file = tmp_path / "state" / "certsync" / "log" / "certsync-demo.log"
    lines = log_file.read_text().splitlines() + demo.stderr.splitlines()
    assert len(lines) > 50, "the demo logs its whole run"

    with psycopg.connect(with_dbname(private_server.url, DEMO_DATABASE)) as conn:
        names = {r[0] for r in conn.execute("select display_name from public.peer_mentors")}
        emails = {r[0] for r in conn.execute("select email from auth.users where email is not null")}
    assert names
    assert emails
    assert_no_leaks(lines, names | emails | {STATIC_TOKEN, CLIENT_SECRET})
