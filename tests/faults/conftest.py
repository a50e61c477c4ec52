"""The fault suite's tools: what "nothing lost" and "nothing leaked" mean, checked the same way everywhere.

- ``assert_nothing_lost``: every outbox event is closed and has a home (delivered, superseded by a newer
  event of its certification, or queued with its retry-queue row), and every certification's state at
  the portal is the database's, and certsync's own reconcile finds no mismatch and nothing in transit.
- ``assert_no_leaks``: no log line holds a mentor's name or email, a token or a secret.
- ``JsonLogCapture`` (in-process runs) and ``WorkerProcesses`` (``certsync worker`` subprocesses, their
  JSON logs in files) give the lines to check; ``RecordingTransport`` remembers every bearer token sent.
- ``private_server``: a throwaway PostgreSQL of this suite's own (pgserver) that may be stopped and
  restarted without touching the server other engineers share.
- ``table_checksums``: one digest per table, to prove a refused command changed no row.

Scale comes from the environment (see README.md): ``CERTSYNC_FAULT_KILLS``, ``CERTSYNC_FAULT_EVENTS``.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, cast
from uuid import UUID
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
import structlog
from psycopg import sql

from certsync.delivery.reconcile import Reconciler
from certsync.dynamics.auth import StaticTokenProvider
from certsync.dynamics.client import DynamicsClient
from certsync.logs import configure_logging
from certsync.resilience.clock import SystemClock
from certsync.sandbox.faults import FaultScript, Latency
from certsync.sandbox.server import SandboxServer
from certsync.sandbox.state import DEFAULT_CLIENT_SECRET, DEFAULT_TOKEN, SandboxConfig
from certsync.store.pool import Pool
from certsync.store.reconcile import ReconcileStore
from certsync.worker import today_in
from tests.support.cli import cli_env
from tests.support.databases import create_migrated_template, with_dbname

KILLS = int(os.environ.get("CERTSYNC_FAULT_KILLS", "20"))
EVENTS = int(os.environ.get("CERTSYNC_FAULT_EVENTS", "2000"))
SEED = int(os.environ.get("CERTSYNC_FAULT_SEED", str(random.SystemRandom().randrange(1 << 30))))

# A Standard Webhooks secret for this suite: every run signs, so the secret is one more thing to not leak.
SIGNING_SECRET = "whsec_ZmF1bHQtc3VpdGUtc2lnbmluZy1zZWNyZXQtMDEyMzQ1"
CLIENT_SECRET = DEFAULT_CLIENT_SECRET
STATIC_TOKEN = DEFAULT_TOKEN


# The portal ---------------------------------------------------------------------------------------------

# Every PUT takes 20-120 ms (seeded), so that a kill or an outage lands while deliveries are in flight.
SLOW_PORTAL = FaultScript(latency=Latency(min_ms=20, max_ms=120, scope="put"), seed=SEED)


@pytest.fixture
def slow_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(faults=SLOW_PORTAL, signing_secret=SIGNING_SECRET)) as server:
        yield server


# Logs ------------------------------------------------------------------------------------------------


class JsonLogCapture:
    """structlog configured as the CLI does it (JSON, here at debug level) into memory; restored after."""

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        self._saved = structlog.get_config()

    def start(self) -> None:
        configure_logging("json", "debug", stream=self._buffer)

    def stop(self) -> None:
        structlog.configure(**self._saved)

    @property
    def lines(self) -> list[str]:
        return [line for line in self._buffer.getvalue().splitlines() if line.strip()]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.lines]
        return [e for e in parsed if name is None or e.get("event") == name]


@pytest.fixture
def json_logs() -> Iterator[JsonLogCapture]:
    capture = JsonLogCapture()
    capture.start()
    yield capture
    capture.stop()


def assert_no_leaks(lines: Iterable[str], forbidden: Iterable[str]) -> int:
    """No line holds any forbidden value (case-insensitive). Returns how many lines were checked."""
    needles = {value.lower() for value in forbidden if value}
    checked = 0
    for line in lines:
        checked += 1
        lowered = line.lower()
        found = sorted(needle for needle in needles if needle in lowered)
        assert not found, f"a log line leaks {found}: {line[:300]}"
    return checked


async def personal_data(pool: Pool) -> set[str]:
    """Every mentor name and user email the database holds: none of them may reach a log line."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select display_name as value from public.peer_mentors"
            " union select email from auth.users where email is not null"
        )
        return {str(r["value"]) for r in await cur.fetchall()}


# Seeding with personal data --------------------------------------------------------------------------


async def seed_mentors(pool: Pool, mentors: int, certifications_each: int = 1) -> list[uuid.UUID]:
    """Mentors with a distinctive name and email each (so a leak is detectable), and their certifications."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """
            with u as (
              insert into auth.users (id, email)
              select gen_random_uuid(), 'mentor-' || substr(md5(random()::text), 1, 12) || '@example.org'
              from generate_series(1, %(mentors)s)
              returning id, email
            ),
            m as (
              insert into public.peer_mentors (user_id, display_name)
              select id, 'Mentorname ' || initcap(split_part(email, '@', 1)) from u
              returning id
            )
            insert into public.certifications (peer_mentor_id, valid_from, valid_until)
            select m.id, date '2024-01-01', date '2099-01-01' from m, generate_series(1, %(each)s)
            returning id
            """,
            {"mentors": mentors, "each": certifications_each},
        )
        return [cast(UUID, r["id"]) for r in await cur.fetchall()]


# Nothing lost ----------------------------------------------------------------------------------------


async def outbox_events(pool: Pool) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select e.id, e.certification_id, e.certification_version, e.status, e.superseded_by,"
            " q.id as queue_id"
            " from public.certification_sync_events e"
            " left join public.dynamics_sync_retry_queue q on q.event_id = e.id"
        )
        return [dict(r) for r in await cur.fetchall()]


async def database_states(pool: Pool) -> dict[str, dict[str, Any]]:
    """Each certification as contract v1 carries it, keyed by id."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select id, peer_mentor_id, certification_type, status, valid_from, valid_until, version"
            " from public.certifications"
        )
        return {
            str(r["id"]): {
                "id": str(r["id"]),
                "peer_mentor_id": str(r["peer_mentor_id"]),
                "certification_type": r["certification_type"],
                "status": r["status"],
                "valid_from": cast(date, r["valid_from"]).isoformat(),
                "valid_until": cast(date, r["valid_until"]).isoformat(),
                "version": cast(int, r["version"]),
            }
            for r in await cur.fetchall()
        }


def portal_states(sandbox: SandboxServer) -> dict[str, dict[str, Any]]:
    held = sandbox.sandbox.snapshot()["certifications"]
    return {cert_id: dict(body["certification"]) for cert_id, body in held.items()}


async def assert_every_event_has_a_home(pool: Pool) -> dict[str, int]:
    """Closed, and delivered, superseded by a newer event of its certification, or in the retry queue."""
    events = await outbox_events(pool)
    by_id = {e["id"]: e for e in events}
    counts: dict[str, int] = {}
    for event in events:
        counts[event["status"]] = counts.get(event["status"], 0) + 1
        status = event["status"]
        assert status in {"delivered", "superseded", "queued"}, f"event left open: {event}"
        if status == "superseded":
            newer = by_id.get(event["superseded_by"])
            assert newer is not None, f"superseded by nothing: {event}"
            assert newer["certification_id"] == event["certification_id"]
            assert newer["certification_version"] > event["certification_version"]
        if status == "queued":
            assert event["queue_id"] is not None, f"queued without a retry-queue row: {event}"
    return counts


async def assert_portal_holds_the_database(pool: Pool, sandbox: SandboxServer) -> int:
    """Every certification's state at the portal is the database's, field for field. Returns how many."""
    expected = await database_states(pool)
    held = portal_states(sandbox)
    missing = sorted(set(expected) - set(held))
    assert not missing, f"{len(missing)} certifications never reached the portal, e.g. {missing[:3]}"
    differing = {k: (held[k], v) for k, v in expected.items() if held[k] != v}
    assert not differing, f"{len(differing)} differ (portal, database), e.g. {next(iter(differing.items()))}"
    return len(expected)


def assert_history_only_grew(sandbox: SandboxServer) -> None:
    """No older state ever replaced a newer one: each certification's accepted versions never fall. (A
    version may repeat: contract v1 replaces on an equal version, so a resend is accepted again.)"""
    for cert_id, versions in sandbox.sandbox.snapshot()["history"].items():
        assert versions == sorted(versions), f"{cert_id}: versions went back: {versions}"


async def assert_listing_agrees(pool: Pool, sandbox: SandboxServer) -> None:
    """The portal's listing equals the database's, as certsync's own reconcile sees it once drained:
    no mismatch of any kind, nothing in transit."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        reconciler = Reconciler(
            DynamicsClient(http, sandbox.url, StaticTokenProvider(STATIC_TOKEN)),
            ReconcileStore(pool),
            clock=SystemClock(),
            today=lambda: today_in(ZoneInfo("Europe/Oslo"), SystemClock()),
            organisation_id=None,
        )
        report = await reconciler.reconcile(repair=False, started_by="fault-suite")
    assert report.mismatches == (), f"reconcile found {report.counts}, e.g. {report.mismatches[:3]}"
    assert report.in_transit == 0


async def assert_nothing_lost(pool: Pool, sandbox: SandboxServer) -> int:
    await assert_every_event_has_a_home(pool)
    assert_history_only_grew(sandbox)
    held = await assert_portal_holds_the_database(pool, sandbox)
    await assert_listing_agrees(pool, sandbox)
    return held


# HTTP --------------------------------------------------------------------------------------------------


@dataclass
class RecordingTransport(httpx.AsyncBaseTransport):
    """Real HTTP underneath; remembers every bearer token sent, and can replace the body of the next
    2xx answers to certification PUTs (what the sandbox itself cannot produce)."""

    inner: httpx.AsyncBaseTransport = field(default_factory=httpx.AsyncHTTPTransport)
    tokens: set[str] = field(default_factory=set)
    success_bodies: list[tuple[int, bytes]] = field(default_factory=list)
    replaced: int = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            self.tokens.add(token)
        response = await self.inner.handle_async_request(request)
        if request.method == "PUT" and response.is_success and self.success_bodies:
            await response.aread()
            await response.aclose()
            status, body = self.success_bodies.pop(0)
            self.replaced += 1
            return httpx.Response(status, content=body, headers={"content-type": "application/json"})
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


# Tables ------------------------------------------------------------------------------------------------

CHECKSUMMED_SCHEMAS = ["public", "private", "auth"]


def table_checksums(database_url: str) -> dict[str, str]:
    """Row count and md5 over every row (as text, in a stable order) of every table certsync keeps."""
    digests: dict[str, str] = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        tables = conn.execute(
            "select schemaname, tablename from pg_tables where schemaname = any(%s) order by 1, 2",
            (CHECKSUMMED_SCHEMAS,),
        ).fetchall()
        for schema, name in tables:
            row = conn.execute(
                sql.SQL(
                    "select count(*), md5(coalesce(string_agg(t::text, '|' order by t::text), '')) from {} t"
                ).format(sql.Identifier(schema, name))
            ).fetchone()
            assert row is not None
            digests[f"{schema}.{name}"] = f"{row[0]}:{row[1]}"
    return digests


# A PostgreSQL of our own -------------------------------------------------------------------------------


@dataclass
class PrivateServer:
    """pgserver in a temporary directory (as root it runs postgres as the ``pgserver`` user)."""

    server: Any
    url: str

    @property
    def socket_dir(self) -> str:
        return str(self.server.get_postmaster_info().socket_dir)

    def _pg_ctl(self, *args: str) -> None:
        import pgserver  # noqa: PLC0415  (only the fault suite starts a private server)

        pgserver.pg_ctl(  # type: ignore[attr-defined]  # not in pgserver's __all__
            list(args), pgdata=self.server.pgdata, user=self.server.system_user, timeout=30
        )

    def stop(self) -> None:
        """Fast shutdown: every connection is cut, as when the database host restarts."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._pg_ctl(
            "-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.pgdata / "log"), "start"
        )

    def close(self) -> None:
        """Stop whichever postmaster serves the data directory, then let pgserver remove it.

        pgserver's cleanup stops only the postmaster it started itself: after a stop() and start() here that
        one is gone, so it skipped the stop and deleted the data directory under the running server, which
        outlived the run. pg_ctl cannot be relied on at the end either: it runs as the ``pgserver`` user, and
        any pytest session started meanwhile makes /tmp/pytest-of-<user> private again (0700), so pg_ctl
        is refused the directory. Hence what ``pg_ctl -m fast stop`` does, from this process: SIGINT to the
        postmaster named in postmaster.pid, then wait for it to exit.
        """
        import psutil  # noqa: PLC0415  (only the fault suite watches processes)

        pid_file = self.server.pgdata / "postmaster.pid"
        if pid_file.exists():
            try:
                postmaster = psutil.Process(int(pid_file.read_text().split("\n", 1)[0]))
                if str(self.server.pgdata) in postmaster.cmdline():
                    postmaster.send_signal(signal.SIGINT)
                    postmaster.wait(timeout=30)
            except psutil.NoSuchProcess:
                pass  # a stale pid file: nothing serves the directory
        self.server.cleanup()

    def migrated_database(self) -> str:
        """A new database on this server with every migration applied; its URL."""
        return with_dbname(self.url, create_migrated_template(self.url))


@pytest.fixture(scope="session")
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset on CI
        import pgserver  # noqa: PLC0415  (only the fault suite starts a private server)

        server = pgserver.get_server(  # type: ignore[attr-defined]  # not in pgserver's __all__
            tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete"
        )
    private = PrivateServer(server, str(server.get_uri()))
    yield private
    private.close()


# certsync worker subprocesses ----------------------------------------------------------------------------


def worker_env(database_url: str, base_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a ``certsync worker`` subprocess: short leases, signed requests, JSON logs."""
    return {
        **os.environ,
        **cli_env(
            database_url,
            base_url,
            CERTSYNC_LOG_LEVEL="info",
            CERTSYNC_WORKER_LEASE_SECONDS="2",
            CERTSYNC_DYNAMICS_SIGNING_SECRET=SIGNING_SECRET,
            CERTSYNC_BREAKER_FAILURE_THRESHOLD="1000",
        ),
        **overrides,
    }


@dataclass
class WorkerProcesses:
    """Starts ``python -m certsync worker`` processes, each logging (JSON) to its own file."""

    directory: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        path = self.directory / f"worker-{len(self.started)}.log"
        with path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "certsync", "worker", *args],
                env=env,
                cwd=self.directory,  # no stray .env
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.append(process)
        self.logs.append(path)
        return process

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    @staticmethod
    def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=timeout)

    def lines(self) -> list[str]:
        return [line for path in self.logs for line in path.read_text(errors="replace").splitlines()]

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line of every process (the summary lines the command prints are skipped)."""
        parsed = []
        for line in self.lines():
            if line.startswith("{"):
                parsed.append(json.loads(line))
        return parsed


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    item.stash.setdefault(_FAILED, False)
    if report.failed:
        item.stash[_FAILED] = True
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def workers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerProcesses]:
    processes = WorkerProcesses(tmp_path)
    yield processes
    for process in processes.started:
        if process.poll() is None:
            process.kill()
            process.wait()
    if request.node.stash.get(_FAILED, False):
        # The workers' own account of a failed test: shown by pytest as this fixture's teardown output.
        for path in processes.logs:
            tail = path.read_text(errors="replace").splitlines()[-40:]
            print(f"--- last {len(tail)} lines of {path}", *tail, sep="\n")


async def drained(pool: Pool) -> bool:
    """No outbox event waits or is in flight."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "select not exists (select 1 from public.certification_sync_events"
            " where status in ('waiting', 'in_flight')) as drained"
        )
        row = await cur.fetchone()
        assert row is not None
        return bool(row["drained"])
