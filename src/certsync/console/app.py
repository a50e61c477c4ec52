"""The console's FastAPI application: wiring, access rules and error mapping for pages and ``/api/``.

Pages (``pages.py``) and the JSON API (``api.py``) call the same ``ConsoleService``. Errors map once,
here: bad input 422, unknown entry 404, a conflicting action 409, database or portal configuration
unavailable 503; a page asks to sign in (303 to ``/login``), an API call without a valid bearer token
gets 401, and a form without the session's CSRF token gets 403.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from certsync.app import ConfigurationError, Runtime
from certsync.console.auth import (
    SESSION_COOKIE,
    OperatorCredentials,
    Session,
    SessionCodec,
    SignInThrottle,
    listens_beyond_loopback,
    session_secret,
)
from certsync.console.service import BadInput, ConsoleService
from certsync.metrics import (
    CONTENT_TYPE,
    ProcessMetrics,
    SystemStatusCollector,
    install_log_metrics,
    render_metrics,
)
from certsync.resilience.clock import Clock, SystemClock
from certsync.settings import Settings
from certsync.store.console_queries import SystemStatus
from certsync.store.console_sessions import ConsoleSessions
from certsync.store.errors import DatabaseUnavailable, NotFound, SchemaMissing, StoreError, first_line

RuntimeFactory = Callable[[], AbstractAsyncContextManager[Runtime]]

_PACKAGE = resources.files("certsync.console")


class SignInRequired(Exception):
    """A page was asked for without a signed-in session (answered with a redirect to /login)."""


class Unauthorized(Exception):
    """No valid credentials for an action or an API call (401)."""


class CsrfRejected(Exception):
    """A form arrived without this session's CSRF token (403)."""


class Conflict(Exception):
    """The action does not apply to the entry as it is now (409), e.g. discarding a replayed entry."""


class ConsoleContext:
    """What every request needs: settings, credentials, the session codec, templates, the runtime."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        metrics: ProcessMetrics,
        runtime: Runtime | None,
        host: str | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.credentials = OperatorCredentials.from_settings(settings)
        self.codec = SessionCodec(
            session_secret(settings), timedelta(hours=settings.console_session_hours), clock
        )
        self.throttle = SignInThrottle(clock)
        # Reachable from another machine: the cookie must never travel over plain HTTP.
        self.secure_cookies = settings.console_secure_cookies or (
            host is not None and listens_beyond_loopback(host)
        )
        self.templates = Jinja2Templates(directory=str(Path(str(_PACKAGE.joinpath("templates")))))
        self.templates.env.filters["local"] = self.local_time
        self.templates.env.globals["ago"] = self.ago
        self.runtime = runtime

    def service(self) -> ConsoleService:
        if self.runtime is None:
            raise DatabaseUnavailable("the console is not connected to the database yet")
        return ConsoleService(self.runtime)

    def sessions(self) -> ConsoleSessions:
        if self.runtime is None:
            raise DatabaseUnavailable("the console is not connected to the database yet")
        return ConsoleSessions(self.runtime.pool)

    def session(self, request: Request) -> Session | None:
        """The request's session as ``resolve_session`` found it. Where it did not run, the cookie is only
        good as a signed-out session: a signed-in one is not trusted without its database record."""
        resolved = getattr(request.state, _RESOLVED_SESSION, _UNRESOLVED)
        if resolved is not _UNRESOLVED:
            return resolved if isinstance(resolved, Session) else None
        session = self.codec.decode(request.cookies.get(SESSION_COOKIE))
        return session if session is not None and session.operator is None else None

    def set_session(self, response: Response, session: Session) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            self.codec.encode(session),
            max_age=int(self.codec.lifetime.total_seconds()),
            httponly=True,
            samesite="strict",
            secure=self.secure_cookies,
            path="/",
        )

    def local_time(self, moment: datetime | None) -> str:
        if moment is None:
            return "—"
        return moment.astimezone(self.settings.zone).strftime("%Y-%m-%d %H:%M:%S %Z")

    def ago(self, moment: datetime | None, now: datetime | None = None) -> str:
        """ "3 min ago" / "in 25 s": how a person reads an age at a glance."""
        if moment is None:
            return "—"
        seconds = int(((now or self.clock.now()) - moment).total_seconds())
        span = abs(seconds)
        if span < 60:
            text = f"{span} s"
        elif span < 3600:
            text = f"{span // 60} min"
        elif span < 86400:
            text = f"{span // 3600} h {span % 3600 // 60} min"
        else:
            text = f"{span // 86400} d {span % 86400 // 3600} h"
        return f"{text} ago" if seconds >= 0 else f"in {text}"


def context_of(request: Request) -> ConsoleContext:
    context: ConsoleContext = request.app.state.console
    return context


_RESOLVED_SESSION = "console_session"
_UNRESOLVED = object()


async def resolve_session(request: Request) -> None:
    """Every page's first step: the session its cookie names, a signed-in one only while the database
    still holds its record (signing out, or revoking every session, deletes it) for the same operator."""
    context = context_of(request)
    session = context.codec.decode(request.cookies.get(SESSION_COOKIE))
    if session is not None and session.operator is not None:
        live = (
            await context.sessions().operator_of(session.record, context.clock.now())
            if session.record is not None
            else None
        )
        if live != session.operator:
            session = None
    setattr(request.state, _RESOLVED_SESSION, session)


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def create_console_app(
    runtime: Runtime | RuntimeFactory,
    settings: Settings,
    *,
    clock: Clock | None = None,
    metrics: ProcessMetrics | None = None,
    host: str | None = None,
) -> FastAPI:
    """The console. ``runtime``: an open ``Runtime`` (tests), or a factory entered for the app's lifespan
    (``lambda: open_runtime(settings)``) so that the pool lives on the server's own event loop.
    ``host``: the address it will listen on; beyond loopback, the session cookie is ``Secure``.

    Raises ``ConsoleConfigurationError`` when no operator could sign in with these settings, or a
    password or session secret is too short.
    """
    process_metrics = metrics if metrics is not None else ProcessMetrics()
    context = ConsoleContext(
        settings,
        clock or SystemClock(),
        process_metrics,
        runtime if isinstance(runtime, Runtime) else None,
        host,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        install_log_metrics(process_metrics)
        if isinstance(runtime, Runtime):
            yield
            return
        async with runtime() as opened:
            context.runtime = opened
            try:
                yield
            finally:
                context.runtime = None

    app = FastAPI(
        title="certsync operator console",
        summary="The Dynamics retry queue, the circuit breaker and delivery figures, for operators.",
        version="1",
        lifespan=lifespan,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.console = context
    _add_error_handlers(app)
    _add_security_headers(app)

    from certsync.console import api, pages

    app.include_router(pages.router)
    app.include_router(api.router)
    app.mount("/static", StaticFiles(directory=str(Path(str(_PACKAGE.joinpath("static"))))), name="static")

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus exposition: no sign-in (aggregates only, no personal data and no secrets)."""
        status: SystemStatus | None
        try:
            status = await context.service().status()
        except (StoreError, psycopg.Error):
            status = None

        def read() -> SystemStatus:
            if status is None:
                raise DatabaseUnavailable("no status")
            return status

        scrape = CollectorRegistry()
        scrape.register(SystemStatusCollector(read))
        return Response(render_metrics(scrape, process_metrics.registry), media_type=CONTENT_TYPE)

    return app


def _problem(request: Request, status: int, message: str, **extra: Any) -> Response:
    if is_api(request):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": message, **extra}, status_code=status, headers=headers)
    context = context_of(request)
    session = context.session(request)
    return context.templates.TemplateResponse(
        request,
        "message.html",
        {"title": f"{status}", "message": message, "session": session, "status": status},
        status_code=status,
    )


def validation_message(errors: Any) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body", "path"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid input"


def _add_error_handlers(app: FastAPI) -> None:
    async def sign_in(request: Request, exc: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    async def unauthorized(request: Request, exc: Exception) -> Response:
        return _problem(request, 401, "sign in first" if not is_api(request) else "a valid bearer token")

    async def csrf(request: Request, exc: Exception) -> Response:
        return _problem(request, 403, "the form's CSRF token is missing or does not match your session")

    async def bad_input(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RequestValidationError):
            if is_api(request):
                return JSONResponse({"detail": _clean_errors(exc.errors())}, status_code=422)
            return _problem(request, 422, validation_message(exc.errors()))
        return _problem(request, 422, str(exc))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _problem(request, 404, str(exc))

    async def conflict(request: Request, exc: Exception) -> Response:
        return _problem(request, 409, str(exc))

    async def unavailable(request: Request, exc: Exception) -> Response:
        return _problem(request, 503, str(exc))

    async def database_error(request: Request, exc: Exception) -> Response:
        # Not an operational failure the store wraps: most often a database never migrated.
        return _problem(request, 503, f"database error (is it migrated? certsync migrate): {first_line(exc)}")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _problem(request, exc.status_code, str(exc.detail))

    app.add_exception_handler(SignInRequired, sign_in)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(CsrfRejected, csrf)
    app.add_exception_handler(RequestValidationError, bad_input)
    app.add_exception_handler(BadInput, bad_input)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(DatabaseUnavailable, unavailable)
    app.add_exception_handler(SchemaMissing, unavailable)
    app.add_exception_handler(ConfigurationError, unavailable)
    app.add_exception_handler(psycopg.Error, database_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _clean_errors(errors: Any) -> list[Mapping[str, Any]]:
    # FastAPI's default echoes the input (``input``, ``ctx``); a password typed into the wrong field
    # must not come back in a response body.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]


def _add_security_headers(app: FastAPI) -> None:
    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if not request.url.path.startswith("/api/docs"):
            # Pages need nothing from elsewhere and are never framed (clickjacking of the forms).
            response.headers.setdefault(
                "Content-Security-Policy",
                "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
            )
            response.headers.setdefault("X-Frame-Options", "DENY")
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response
