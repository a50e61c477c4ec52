"""The composition root: the one place that wires settings, adapters and services together.

Nothing here runs at import. The CLI, the worker, the console and the demo enter ``open_runtime``
and get every collaborator built from one ``Settings``; tests build the same objects with their
own clock, sleep and HTTP transport.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import httpx
import structlog

from certsync.delivery.auto_replay import AutoReplayer
from certsync.delivery.backfill import BackfillService
from certsync.delivery.history import HistoryService
from certsync.delivery.queue import QueueService
from certsync.delivery.reconcile import PeriodicReconcile, Reconciler
from certsync.delivery.replay import ReplayService
from certsync.delivery.sinks import RetryQueueSink
from certsync.delivery.status import SystemStatus, read_system_status
from certsync.delivery.sync_service import HLFDynamicsSyncService
from certsync.dynamics.auth import ClientCredentialsTokenProvider, StaticTokenProvider, TokenProvider
from certsync.dynamics.client import DynamicsClient
from certsync.dynamics.dataverse import MAX_CONCURRENT_REQUESTS, DataverseClient
from certsync.dynamics.entra import EntraIdTokenProvider
from certsync.dynamics.port import ContractCheck, Portal
from certsync.dynamics.signing import RequestSigner
from certsync.errors import ConfigurationError
from certsync.resilience.breaker import DYNAMICS_BREAKER, DynamicsCircuitBreaker
from certsync.resilience.clock import Clock, Sleep, SystemClock, real_sleep
from certsync.resilience.gate import SendGate
from certsync.resilience.instrumentation import Instrumentation
from certsync.resilience.retry import RetryPolicy
from certsync.settings import Settings
from certsync.store import renewal_events as renewal_events  # noqa: PLC0414  (re-exported for its command)
from certsync.store.audit import AccessAuditRecorder
from certsync.store.breaker_state import PostgresBreakerStore
from certsync.store.certifications import CertificationRepository
from certsync.store.console_queries import ConsoleQueries
from certsync.store.console_sessions import ConsoleSessions as ConsoleSessions  # noqa: PLC0414  (re-exported: the console reaches the store through app)
from certsync.store.embedded import embedded_database_url
from certsync.store.heartbeats import WorkerHeartbeats
from certsync.store.history import HistoryStore
from certsync.store.migrations import MigrationReport, migrate
from certsync.store.outbox import Outbox, OutboxListener
from certsync.store.pool import Pool, open_pool
from certsync.store.reconcile import ReconcileStore
from certsync.store.retention import Retention, RetentionPolicy
from certsync.store.retry_queue import RetryQueue
from certsync.store.sweep import count_due, expire_due
from certsync.worker import Companion, HeartbeatRecorder, SyncWorker, WorkerOptions, WorkerStats, today_in

log = structlog.get_logger(__name__)


async def resolve_database_url(settings: Settings) -> str:
    """``CERTSYNC_DATABASE_URL`` when set, else the embedded PostgreSQL (started on first use)."""
    if settings.database_url:
        return settings.database_url
    data_dir = Path(settings.data_dir) if settings.data_dir else None
    return await asyncio.to_thread(embedded_database_url, data_dir)


@asynccontextmanager
async def open_pool_for(settings: Settings, *, max_size: int = 10) -> AsyncIterator[Pool]:
    pool = await open_pool(await resolve_database_url(settings), max_size=max_size)
    try:
        yield pool
    finally:
        await pool.close()


def retry_policy_from(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_retries=settings.retry_max_retries,
        base_delay=settings.retry_base_delay,
        max_retry_after=settings.retry_max_retry_after,
    )


def breaker_for(
    pool: Pool, settings: Settings, clock: Clock, instrumentation: Instrumentation | None = None
) -> DynamicsCircuitBreaker:
    """The one breaker every worker shares, its state in PostgreSQL."""
    return DynamicsCircuitBreaker(
        DYNAMICS_BREAKER,
        # A healthy delivery skips the breaker's two round trips for a second at a time; an outage
        # seen by another worker reaches this one at most that much later.
        PostgresBreakerStore(pool, closed_cache_seconds=1.0),
        clock,
        failure_threshold=settings.breaker_failure_threshold,
        cooldown=settings.breaker_cooldown,
        # The probe's holder may take one full request and a token fetch before another may probe.
        probe_lease=2 * settings.http_timeout + 5.0,
        instrumentation=instrumentation,
    )


def token_provider_from(
    settings: Settings, http: httpx.AsyncClient, clock: Clock, instrumentation: Instrumentation | None = None
) -> TokenProvider:
    """Entra ID through msal (a tenant is set), the plain OAuth2 flow (a token URL), or a static token."""
    if settings.dynamics_tenant_id:
        return entra_token_provider_from(settings)
    if settings.dynamics_token_url:
        if not settings.dynamics_client_id or settings.dynamics_client_secret is None:
            raise ConfigurationError(
                "CERTSYNC_DYNAMICS_CLIENT_ID and CERTSYNC_DYNAMICS_CLIENT_SECRET must be set with"
                " CERTSYNC_DYNAMICS_TOKEN_URL"
            )
        return ClientCredentialsTokenProvider(
            http,
            settings.dynamics_token_url,
            client_id=settings.dynamics_client_id,
            client_secret=settings.dynamics_client_secret.get_secret_value(),
            scope=token_scope(settings),
            clock=clock,
            timeout=settings.http_timeout,
            instrumentation=instrumentation,
        )
    if settings.dynamics_token is not None:
        return StaticTokenProvider(settings.dynamics_token.get_secret_value())
    raise ConfigurationError(
        "CERTSYNC_DYNAMICS_TOKEN, CERTSYNC_DYNAMICS_TENANT_ID (Entra ID) or CERTSYNC_DYNAMICS_TOKEN_URL"
        " (with client id and secret) must be set"
    )


def token_scope(settings: Settings) -> str:
    """``CERTSYNC_DYNAMICS_SCOPE``; in dataverse mode it defaults to ``{base}/.default``."""
    if settings.dynamics_scope:
        return settings.dynamics_scope
    if settings.dynamics_api == "dataverse" and settings.dynamics_base_url:
        return settings.dynamics_base_url.rstrip("/") + "/.default"
    return ""


def entra_token_provider_from(settings: Settings) -> EntraIdTokenProvider:
    if not settings.dynamics_client_id:
        raise ConfigurationError("CERTSYNC_DYNAMICS_CLIENT_ID must be set with CERTSYNC_DYNAMICS_TENANT_ID")
    secret = settings.dynamics_client_secret
    certificate = settings.dynamics_client_certificate
    if (secret is None) == (certificate is None):
        raise ConfigurationError(
            "with CERTSYNC_DYNAMICS_TENANT_ID set exactly one of CERTSYNC_DYNAMICS_CLIENT_SECRET and"
            " CERTSYNC_DYNAMICS_CLIENT_CERTIFICATE"
        )
    scope = token_scope(settings)
    if not scope:
        raise ConfigurationError("CERTSYNC_DYNAMICS_SCOPE must be set with CERTSYNC_DYNAMICS_TENANT_ID")
    try:
        return EntraIdTokenProvider(
            tenant_id=settings.dynamics_tenant_id or "",
            client_id=settings.dynamics_client_id,
            scope=scope,
            client_secret=secret.get_secret_value() if secret is not None else None,
            certificate_path=certificate,
            authority_host=settings.dynamics_authority_host,
            timeout=settings.http_timeout,
        )
    except ValueError as exc:
        raise ConfigurationError(f"CERTSYNC_DYNAMICS_CLIENT_CERTIFICATE: {exc}") from None


def portal_from(
    settings: Settings,
    http: httpx.AsyncClient,
    clock: Clock,
    gate: SendGate | None = None,
    instrumentation: Instrumentation | None = None,
) -> Portal:
    """The adapter for the wire ``CERTSYNC_DYNAMICS_API`` names."""
    if settings.dynamics_api == "dataverse":
        return dataverse_client_from(settings, http, clock, gate, instrumentation)
    return dynamics_client_from(settings, http, clock, gate, instrumentation)


def dataverse_client_from(
    settings: Settings,
    http: httpx.AsyncClient,
    clock: Clock,
    gate: SendGate | None = None,
    instrumentation: Instrumentation | None = None,
) -> DataverseClient:
    if not settings.dynamics_base_url:
        raise ConfigurationError("CERTSYNC_DYNAMICS_BASE_URL is not set (the environment URL)")
    return DataverseClient(
        http,
        settings.dynamics_base_url,
        token_provider_from(settings, http, clock, instrumentation),
        table=settings.dataverse_table,
        entity_set=settings.dataverse_entity_set,
        clock=clock,
        timeout=settings.http_timeout,
        gate=gate,
        instrumentation=instrumentation,
    )


def dynamics_client_from(
    settings: Settings,
    http: httpx.AsyncClient,
    clock: Clock,
    gate: SendGate | None = None,
    instrumentation: Instrumentation | None = None,
) -> DynamicsClient:
    if not settings.dynamics_base_url:
        raise ConfigurationError("CERTSYNC_DYNAMICS_BASE_URL is not set")
    signer = None
    if settings.dynamics_signing_secret is not None:
        try:
            signer = RequestSigner(settings.dynamics_signing_secret.get_secret_value())
        except ValueError as exc:
            raise ConfigurationError(f"CERTSYNC_DYNAMICS_SIGNING_SECRET: {exc}") from None
    return DynamicsClient(
        http,
        settings.dynamics_base_url,
        token_provider_from(settings, http, clock, instrumentation),
        signer=signer,
        clock=clock,
        timeout=settings.http_timeout,
        gate=gate,
        instrumentation=instrumentation,
    )


def send_gate_from(settings: Settings, clock: Clock, sleep: Sleep) -> SendGate:
    """The one gate all of this process's portal requests share: 429 pauses and budget pacing."""
    return SendGate(
        clock,
        sleep,
        window_seconds=settings.dynamics_rate_window_seconds,
        max_requests_per_window=settings.dynamics_max_requests_per_window,
    )


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(slots=True)
class Runtime:
    """Everything a command needs, built once from settings.

    The portal adapter (with its token cache) and the services over it are built on first use and then
    kept for the process: a command that never talks to the portal needs no portal configuration, and
    every replay of a console process shares one client and one token.
    """

    settings: Settings
    pool: Pool
    database_url: str
    clock: Clock
    sleep: Sleep
    http: httpx.AsyncClient
    breaker: DynamicsCircuitBreaker
    queue: RetryQueue
    gate: SendGate
    instrumentation: Instrumentation
    _portal: Portal | None = field(default=None, init=False, repr=False)
    _sync: HLFDynamicsSyncService | None = field(default=None, init=False, repr=False)
    _replays: ReplayService | None = field(default=None, init=False, repr=False)

    def portal(self) -> Portal:
        """The configured portal's adapter (``CERTSYNC_DYNAMICS_API``), built once."""
        if self._portal is None:
            self._portal = portal_from(self.settings, self.http, self.clock, self.gate, self.instrumentation)
        return self._portal

    def sync_service(self) -> HLFDynamicsSyncService:
        if self._sync is None:
            self._sync = HLFDynamicsSyncService(
                self.portal(),
                retry_policy_from(self.settings),
                self.breaker,
                RetryQueueSink(self.queue, self.clock),
                clock=self.clock,
                sleep=self.sleep,
                gate=self.gate,
                instrumentation=self.instrumentation,
            )
        return self._sync

    def replay_service(self) -> ReplayService:
        if self._replays is None:
            self._replays = ReplayService(
                self.queue,
                self.sync_service(),
                self.clock,
                self.settings.zone,
                organisation_id=self.settings.dynamics_organisation_id,
            )
        return self._replays

    def queue_service(self) -> QueueService:
        return QueueService(self.queue, ConsoleQueries(self.pool), self.replay_service, self.clock)

    def console_sessions(self) -> ConsoleSessions:
        """The operator console's signed-in sessions (``console_sessions``), shared by its processes."""
        return ConsoleSessions(self.pool)

    async def system_status(self) -> SystemStatus:
        return await read_system_status(self.pool, self.breaker, self.clock.now())

    def today(self) -> date:
        """Today where ``CERTSYNC_TIMEZONE`` says (expiry and public listing are decided there)."""
        return today_in(self.settings.zone, self.clock)

    async def expire_due(self) -> int:
        """The expiry sweep, now: every active certification past its ``valid_until``, in one statement."""
        return await expire_due(self.pool, self.today())

    async def count_expiring(self) -> int:
        """``sweep --dry-run``: how many the sweep would expire now."""
        return await count_due(self.pool, self.today())

    def certifications(self) -> CertificationRepository:
        return CertificationRepository(self.pool, clock=self.clock, zone=self.settings.zone)

    def outbox(self) -> Outbox:
        return Outbox(self.pool, worker_id(), organisation_id=self.settings.dynamics_organisation_id)

    def auto_replayer(self) -> AutoReplayer:
        """Replays due pending queue entries by itself (``CERTSYNC_AUTO_REPLAY``), as ``auto-replay``."""
        return AutoReplayer(
            self.queue, self.replay_service(), self.breaker, self.clock, instrumentation=self.instrumentation
        )

    def retention(self) -> Retention:
        """Deletes old finished outbox events, queue entries and access-audit records, in batches."""
        return Retention(
            self.pool,
            RetentionPolicy(
                outbox_days=self.settings.outbox_retention_days,
                queue_days=self.settings.queue_retention_days,
                audit_days=self.settings.audit_retention_days,
            ),
        )

    def backfill(self) -> BackfillService:
        """``certsync backfill``: queue the current state of chosen certifications, in keyset batches."""
        return BackfillService(self.pool)

    def history(self) -> HistoryService:
        """``certsync history`` and the console's History page: one certification's sync history."""
        return HistoryService(HistoryStore(self.pool), ReconcileStore(self.pool))

    def reconciler(self) -> Reconciler:
        """``certsync reconcile`` and the worker's periodic reconcile: the portal's listing against the
        database's, in this portal's organisation scope, with "today" where ``CERTSYNC_TIMEZONE`` says."""
        return Reconciler(
            self.portal(),
            ReconcileStore(self.pool),
            clock=self.clock,
            today=self.today,
            organisation_id=self.settings.dynamics_organisation_id,
        )

    def periodic_reconcile(self) -> PeriodicReconcile | None:
        """The worker's companion that reconciles every ``CERTSYNC_RECONCILE_INTERVAL_SECONDS`` (0: none;
        none either with sync off: a repair would only wait in the outbox)."""
        interval = self.settings.reconcile_interval_seconds
        if interval <= 0 or not self.settings.sync_enabled:
            return None
        return PeriodicReconcile(
            self.reconciler(), interval_seconds=interval, sleep=self.sleep, started_by=f"worker {worker_id()}"
        )

    def worker(
        self,
        options: WorkerOptions | None = None,
        *,
        listen: bool = True,
        reconcile: bool = False,
        on_progress: Callable[[WorkerStats], None] | None = None,
    ) -> SyncWorker:
        """``reconcile``: run the periodic reconcile beside the deliveries (``certsync worker`` does,
        ``worker --once`` does not)."""
        options = options or WorkerOptions()
        if self.settings.dynamics_api == "dataverse":
            options = dataclasses.replace(options, batch_size=self.settings.dataverse_batch_size)
        concurrency = options.concurrency
        if self.settings.dynamics_api == "dataverse" and concurrency > MAX_CONCURRENT_REQUESTS:
            raise ConfigurationError(
                f"--concurrency {concurrency}: Dataverse allows at most {MAX_CONCURRENT_REQUESTS}"
                " concurrent requests per user"
            )
        if self.settings.sync_enabled and self.settings.dynamics_organisation_id is None:
            log.warning(
                "organisation_scope_unset",
                hint="CERTSYNC_DYNAMICS_ORGANISATION_ID is not set: every organisation's mentors are sent"
                " to this portal",
            )
        sending = self.settings.sync_enabled
        companions: tuple[Companion, ...] = (
            (
                AccessAuditRecorder(self.database_url),
                HeartbeatRecorder(
                    WorkerHeartbeats(self.pool),
                    worker_id(),
                    clock=self.clock,
                    sleep=self.sleep,
                    sending=self.settings.sync_enabled,
                ),
            )
            if listen
            else ()
        )
        periodic = self.periodic_reconcile() if reconcile else None
        if periodic is not None:
            companions = (*companions, periodic)
        return SyncWorker(
            pool=self.pool,
            outbox=self.outbox(),
            # With the flag off no client is built (none need be configured) and nothing is sent.
            service=self.sync_service() if self.settings.sync_enabled else None,
            clock=self.clock,
            sleep=self.sleep,
            zone=self.settings.zone,
            listener=OutboxListener(self.database_url) if listen else None,
            companions=companions,
            options=options,
            on_progress=on_progress,
            auto_replay=self.auto_replayer() if sending and self.settings.auto_replay else None,
            # Retention runs with the flag off too: it deletes only what is finished.
            retention=self.retention(),
        )


async def migrate_database(settings: Settings) -> MigrationReport:
    """``certsync migrate``: apply the migrations (and, on a plain PostgreSQL, the local shims first)."""
    async with open_pool_for(settings, max_size=1) as pool, pool.connection() as conn:
        return await migrate(conn)


async def check_portal_contract(settings: Settings) -> ContractCheck:
    """``certsync contract check``: only the portal is asked; no database is opened (nor started)."""
    async with httpx.AsyncClient(timeout=settings.http_timeout) as http:
        return await portal_from(settings, http, SystemClock()).check_contract()


@asynccontextmanager
async def open_runtime(
    settings: Settings,
    *,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    max_pool_size: int | None = None,
) -> AsyncIterator[Runtime]:
    """Open the pool and the HTTP client; close both on exit."""
    clock = clock or SystemClock()
    sleep = sleep or real_sleep
    database_url = await resolve_database_url(settings)
    pool = await open_pool(database_url, max_size=max_pool_size or 10)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    http = httpx.AsyncClient(transport=transport, timeout=settings.http_timeout, limits=limits)
    instrumentation = Instrumentation()
    try:
        yield Runtime(
            settings=settings,
            pool=pool,
            database_url=database_url,
            clock=clock,
            sleep=sleep,
            http=http,
            breaker=breaker_for(pool, settings, clock, instrumentation),
            queue=RetryQueue(pool),
            gate=send_gate_from(settings, clock, sleep),
            instrumentation=instrumentation,
        )
    finally:
        await http.aclose()
        await pool.close()
