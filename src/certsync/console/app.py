"""The console's FastAPI application: wiring, access rules and error mapping for pages and ``/api/``.

Pages (``pages.py``) and the JSON API (``api.py``) call the same ``ConsoleService``. Errors map once,
here: bad input 422, unknown entry 404, a conflicting action 409, database or portal configuration
unavailable 503; a page asks to sign in (303 to ``/login``), an API call without a valid bearer token
gets 401, and a form without the session's CSRF token gets 403.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from certsync.app import Runtime
from certsync.console import api, pages
from certsync.console.context import (
    Conflict,
    ConsoleContext,
    ConsoleNotReady,
    CsrfRejected,
    SignInRequired,
    Unauthorized,
    context_of,
    is_api,
    validation_message,
)
from certsync.delivery.status import SystemStatus
from certsync.errors import CertsyncError
from certsync.metrics import (
    CONTENT_TYPE,
    ProcessMetrics,
    SystemStatusCollector,
    render_metrics,
)
from certsync.resilience.clock import Clock, SystemClock
from certsync.settings import Settings

RuntimeFactory = Callable[[], AbstractAsyncContextManager[Runtime]]

_PACKAGE = resources.files("certsync.console")


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
        if isinstance(runtime, Runtime):
            runtime.instrumentation.add(process_metrics.observe)
            try:
                yield
            finally:
                runtime.instrumentation.remove(process_metrics.observe)
            return
        async with runtime() as opened:
            opened.instrumentation.add(process_metrics.observe)
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

    app.include_router(pages.router)
    app.include_router(api.router)
    app.mount("/static", StaticFiles(directory=str(Path(str(_PACKAGE.joinpath("static"))))), name="static")

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus exposition: no sign-in (aggregates only, no personal data and no secrets)."""
        status: SystemStatus | None
        try:
            status = await context.service().status()
        except (CertsyncError, psycopg.Error):
            status = None

        def read() -> SystemStatus:
            if status is None:
                raise ConsoleNotReady("no status")
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

    async def certsync_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CertsyncError)  # each kind carries its HTTP status (certsync.errors)
        return _problem(request, exc.http_status, exc.for_operator())

    async def conflict(request: Request, exc: Exception) -> Response:
        return _problem(request, 409, str(exc))

    async def database_error(request: Request, exc: Exception) -> Response:
        # Not an operational failure the store wraps: most often a database never migrated.
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return _problem(request, 503, f"database error (is it migrated? certsync migrate): {first_line}")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return _problem(request, exc.status_code, str(exc.detail))

    app.add_exception_handler(SignInRequired, sign_in)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(CsrfRejected, csrf)
    app.add_exception_handler(RequestValidationError, bad_input)
    app.add_exception_handler(CertsyncError, certsync_error)
    app.add_exception_handler(Conflict, conflict)
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
