"""The operator console in a test: its credentials, its settings, and failed deliveries made for real
(the worker sends to the sandbox while it answers an error) for it to show."""

from __future__ import annotations

import re
from typing import Any

import httpx

from certsync.app import Runtime
from certsync.sandbox.faults import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from certsync.settings import Settings
from certsync.store.pool import Pool
from tests.support.runtime import FAST, settings_for
from tests.support.seed import seed_certifications

TOKEN = "operator-token-for-tests-0123456789"
USERNAME = "oncall"
PASSWORD = "correct horse battery staple"
SESSION_SECRET = "session-secret-for-tests-9876543210"
SECRETS = (TOKEN, PASSWORD, SESSION_SECRET)
BEARER = {"Authorization": f"Bearer {TOKEN}"}
BASE = "http://console.test"


def console_settings(database_url: str, sandbox: SandboxServer, **overrides: Any) -> Settings:
    # A threshold above one operation's four calls keeps the circuit closed unless a test opens it.
    values: dict[str, Any] = {
        "breaker_failure_threshold": 50,
        "console_operator_token": TOKEN,
        "console_operator_name": "api-robot",
        "console_username": USERNAME,
        "console_password": PASSWORD,
        "console_session_secret": SESSION_SECRET,
    }
    values.update(overrides)
    return settings_for(database_url, sandbox, **values)


def portal_answers(sandbox: SandboxServer, status: int | None) -> None:
    """Every certification PUT answers ``status`` from now on (``None``: the portal has recovered)."""
    steps = () if status is None else (FaultStep(status=status, times=None, scope="put"),)
    sandbox.sandbox.load_faults(FaultScript(steps=steps))


async def failed_deliveries(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, count: int = 1, status: int = 503
) -> list[int]:
    """``count`` certifications whose delivery really failed (worker → sandbox); their queue entry ids."""
    portal_answers(sandbox, status)
    await seed_certifications(pool, count)
    await runtime.worker(FAST, listen=False).run(once=True)
    portal_answers(sandbox, None)
    rows = await runtime.queue.list_entries(limit=count + 10)
    return sorted(r.id for r in rows)


def csrf_of(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match is not None, "the page has no CSRF field"
    return match.group(1)
