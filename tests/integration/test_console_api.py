"""The operator console over HTTP (ASGI, in process): every JSON endpoint and every form, with access
rules (401 / 403), bad input (422, never 500), and failed deliveries made for real by the worker
against the sandbox."""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import httpx
import pytest

from certsync.app import Runtime, open_runtime
from certsync.console import ConsoleConfigurationError, create_console_app
from certsync.resilience.testing import ManualClock
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from certsync.store.retry_queue import NewRetryEntry
from tests.support.cli import assert_one_line_error, certsync, cli_env
from tests.support.console import (
    BASE,
    BEARER,
    PASSWORD,
    SECRETS,
    SESSION_SECRET,
    TOKEN,
    USERNAME,
    console_settings,
    csrf_of,
    failed_deliveries,
    portal_answers,
)
from tests.support.databases import create_database, drop_database, unique_name
from tests.support.runtime import FAST
from tests.support.seed import seed_certifications

pytestmark = pytest.mark.integration


@pytest.fixture
async def runtime(database_url: str, sandbox: SandboxServer) -> AsyncIterator[Runtime]:
    async with open_runtime(console_settings(database_url, sandbox)) as rt:
        yield rt


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    app = create_console_app(runtime, runtime.settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        yield c


@pytest.fixture
async def api(client: httpx.AsyncClient) -> httpx.AsyncClient:
    client.headers.update(BEARER)
    return client


async def sign_in(client: httpx.AsyncClient, **fields: str) -> httpx.Response:
    login = await client.get("/login")
    form = {"csrf_token": csrf_of(login), **(fields or {"username": USERNAME, "password": PASSWORD})}
    return await client.post("/login", data=form)


async def signed_in_csrf(client: httpx.AsyncClient) -> str:
    response = await sign_in(client)
    assert response.status_code == 303
    return csrf_of(await client.get("/"))


# --- access --------------------------------------------------------------------------------------

SOME_ID = "00000000-0000-4000-8000-000000000001"
API_CALLS = [
    ("GET", "/api/overview", None),
    ("GET", "/api/queue", None),
    ("GET", "/api/queue/selection", None),
    ("POST", "/api/queue/selection/replay", {}),
    ("POST", "/api/queue/selection/discard", {"reason": "x"}),
    ("GET", "/api/queue/1", None),
    ("POST", "/api/queue/1/replay", None),
    ("POST", "/api/queue/1/discard", {"reason": "x"}),
    ("GET", "/api/breaker", None),
    ("POST", "/api/breaker/reset", None),
    ("GET", f"/api/history/{SOME_ID}", None),
    ("GET", f"/api/history?mentor_id={SOME_ID}", None),
    ("GET", "/api/reconcile", None),
    ("POST", "/api/reconcile/repair", None),
]


@pytest.mark.parametrize(("method", "path", "body"), API_CALLS)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-wrong-token-wrong", "Basic b3BzOnB3"])
async def test_every_api_endpoint_refuses_a_missing_or_wrong_bearer_token_with_401(
    client: httpx.AsyncClient, method: str, path: str, body: Any, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_session_cookie_does_not_open_the_api(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    assert (await client.get("/api/overview")).status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/queue",
        "/queue/1",
        "/queue/selection?action=replay",
        "/history",
        "/reconcile",
        "/reconcile/repair",
    ],
)
async def test_pages_send_a_visitor_without_a_session_to_sign_in(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


FORMS = ["/queue/1/replay", "/queue/1/discard", "/queue/selection/replay", "/queue/selection/discard"]
FORMS += ["/breaker/reset", "/logout", "/sessions/revoke", "/reconcile/repair"]


@pytest.mark.parametrize("path", FORMS)
async def test_forms_posted_without_a_session_are_401(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.post(path, data={"reason": "x"})).status_code == 401


@pytest.mark.parametrize("path", FORMS)
@pytest.mark.parametrize("token", [None, "forged"])
async def test_forms_without_the_sessions_csrf_token_are_403(
    client: httpx.AsyncClient, path: str, token: str | None
) -> None:
    await sign_in(client)
    data = {"reason": "x"} | ({"csrf_token": token} if token else {})
    assert (await client.post(path, data=data)).status_code == 403


async def test_a_csrf_token_of_another_session_is_refused(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    app = create_console_app(runtime, runtime.settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as other:
        foreign = await signed_in_csrf(other)
    await sign_in(client)
    assert (await client.post("/breaker/reset", data={"csrf_token": foreign})).status_code == 403


async def test_sign_in_without_the_login_forms_csrf_token_is_403(client: httpx.AsyncClient) -> None:
    await client.get("/login")
    response = await client.post("/login", data={"username": USERNAME, "password": PASSWORD})
    assert response.status_code == 403


@pytest.mark.parametrize(
    "fields",
    [
        {"username": USERNAME, "password": "wrong"},
        {"username": "someone", "password": PASSWORD},
        {"token": "nope"},
    ],
)
async def test_wrong_credentials_are_401_and_leave_the_visitor_signed_out(
    client: httpx.AsyncClient, fields: dict[str, str]
) -> None:
    response = await sign_in(client, **fields)
    assert response.status_code == 401
    assert "not valid" in response.text
    assert (await client.get("/")).status_code == 303


async def test_an_operator_signs_in_with_the_token_and_acts_under_the_configured_name(
    client: httpx.AsyncClient,
) -> None:
    response = await sign_in(client, token=TOKEN)
    assert response.status_code == 303
    assert "api-robot" in (await client.get("/")).text


async def test_sign_in_returns_to_the_page_asked_for_but_never_to_another_site(
    client: httpx.AsyncClient,
) -> None:
    login = await client.get("/login?next=/queue%3Fstatus%3Dpending")
    form = {
        "csrf_token": csrf_of(login),
        "username": USERNAME,
        "password": PASSWORD,
        "next": "//evil.example",
    }
    assert (await client.post("/login", data=form)).headers["location"] == "/"
    await client.post("/logout", data={"csrf_token": csrf_of(await client.get("/"))})
    login = await client.get("/login")
    form |= {"csrf_token": csrf_of(login), "next": "/queue?status=pending"}
    assert (await client.post("/login", data=form)).headers["location"] == "/queue?status=pending"


async def test_a_tampered_session_cookie_is_not_a_session(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    cookie = client.cookies["certsync_console"]
    payload, signature = cookie.split(".")
    client.cookies.set("certsync_console", f"{payload}x.{signature}", domain="console.test")
    assert (await client.get("/")).status_code == 303


async def test_sign_out_ends_the_session(client: httpx.AsyncClient) -> None:
    csrf = await signed_in_csrf(client)
    assert (await client.post("/logout", data={"csrf_token": csrf})).status_code == 303
    assert (await client.get("/")).status_code == 303


async def test_a_replayed_cookie_no_longer_works_after_signing_out(client: httpx.AsyncClient) -> None:
    csrf = await signed_in_csrf(client)
    cookie = client.cookies["certsync_console"]
    assert (await client.post("/logout", data={"csrf_token": csrf})).status_code == 303
    # Someone kept the cookie (a shared machine, a proxy log): the server no longer holds its session.
    client.cookies.set("certsync_console", cookie, domain="console.test")
    assert (await client.get("/")).status_code == 303
    assert (await client.post("/breaker/reset", data={"csrf_token": csrf})).status_code == 401


async def test_revoking_every_session_signs_out_every_browser_on_every_console_process(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    # A second console process: its own app and memory, the same database and session secret.
    other_process = create_console_app(runtime, runtime.settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other_process), base_url=BASE) as other:
        await signed_in_csrf(other)
        csrf = await signed_in_csrf(client)
        cookie = client.cookies["certsync_console"]

        response = await client.post("/sessions/revoke", data={"csrf_token": csrf})

        assert response.status_code == 303
        assert response.headers["location"] == "/login"
        assert (await other.get("/")).status_code == 303
        client.cookies.set("certsync_console", cookie, domain="console.test")
        assert (await client.get("/")).status_code == 303
    # Signing in again works at once.
    assert (await sign_in(client)).status_code == 303
    assert (await client.get("/")).status_code == 200


async def test_the_overview_offers_revoking_every_session(client: httpx.AsyncClient) -> None:
    await sign_in(client)
    page = (await client.get("/")).text
    assert 'action="/sessions/revoke"' in page


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def clocked(runtime: Runtime, clock: ManualClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_console_app(runtime, runtime.settings, clock=clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        yield c


async def test_after_five_failed_sign_ins_even_the_right_password_is_429_until_the_window_passes(
    clocked: httpx.AsyncClient, clock: ManualClock
) -> None:
    for _ in range(5):
        assert (await sign_in(clocked, username=USERNAME, password="wrong")).status_code == 401
        clock.advance(30)
    # The first failure was 150 s ago: 150 s of the 5-minute window remain.
    refused = await sign_in(clocked, username=USERNAME, password=PASSWORD)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "150"
    assert "Too many failed sign-ins" in refused.text
    clock.advance(149)
    assert (await sign_in(clocked, username=USERNAME, password=PASSWORD)).headers["retry-after"] == "1"
    assert (await clocked.get("/")).status_code == 303

    clock.advance(1)
    assert (await sign_in(clocked, username=USERNAME, password=PASSWORD)).status_code == 303
    assert (await clocked.get("/")).status_code == 200


async def test_sign_in_throttling_counts_failures_per_username(
    clocked: httpx.AsyncClient, clock: ManualClock
) -> None:
    for _ in range(5):
        assert (await sign_in(clocked, username="someone-else", password="guess")).status_code == 401
    assert (await sign_in(clocked, username="someone-else", password="guess")).status_code == 429
    assert (await sign_in(clocked, username=USERNAME, password=PASSWORD)).status_code == 303


async def test_four_failures_then_a_success_start_the_count_again(
    clocked: httpx.AsyncClient, clock: ManualClock
) -> None:
    for _ in range(4):
        await sign_in(clocked, username=USERNAME, password="wrong")
    assert (await sign_in(clocked, username=USERNAME, password=PASSWORD)).status_code == 303
    await clocked.post("/logout", data={"csrf_token": csrf_of(await clocked.get("/"))})
    for _ in range(4):
        assert (await sign_in(clocked, username=USERNAME, password="wrong")).status_code == 401
    assert (await sign_in(clocked, username=USERNAME, password=PASSWORD)).status_code == 303


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``certsync console`` in process, stopping short of serving: what it would have served, and where."""
    captured: dict[str, Any] = {}

    def serve(app: Any, host: str, port: int, **_: Any) -> None:
        captured.update(app=app, host=host)

    monkeypatch.setattr(importlib.import_module("certsync.cli.console"), "serve", serve)
    return captured


@pytest.mark.parametrize(
    ("host", "secure"),
    [
        ("127.0.0.1", False),
        ("::1", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("192.168.10.20", True),
        ("console.hlf.example", True),
    ],
)
async def test_the_session_cookie_is_secure_whenever_the_console_listens_beyond_loopback(
    database_url: str, served: dict[str, Any], host: str, secure: bool
) -> None:
    env = cli_env(
        database_url,
        CERTSYNC_CONSOLE_OPERATOR_TOKEN=TOKEN,
        CERTSYNC_CONSOLE_SESSION_SECRET=SESSION_SECRET,
    )
    result = await certsync("console", "--host", host, env=env)
    assert result.exit_code == 0, result.output
    assert served["host"] == host
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=served["app"]), base_url=BASE) as c:
        cookie = (await c.get("/login")).headers["set-cookie"].lower()
    assert ("; secure" in cookie) is secure


@pytest.mark.parametrize(
    ("variable", "value", "needs"),
    [
        ("CERTSYNC_CONSOLE_PASSWORD", "eleven-char", "at least 12"),
        ("CERTSYNC_CONSOLE_SESSION_SECRET", "x" * 31, "at least 32"),
        ("CERTSYNC_CONSOLE_OPERATOR_TOKEN", "t" * 23, "at least 24"),
    ],
)
async def test_certsync_console_refuses_a_short_secret_at_start_exiting_2_naming_it(
    database_url: str, served: dict[str, Any], variable: str, value: str, needs: str
) -> None:
    env = cli_env(
        database_url,
        CERTSYNC_CONSOLE_OPERATOR_TOKEN=TOKEN,
        CERTSYNC_CONSOLE_USERNAME=USERNAME,
        CERTSYNC_CONSOLE_PASSWORD=PASSWORD,
        CERTSYNC_CONSOLE_SESSION_SECRET=SESSION_SECRET,
    )
    result = await certsync("console", env=env | {variable: value})
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert variable in result.stderr
    assert needs in result.stderr
    assert value not in result.stderr
    assert served == {}


def test_a_short_password_is_refused(database_url: str, sandbox: SandboxServer) -> None:
    settings = console_settings(database_url, sandbox, console_password="short-pass1")
    with pytest.raises(ConsoleConfigurationError, match="CERTSYNC_CONSOLE_PASSWORD must be at least 12"):
        create_console_app(lambda: open_runtime(settings), settings)


def test_a_short_session_secret_is_refused(database_url: str, sandbox: SandboxServer) -> None:
    settings = console_settings(database_url, sandbox, console_session_secret="s" * 31)
    with pytest.raises(
        ConsoleConfigurationError, match="CERTSYNC_CONSOLE_SESSION_SECRET must be at least 32"
    ):
        create_console_app(lambda: open_runtime(settings), settings)


def test_a_console_nobody_could_sign_in_to_is_refused(database_url: str, sandbox: SandboxServer) -> None:
    settings = console_settings(
        database_url, sandbox, console_operator_token=None, console_username=None, console_password=None
    )
    with pytest.raises(ConsoleConfigurationError, match="CERTSYNC_CONSOLE_OPERATOR_TOKEN"):
        create_console_app(lambda: open_runtime(settings), settings)


def test_a_short_operator_token_is_refused(database_url: str, sandbox: SandboxServer) -> None:
    settings = console_settings(database_url, sandbox, console_operator_token="short")
    with pytest.raises(ConsoleConfigurationError, match="at least 24"):
        create_console_app(lambda: open_runtime(settings), settings)


async def test_no_response_shows_a_secret(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, client: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    seen = [await client.get("/login"), (await sign_in(client, username=USERNAME, password="wrong"))]
    csrf = await signed_in_csrf(client)
    for path in ["/", "/queue", f"/queue/{entry_id}", "/queue/selection?action=discard", "/metrics"]:
        seen.append(await client.get(path))
    seen.append(await client.post(f"/queue/{entry_id}/discard", data={"csrf_token": csrf, "reason": ""}))
    for path in [
        "/api/overview",
        "/api/queue",
        f"/api/queue/{entry_id}",
        "/api/breaker",
        "/api/openapi.json",
    ]:
        seen.append(await client.get(path, headers=BEARER))
    seen.append(await client.get("/api/queue?certification_id=" + PASSWORD, headers=BEARER))
    for response in seen:
        body = response.text + " ".join(f"{k}: {v}" for k, v in response.headers.items() if k != "set-cookie")
        for secret in SECRETS:
            assert secret not in body, f"{response.request.url} shows a secret"


# --- reading -------------------------------------------------------------------------------------


async def test_the_overview_reports_breaker_backlog_queue_and_last_hours_deliveries(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, api: httpx.AsyncClient
) -> None:
    await seed_certifications(pool, 2)
    await runtime.worker(FAST, listen=False).run(once=True)
    await failed_deliveries(pool, runtime, sandbox)
    await seed_certifications(pool, 3)  # captured, not yet delivered: the backlog

    overview = (await api.get("/api/overview")).json()

    assert overview["delivered_last_hour"] == 2
    assert overview["last_delivered_at"] is not None
    assert overview["breaker"]["state"] == "closed"
    assert overview["breaker"]["next_probe_at"] is None
    assert overview["outbox"]["waiting"] == 3
    assert overview["outbox"]["oldest_age_seconds"] >= 0
    assert overview["queue"]["pending"]["entries"] == 1
    assert overview["queue"]["discarded"]["entries"] == 0
    assert overview["oldest_pending_age_seconds"] >= 0


async def test_the_overview_page_shows_when_an_open_circuit_may_probe(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    for _ in range(runtime.breaker.failure_threshold):
        await runtime.breaker.record_failure("503 Service Unavailable")
    await sign_in(client)
    page = (await client.get("/")).text
    assert "badge-open" in page
    assert "Reset breaker" in page
    assert "calls go through" not in page


async def entries_of(
    pool: Pool, runtime: Runtime, count: int, *, start_hour: int = 8, **fields: Any
) -> list[int]:
    """Queue rows written as the worker writes them, one minute apart from ``start_hour`` (newest last)."""
    start = datetime(2026, 11, 29, start_hour, 0, tzinfo=UTC)
    ids = []
    for i in range(count):
        entry = NewRetryEntry(
            operation_type=fields.get("operation_type", "certification.status_changed"),
            certification_id=fields.get("certification_id", uuid4()),
            event_id=None,
            payload_json={"contract_version": 1},
            failure_reason="retries exhausted after 4 attempt(s); last: 503",
            attempt_count=4,
            status=fields.get("status", "pending"),
        )
        ids.append(await runtime.queue.add(entry, start + timedelta(minutes=i)))
    return ids


async def test_the_queue_pages_newest_first_with_a_cursor_until_the_end(
    pool: Pool, runtime: Runtime, api: httpx.AsyncClient
) -> None:
    ids = await entries_of(pool, runtime, 7)
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await api.get("/api/queue", params=params)).json()
        seen += [e["id"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": "requires_investigation"}, "investigate"),
        ({"operation_type": "certification.created"}, "created"),
        ({"created_from": "2026-11-29T06:00:00Z", "created_to": "2026-11-29T06:02:00Z"}, "early"),
        ({"created_from": "2026-11-29T10:00", "created_to": "2026-11-29T10:30"}, "created"),
    ],
)
async def test_the_queue_filters_by_status_operation_type_and_time_range(
    pool: Pool, runtime: Runtime, api: httpx.AsyncClient, params: dict[str, str], expected: str
) -> None:
    # Naive times are local (Europe/Oslo, UTC+1 in November): 10:00 local is 09:00 UTC.
    groups = {
        "early": await entries_of(pool, runtime, 2, start_hour=6),
        "investigate": await entries_of(pool, runtime, 1, start_hour=8, status="requires_investigation"),
        "created": await entries_of(pool, runtime, 1, start_hour=9, operation_type="certification.created"),
    }
    found = {e["id"] for e in (await api.get("/api/queue", params=params)).json()["entries"]}
    assert found == set(groups[expected])


async def test_the_queue_filters_by_certification(
    pool: Pool, runtime: Runtime, api: httpx.AsyncClient
) -> None:
    certification = uuid4()
    [mine] = await entries_of(pool, runtime, 1, certification_id=certification)
    await entries_of(pool, runtime, 3)
    page = (await api.get("/api/queue", params={"certification_id": str(certification)})).json()
    assert [e["id"] for e in page["entries"]] == [mine]


async def test_an_entry_shows_its_payload_failure_attempts_and_history(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, api: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    entry = (await api.get(f"/api/queue/{entry_id}")).json()
    assert entry["status"] == "pending"
    assert entry["attempt_count"] == 4
    assert entry["failure_reason"].startswith("retries exhausted after 4 attempt(s)")
    assert entry["payload_json"]["contract_version"] == 1
    assert [h["status"] for h in entry["failure_history"]] == ["pending"]


async def test_the_entry_page_shows_the_same_entry(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, client: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    await sign_in(client)
    page = (await client.get(f"/queue/{entry_id}")).text
    assert "retries exhausted after 4 attempt(s)" in page
    assert "&#34;contract_version&#34;: 1" in page
    assert "Replay now" in page


async def test_an_unknown_entry_is_404(api: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
    assert (await api.get("/api/queue/999999")).status_code == 404
    assert (await api.post("/api/queue/999999/replay")).status_code == 404
    assert (await api.post("/api/queue/999999/discard", json={"reason": "x"})).status_code == 404


# --- bad input -----------------------------------------------------------------------------------

BAD_API_CALLS = [
    ("GET", "/api/queue?status=lost", None),
    ("GET", "/api/queue?certification_id=not-a-uuid", None),
    ("GET", "/api/queue?created_from=yesterday", None),
    ("GET", "/api/queue?created_from=2026-11-29T10:00:00Z&created_to=2026-11-29T09:00:00Z", None),
    ("GET", "/api/queue?cursor=%25%25%25", None),
    ("GET", "/api/queue?cursor=bm90fGE", None),
    ("GET", "/api/queue?limit=0", None),
    ("GET", "/api/queue?limit=100000", None),
    ("GET", "/api/queue/abc", None),
    ("GET", "/api/queue/0", None),
    ("GET", "/api/queue/99999999999999999999", None),
    ("GET", "/api/queue/selection?status=nope", None),
    # PostgreSQL text cannot hold NUL (schemathesis found this one answering 503).
    ("GET", "/api/queue/selection?operation_type=a%00b", None),
    ("GET", "/api/queue?operation_type=%00", None),
    ("POST", "/api/queue/1/discard", {"reason": "gone\u0000"}),
    ("POST", "/api/queue/1/discard", {}),
    ("POST", "/api/queue/1/discard", {"reason": "   "}),
    ("POST", "/api/queue/1/discard", {"reason": "x" * 501}),
    ("POST", "/api/queue/selection/discard", {"filters": {"status": "pending"}}),
    ("POST", "/api/queue/selection/replay", {"filters": {"certification_id": 7}}),
    ("POST", "/api/queue/selection/replay", "not an object"),
]


@pytest.mark.parametrize(("method", "path", "body"), BAD_API_CALLS)
async def test_bad_api_input_is_422_naming_the_field(
    api: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    response = await api.request(method, path, json=body)
    assert response.status_code == 422
    assert response.json()["detail"]


async def test_a_body_that_is_not_json_is_422(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/api/queue/1/discard", content=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422


BAD_PAGES = [
    "/queue?status=lost",
    "/queue?certification_id=nope",
    "/queue?created_to=tomorrow",
    "/queue?limit=7",
    "/queue?operation_type=a%00b",
    "/queue?cursor=xyz",
    "/queue/abc",
    "/queue/99999999999999999999",
    "/queue/selection?action=delete",
]


@pytest.mark.parametrize("path", BAD_PAGES)
async def test_bad_page_input_is_a_422_page(client: httpx.AsyncClient, path: str) -> None:
    await sign_in(client)
    response = await client.get(path)
    assert response.status_code == 422
    assert "Please check your input" in response.text


async def test_a_discard_form_without_a_reason_is_422(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, client: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    csrf = await signed_in_csrf(client)
    response = await client.post(f"/queue/{entry_id}/discard", data={"csrf_token": csrf, "reason": "  "})
    assert response.status_code == 422
    assert (await runtime.queue.get(entry_id)).status == "pending"


# --- acting --------------------------------------------------------------------------------------


async def test_replaying_after_the_portal_recovers_marks_the_entry_replayed_by_the_operator(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, api: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    result = (await api.post(f"/api/queue/{entry_id}/replay")).json()
    assert result == {"entry_id": entry_id, "status": "replayed", "attempts": 1, "reason": None}
    entry = await runtime.queue.get(entry_id)
    assert entry.status == "replayed"
    assert entry.last_replayed_by == "api-robot"


async def test_replaying_while_the_portal_is_still_down_keeps_the_entry_pending(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, api: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    portal_answers(sandbox, 503)
    result = (await api.post(f"/api/queue/{entry_id}/replay")).json()
    assert result["status"] == "pending"
    assert (await runtime.queue.get(entry_id)).replay_count == 1


async def test_replaying_through_the_form_records_the_signed_in_operator(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, client: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    csrf = await signed_in_csrf(client)
    response = await client.post(f"/queue/{entry_id}/replay", data={"csrf_token": csrf})
    assert response.headers["location"] == f"/queue/{entry_id}?notice=replayed"
    assert (await runtime.queue.get(entry_id)).last_replayed_by == USERNAME


async def test_discarding_keeps_the_entry_with_the_reason_and_who(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, api: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    response = await api.post(
        f"/api/queue/{entry_id}/discard", json={"reason": "certification deleted in HLF"}
    )
    assert response.json() == {"entry_id": entry_id, "status": "discarded"}
    entry = await runtime.queue.get(entry_id)
    assert (entry.status, entry.discarded_reason, entry.discarded_by) == (
        "discarded",
        "certification deleted in HLF",
        "api-robot",
    )


async def test_discarding_a_discarded_entry_is_409(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, api: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    [entry_id] = await failed_deliveries(pool, runtime, sandbox)
    await api.post(f"/api/queue/{entry_id}/discard", json={"reason": "first"})
    assert (await api.post(f"/api/queue/{entry_id}/discard", json={"reason": "again"})).status_code == 409


async def test_a_selection_counts_only_what_can_be_acted_on(
    pool: Pool, runtime: Runtime, api: httpx.AsyncClient
) -> None:
    await entries_of(pool, runtime, 3)
    await entries_of(pool, runtime, 2, status="requires_investigation")
    [done] = await entries_of(pool, runtime, 1)
    await runtime.queue.discard(done, reason="x", by="t", now=datetime.now(UTC))
    assert (await api.get("/api/queue/selection")).json()["entries"] == 5
    assert (await api.get("/api/queue/selection?status=pending")).json()["entries"] == 3


async def test_the_confirmation_page_says_how_many_a_filtered_replay_would_touch(
    pool: Pool, runtime: Runtime, client: httpx.AsyncClient
) -> None:
    await entries_of(pool, runtime, 4, operation_type="certification.created")
    await entries_of(pool, runtime, 2)
    await sign_in(client)
    page = await client.get("/queue/selection?action=replay&operation_type=certification.created")
    assert "Replay 4 entries?" in page.text
    assert 'name="operation_type" value="certification.created"' in page.text


async def test_a_filtered_replay_replays_only_the_selection(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, client: httpx.AsyncClient
) -> None:
    ids = await failed_deliveries(pool, runtime, sandbox, count=3)
    chosen = await runtime.queue.get(ids[0])
    csrf = await signed_in_csrf(client)
    form = {"csrf_token": csrf, "certification_id": str(chosen.certification_id)}
    page = await client.post("/queue/selection/replay", data=form)
    assert "Replay: 1 entry" in page.text
    statuses = [(await runtime.queue.get(i)).status for i in ids]
    assert statuses == ["replayed", "pending", "pending"]


async def test_a_filtered_discard_over_the_api_records_the_reason_on_each(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, api: httpx.AsyncClient
) -> None:
    ids = await failed_deliveries(pool, runtime, sandbox, count=2)
    body = {"filters": {"status": "pending"}, "reason": "superseded by a manual fix"}
    assert (await api.post("/api/queue/selection/discard", json=body)).json() == {"discarded": 2}
    reasons = {(await runtime.queue.get(i)).discarded_reason for i in ids}
    assert reasons == {"superseded by a manual fix"}


async def test_a_filtered_replay_over_the_api_reports_each_outcome(
    pool: Pool, runtime: Runtime, sandbox: SandboxServer, api: httpx.AsyncClient
) -> None:
    await failed_deliveries(pool, runtime, sandbox, count=2)
    result = (await api.post("/api/queue/selection/replay", json={"filters": {}})).json()
    assert result == {"total": 2, "failed": 0, "results": {"replayed": 2}}


async def test_resetting_the_breaker_closes_an_open_circuit(runtime: Runtime, api: httpx.AsyncClient) -> None:
    for _ in range(runtime.breaker.failure_threshold):
        await runtime.breaker.record_failure("503 Service Unavailable")
    assert (await api.get("/api/breaker")).json()["state"] == "open"
    reset = (await api.post("/api/breaker/reset")).json()
    assert reset["changed"] is True
    assert reset["breaker"]["state"] == "closed"
    assert (await runtime.breaker.snapshot()).state == "closed"


async def test_resetting_the_breaker_through_the_form_returns_to_the_overview(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    for _ in range(runtime.breaker.failure_threshold):
        await runtime.breaker.record_failure("503 Service Unavailable")
    csrf = await signed_in_csrf(client)
    response = await client.post("/breaker/reset", data={"csrf_token": csrf})
    assert response.headers["location"] == "/?notice=breaker-reset"
    assert (await runtime.breaker.snapshot()).state == "closed"


async def test_replay_without_a_configured_portal_is_503_not_500(
    pool: Pool, database_url: str, sandbox: SandboxServer
) -> None:
    settings = console_settings(database_url, sandbox, dynamics_base_url=None, dynamics_sync_enabled=False)
    async with open_runtime(settings) as rt:
        [entry_id] = await entries_of(pool, rt, 1)
        app = create_console_app(rt, settings)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            response = await c.post(f"/api/queue/{entry_id}/replay", headers=BEARER)
    assert response.status_code == 503
    assert "CERTSYNC_DYNAMICS_BASE_URL" in response.json()["detail"]


async def test_the_openapi_document_describes_every_endpoint_with_bearer_auth(api: httpx.AsyncClient) -> None:
    document = (await api.get("/api/openapi.json")).json()
    described = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    expected = {
        (m, re.sub(r"/1(?=/|$)", "/{entry_id}", p.split("?")[0].replace(SOME_ID, "{certification_id}")))
        for m, p, _ in API_CALLS
    }
    assert described == expected
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_a_filtered_discard_through_the_form_records_the_reason_and_the_operator(
    pool: Pool, runtime: Runtime, client: httpx.AsyncClient
) -> None:
    ids = await entries_of(pool, runtime, 2, status="requires_investigation")
    await entries_of(pool, runtime, 1)
    csrf = await signed_in_csrf(client)
    form = {"csrf_token": csrf, "status": "requires_investigation", "reason": "portal rejects legacy types"}
    page = await client.post("/queue/selection/discard", data=form)
    assert "Discard: 2 entries" in page.text
    entries = [await runtime.queue.get(i) for i in ids]
    assert {(e.status, e.discarded_by) for e in entries} == {("discarded", USERNAME)}


@pytest.fixture
def unmigrated_database_url(pg_admin_url: str) -> Iterator[str]:
    name = unique_name("certsync_unmigrated")
    yield create_database(pg_admin_url, name)
    drop_database(pg_admin_url, name)


async def test_a_database_never_migrated_is_503_saying_so_and_metrics_report_it_down(
    unmigrated_database_url: str, sandbox: SandboxServer
) -> None:
    settings = console_settings(unmigrated_database_url, sandbox)
    async with open_runtime(settings) as rt:
        app = create_console_app(rt, settings)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
            overview = await c.get("/api/overview", headers=BEARER)
            metrics = await c.get("/metrics")
    assert overview.status_code == 503
    assert "certsync migrate" in overview.json()["detail"]
    assert "certsync_database_up 0.0" in metrics.text
