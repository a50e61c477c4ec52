"""``certsync demo``: the whole flow on a laptop in under a minute.

A fresh ``certsync_demo`` database (on the embedded PostgreSQL unless CERTSYNC_DATABASE_URL is set;
real data is never touched), the local Dynamics sandbox on a free port, two organisations of sample
data, an expiry sweep, and the worker through a scripted outage: retries, the circuit opening,
changes waiting in the outbox, a half-open probe, recovery, a 429, a 4xx for investigation, and a
manual replay. Delays are compressed (retry base 0.2 s, cool-down 2 s) so it finishes quickly.

``api="dataverse"`` (``certsync demo --api dataverse``) runs the Dataverse Web API emulator instead:
the sample data and a cohort's mass expiry in UpsertMultiple calls, service protection's 429s that
pause sending without touching the circuit, a row a plug-in refuses split out of its bulk call for
investigation and replayed once fixed, a PATCH, a DELETE, and a reconcile over the OData read.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import SecretStr

from certsync.app import Runtime, open_runtime, resolve_database_url
from certsync.resilience.instrumentation import CircuitTransitioned, DeliveryEvent, RetryScheduled
from certsync.sandbox.dataverse_state import DataverseConfig, DataverseEmulator, DataverseRequest
from certsync.sandbox.faults import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from certsync.sandbox.state import DEFAULT_TOKEN, SandboxConfig
from certsync.settings import Settings
from certsync.store.errors import DatabaseUnavailable, first_line
from certsync.store.migrations import migrate
from certsync.store.outbox import Outbox
from certsync.store.sweep import expire_due
from certsync.worker import WorkerOptions, WorkerStats

DEMO_DATABASE = "certsync_demo"
RETRY_BASE_DELAY = 0.2
BREAKER_COOLDOWN = 2.0

_ORGANISATIONS = {
    "Landsforeningen Nord": ["Tromsø", "Bodø"],
    "Landsforeningen Vest": ["Bergen", "Stavanger", "Haugesund"],
}
# Fictional mentors: (display name, chapters, days until their certification ends; < 0 = already passed)
_MENTORS = [
    ("Ingrid Berg", ["Tromsø"], 400),
    ("Ola Nordmann", ["Tromsø", "Bergen"], 200),  # in two organisations' chapters
    ("Kari Holm", ["Bodø"], -1),
    ("Per Lie", ["Bodø"], 90),
    ("Sigrid Dahl", ["Bergen"], -3),
    ("Lars Moen", ["Bergen"], 365),
    ("Nora Strand", ["Stavanger"], 30),
    ("Emil Aas", ["Stavanger"], -10),
    ("Maja Vik", ["Haugesund"], 180),
    ("Jonas Lund", ["Haugesund"], 500),
]

# Dataverse: a cohort whose certifications all ended on the same day, so that the sweep's expiries need
# several UpsertMultiple calls; service protection's 429s come as many as the circuit's threshold (at
# most MAX_RATE_LIMITED of them, each a pause of RATE_LIMIT_RETRY_AFTER, to stay well under a minute).
COHORT = 300
RATE_LIMIT_RETRY_AFTER = 1
MAX_RATE_LIMITED = 5

DemoApi = Literal["contract-v1", "dataverse"]


@dataclass(slots=True)
class DemoReport:
    """What the demo did, for the summary table."""

    api: DemoApi = "contract-v1"
    delivered: int = 0
    retries: int = 0
    queued_pending: int = 0
    requires_investigation: int = 0
    replayed: int = 0
    transitions: list[str] = field(default_factory=list)
    waited_in_outbox: int = 0
    expired: int = 0
    listing_before: list[str] = field(default_factory=list)
    listing_after: list[str] = field(default_factory=list)
    listing_matches_database: bool = False
    portal_requests: int = 0
    database_url: str = ""
    log_file: str = ""
    seconds: float = 0.0
    # Dataverse (--api dataverse): what the emulator's request log says, and the closing reconcile.
    bulk_targets: list[int] = field(default_factory=list)
    bulk_refused: int = 0
    single_writes: int = 0
    deletes: int = 0
    rate_limited: int = 0
    investigated: list[str] = field(default_factory=list)
    reconcile_read: int = 0
    reconcile_mismatches: int | None = None
    portal: SandboxServer | None = field(default=None, repr=False)
    """The local portal the demo ran against, stopped, with its state and request log (for tests)."""

    @property
    def succeeded(self) -> bool:
        """Whether the portal ends as the database says: the listing (contract v1), a clean
        reconcile (Dataverse)."""
        if self.api == "dataverse":
            return self.reconcile_mismatches == 0
        return self.listing_matches_database

    def observe(self, event: DeliveryEvent) -> None:
        """The demo's own instrumentation hook: counts retries, records circuit transitions."""
        if isinstance(event, RetryScheduled):
            self.retries += 1
        elif isinstance(event, CircuitTransitioned):
            self.transitions.append(f"{event.old} → {event.new}")

    def add(self, stats: WorkerStats) -> None:
        self.delivered += stats.delivered
        self.queued_pending += stats.queued_pending
        self.requires_investigation += stats.queued_investigation
        # CERTSYNC_AUTO_REPLAY: once the portal is back the worker replays the outage's pending
        # entries itself, before the demo's own replay step finds them.
        self.replayed += stats.auto_replayed


def _configure_demo_logging(log_file: Path) -> Any:
    handle = log_file.open("w", encoding="utf-8")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(file=handle),
        cache_logger_on_first_use=False,
    )
    return handle


async def _fresh_database(server_url: str) -> str:
    """Drop and recreate ``certsync_demo`` on the server; return its URL."""
    try:
        async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
            name = sql.Identifier(DEMO_DATABASE)
            await conn.execute(sql.SQL("drop database if exists {} with (force)").format(name))
            await conn.execute(sql.SQL("create database {}").format(name))
    except psycopg.Error as exc:
        raise DatabaseUnavailable(
            f"could not create the {DEMO_DATABASE} database: {first_line(exc)}"
        ) from exc
    params = conninfo_to_dict(server_url)
    params["dbname"] = DEMO_DATABASE
    return make_conninfo(**params)  # type: ignore[arg-type]


async def _seed(runtime: Runtime, today: date) -> dict[str, UUID]:
    """Two organisations, five chapters, a coordinator in two of them, ten mentors, one certification each."""
    certifications: dict[str, UUID] = {}
    async with runtime.pool.connection() as conn, conn.transaction():
        chapters: dict[str, UUID] = {}
        for organisation, names in _ORGANISATIONS.items():
            org_id = await _new_id(
                conn, "insert into organisations (name) values (%s) returning id", (organisation,)
            )
            for name in names:
                chapters[name] = await _new_id(
                    conn,
                    "insert into chapters (organisation_id, name) values (%s, %s) returning id",
                    (org_id, name),
                )
        coordinator = await _new_id(
            conn,
            "insert into auth.users (id, email) values (gen_random_uuid(), 'coordinator@example.org')"
            " returning id",
        )
        for chapter in ("Tromsø", "Bergen"):
            await conn.execute(
                "insert into chapter_memberships (user_id, chapter_id, role) values (%s, %s, 'coordinator')",
                (coordinator, chapters[chapter]),
            )
        for index, (name, member_of, days) in enumerate(_MENTORS):
            user = await _new_id(
                conn,
                "insert into auth.users (id, email) values (gen_random_uuid(), %s) returning id",
                (f"mentor{index}@example.org",),
            )
            mentor = await _new_id(
                conn,
                "insert into peer_mentors (user_id, display_name) values (%s, %s) returning id",
                (user, name),
            )
            for chapter in member_of:
                await conn.execute(
                    "insert into chapter_memberships (user_id, chapter_id, role)"
                    " values (%s, %s, 'peer_mentor')",
                    (user, chapters[chapter]),
                )
            # Certifications that have already passed their end date are still 'active' until the sweep.
            certifications[name] = await _new_id(
                conn,
                "insert into certifications (peer_mentor_id, valid_from, valid_until)"
                " values (%s, %s, %s) returning id",
                (mentor, today - timedelta(days=700), today + timedelta(days=days)),
            )
    return certifications


async def _new_id(conn: psycopg.AsyncConnection[Any], statement: str, params: tuple[Any, ...] = ()) -> UUID:
    """Run an ``insert … returning id`` and return the id."""
    cur = await conn.execute(statement, params)
    row = await cur.fetchone()
    assert row is not None
    return UUID(str(row["id"]))


async def _listing_names(runtime: Runtime, mentor_ids: list[str]) -> list[str]:
    async with runtime.pool.connection() as conn:
        cur = await conn.execute(
            "select display_name from peer_mentors where id = any(%s::uuid[]) order by display_name",
            (mentor_ids,),
        )
        return [str(r["display_name"]) for r in await cur.fetchall()]


async def _expected_listing(runtime: Runtime, today: date) -> set[str]:
    async with runtime.pool.connection() as conn:
        cur = await conn.execute(
            "select distinct peer_mentor_id::text as id from certifications"
            " where status = 'active' and valid_until >= %s",
            (today,),
        )
        return {str(r["id"]) for r in await cur.fetchall()}


Step = Callable[[str], None]


async def run_demo(
    settings: Settings, log_dir: Path, step: Step, *, api: DemoApi | None = None
) -> DemoReport:
    """Run every phase; ``step`` is told what is happening (the CLI shows it as progress).

    ``api``: the wire the demo's local portal speaks, contract v1's sandbox or the Dataverse emulator
    (default: ``CERTSYNC_DYNAMICS_API``)."""
    report = DemoReport(api=api or settings.dynamics_api)
    log_file = log_dir / "certsync-demo.log"
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    report.log_file = str(log_file)
    previous_logging = structlog.get_config()
    handle = _configure_demo_logging(log_file)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        step("Starting PostgreSQL and creating the certsync_demo database")
        demo_url = await _fresh_database(await resolve_database_url(settings))
        report.database_url = demo_url
        async with await psycopg.AsyncConnection.connect(demo_url) as conn:
            await migrate(conn)
        if report.api == "dataverse":
            await _dataverse_demo(settings, demo_url, report, step)
        else:
            await _contract_v1_demo(settings, demo_url, report, step)
    finally:
        report.seconds = loop.time() - started
        structlog.configure(**previous_logging)
        handle.close()
    return report


def demo_settings(settings: Settings, database_url: str, portal_url: str, api: DemoApi) -> Settings:
    """The settings the demo runs with: its own database and local portal, whatever the environment
    says about a real one (its wire, table names, organisation scope and Entra ID sign-in included).
    The local portal's own token always: a real portal's token in the environment is never sent to it."""
    defaults = Settings.model_fields
    return settings.model_copy(
        update={
            "database_url": database_url,
            "dynamics_api": api,
            "dynamics_base_url": portal_url,
            "dynamics_sync_enabled": True,
            "dynamics_token": _secret(DEFAULT_TOKEN),
            "dynamics_token_url": None,
            "dynamics_tenant_id": None,
            "dynamics_client_certificate": None,
            "dynamics_signing_secret": None,
            "dynamics_organisation_id": None,
            "dataverse_table": defaults["dataverse_table"].default,
            "dataverse_entity_set": defaults["dataverse_entity_set"].default,
            "retry_base_delay": RETRY_BASE_DELAY,
            "breaker_cooldown": BREAKER_COOLDOWN,
        }
    )


def _secret(value: str) -> SecretStr:
    return SecretStr(value)


async def _contract_v1_demo(settings: Settings, database_url: str, report: DemoReport, step: Step) -> None:
    step("Starting the local Dynamics sandbox")
    with SandboxServer(SandboxConfig()) as portal:
        report.portal = portal
        await _phases(demo_settings(settings, database_url, portal.url, "contract-v1"), portal, report, step)
        report.portal_requests = sum(1 for r in portal.sandbox.requests() if r.method == "PUT")


async def _phases(settings: Settings, portal: SandboxServer, report: DemoReport, step: Step) -> None:
    # The demo sweeps explicitly, during the outage, so that the expiries are seen waiting and flowing.
    options = WorkerOptions(concurrency=2, poll_seconds=0.2, heartbeat_seconds=1.0, sweep=False)
    async with open_runtime(settings) as runtime:
        runtime.instrumentation.add(report.observe)
        today = runtime.clock.now().astimezone(settings.zone).date()
        step("Loading two organisations, five chapters and ten mentors")
        certs = await _seed(runtime, today)

        step("Delivering every new certification to the portal")
        report.add(await runtime.worker(options, listen=False).run(once=True))
        report.listing_before = await _listing_names(runtime, portal.sandbox.public_listing())

        step("Portal outage: every PUT answers 503; three certifications pass their end date")
        portal.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=None, scope="put"),)))
        report.expired = await expire_due(runtime.pool, today)
        await runtime.certifications().revoke(certs["Per Lie"])
        stats = await runtime.worker(options, listen=False).run(once=True)
        report.add(stats)
        report.waited_in_outbox = await _outbox_waiting(runtime)

        step(f"Portal back; waiting {BREAKER_COOLDOWN:.0f} s of cool-down for the half-open probe")
        portal.sandbox.load_faults(FaultScript())
        await asyncio.sleep(BREAKER_COOLDOWN + 0.1)
        report.add(await runtime.worker(options, listen=False).run(once=True))

        step("Replaying what the outage left in the retry queue (the worker already replays it itself)")
        replay = runtime.replay_service()
        summary = await replay.replay_all(status="pending", by="demo")
        report.replayed += summary.results.get("replayed", 0)

        step("A 429 with Retry-After: 1 s pauses all sending, then the renewal goes through")
        portal.sandbox.load_faults(
            FaultScript(steps=(FaultStep(status=429, retry_after=1, times=1, scope="put"),))
        )
        await runtime.certifications().renew(
            certs["Nora Strand"], new_valid_until=today + timedelta(days=730), renewed_by=certs["Nora Strand"]
        )
        report.add(await runtime.worker(options, listen=False).run(once=True))

        step("The portal refuses one request as invalid (400): kept for investigation")
        portal.sandbox.load_faults(FaultScript(steps=(FaultStep(status=400, times=1, scope="put"),)))
        await runtime.certifications().renew(
            certs["Jonas Lund"], new_valid_until=today + timedelta(days=900), renewed_by=certs["Jonas Lund"]
        )
        report.add(await runtime.worker(options, listen=False).run(once=True))
        portal.sandbox.load_faults(FaultScript())

        listed = set(portal.sandbox.public_listing())
        report.listing_after = await _listing_names(runtime, sorted(listed))
        report.listing_matches_database = listed == await _expected_listing(runtime, today)


async def _dataverse_demo(settings: Settings, database_url: str, report: DemoReport, step: Step) -> None:
    step("Starting the local Dataverse Web API emulator")
    with SandboxServer(DataverseConfig()) as portal:
        report.portal = portal
        try:
            await _dataverse_phases(
                demo_settings(settings, database_url, portal.url, "dataverse"), portal.dataverse, report, step
            )
        finally:
            _count_dataverse_requests(portal.dataverse.requests(), report)


async def _dataverse_phases(
    settings: Settings, emulator: DataverseEmulator, report: DemoReport, step: Step
) -> None:
    options = WorkerOptions(concurrency=2, poll_seconds=0.2, heartbeat_seconds=1.0, sweep=False)
    batch = settings.dataverse_batch_size
    pauses = min(settings.breaker_failure_threshold, MAX_RATE_LIMITED)
    async with open_runtime(settings) as runtime:
        runtime.instrumentation.add(report.observe)
        today = runtime.clock.now().astimezone(settings.zone).date()
        step(
            f"Loading two organisations, ten mentors and a cohort of {COHORT} whose certifications ended"
            " yesterday"
        )
        certs = await _seed(runtime, today)
        cohort = await _seed_cohort(runtime, today, COHORT)

        step(
            f"Delivering them {bulk_calls(batch)}; service protection answers {pauses} × 429,"
            f" Retry-After {RATE_LIMIT_RETRY_AFTER} s: sending pauses, no failure counts"
        )
        emulator.load_faults(
            FaultScript(
                steps=(
                    FaultStep(status=429, retry_after=RATE_LIMIT_RETRY_AFTER, times=pauses, scope="write"),
                )
            )
        )
        report.add(await runtime.worker(options, listen=False).run(once=True))
        emulator.load_faults(FaultScript())

        refused = cohort[len(cohort) // 2]
        step("The sweep expires the cohort at once; a Dataverse plug-in refuses one of its rows")
        emulator.set_refused([str(refused)])
        report.expired = await expire_due(runtime.pool, today)
        report.add(await runtime.worker(options, listen=False).run(once=True))
        report.investigated = [
            str(entry.certification_id)
            for entry in await runtime.queue.list_entries(status="requires_investigation")
        ]

        step("The plug-in is fixed; the refused row is replayed from the retry queue")
        emulator.set_refused([])
        summary = await runtime.replay_service().replay_all(status="requires_investigation", by="demo")
        report.replayed += summary.results.get("replayed", 0)

        step("One renewal (a single PATCH) and one certification deleted (DELETE)")
        await runtime.certifications().renew(
            certs["Nora Strand"], new_valid_until=today + timedelta(days=730), renewed_by=certs["Nora Strand"]
        )
        async with runtime.pool.connection() as conn:
            await conn.execute("delete from certifications where id = %s", (certs["Maja Vik"],))
        report.add(await runtime.worker(options, listen=False).run(once=True))

        step("Reconciling: the table read back through OData paging, compared with the database")
        reconciled = await runtime.reconciler().reconcile(repair=False, started_by="demo")
        report.reconcile_read = reconciled.portal_held
        report.reconcile_mismatches = len(reconciled.mismatches)


async def _seed_cohort(runtime: Runtime, today: date, size: int) -> list[UUID]:
    """``size`` fictional mentors in one chapter, each with a certification that ended yesterday (still
    active until the sweep)."""
    async with runtime.pool.connection() as conn, conn.transaction():
        # Memberships first, then the certifications: each certification is captured once, as created.
        cur = await conn.execute(
            """
            with numbered as (
                select gen_random_uuid() as user_id, n from generate_series(1, %s) as n
            ), users as (
                insert into auth.users (id, email)
                select user_id, format('cohort%%s@example.org', n) from numbered returning id
            ), mentors as (
                insert into peer_mentors (user_id, display_name)
                select id, format('Cohort mentor %%s', n) from users join numbered on user_id = id
                returning id, user_id
            ), memberships as (
                insert into chapter_memberships (user_id, chapter_id, role)
                select user_id, (select id from chapters where name = 'Bergen'), 'peer_mentor' from mentors
            )
            select id from mentors
            """,
            (size,),
        )
        mentors = [row["id"] for row in await cur.fetchall()]
        cur = await conn.execute(
            "insert into certifications (peer_mentor_id, valid_from, valid_until)"
            " select unnest(%s::uuid[]), %s, %s returning id",
            (mentors, today - timedelta(days=365), today - timedelta(days=1)),
        )
        return sorted(UUID(str(row["id"])) for row in await cur.fetchall())


def bulk_calls(batch_size: int) -> str:
    """How ``CERTSYNC_DATAVERSE_BATCH_SIZE`` sends due changes, in words."""
    if batch_size == 1:
        return "as one PATCH per change (CERTSYNC_DATAVERSE_BATCH_SIZE=1)"
    return f"in bulk: UpsertMultiple, up to {batch_size} per call"


def _count_dataverse_requests(requests: list[DataverseRequest], report: DemoReport) -> None:
    """What the emulator received, from its own request log."""
    report.portal_requests = len(requests)
    for request in requests:
        if request.status == 429:
            report.rate_limited += 1
        elif request.method == "POST" and request.targets is not None:
            if request.status == 200:
                report.bulk_targets.append(request.targets)
            elif request.status is not None and 400 <= request.status < 500:
                report.bulk_refused += 1
        elif request.method == "PATCH":
            report.single_writes += 1
        elif request.method == "DELETE":
            report.deletes += 1


async def _outbox_waiting(runtime: Runtime) -> int:
    return (await Outbox(runtime.pool, "demo").depth()).waiting


def transitions_summary(transitions: list[str]) -> str:
    counts = Counter(transitions)
    return ", ".join(f"{t} ×{n}" if n > 1 else t for t, n in counts.items()) or "none"
