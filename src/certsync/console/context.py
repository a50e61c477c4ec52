"""What every console request needs, shared by the app, the pages and the API: the request's context,
the errors the handlers answer, and reading a session.

Its own module so that ``app`` (which wires the routers) and ``pages`` / ``api`` (which use these) do
not import each other.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates

from certsync.app import ConsoleSessions, Runtime
from certsync.console.auth import (
    SESSION_COOKIE,
    OperatorCredentials,
    Session,
    SessionCodec,
    SignInThrottle,
    listens_beyond_loopback,
    session_secret,
)
from certsync.console.service import ConsoleService
from certsync.errors import CertsyncError
from certsync.metrics import ProcessMetrics
from certsync.resilience.clock import Clock
from certsync.settings import Settings

_PACKAGE = resources.files("certsync.console")


class SignInRequired(Exception):
    """A page was asked for without a signed-in session (answered with a redirect to /login)."""


class Unauthorized(Exception):
    """No valid credentials for an action or an API call (401)."""


class CsrfRejected(Exception):
    """A form arrived without this session's CSRF token (403)."""


class ConsoleNotReady(CertsyncError):
    """A request arrived before the console's database connection was open (503)."""

    http_status = 503


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
            raise ConsoleNotReady("the console is not connected to the database yet")
        return ConsoleService(self.runtime)

    def sessions(self) -> ConsoleSessions:
        if self.runtime is None:
            raise ConsoleNotReady("the console is not connected to the database yet")
        return self.runtime.console_sessions()

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


def validation_message(errors: Any) -> str:
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body", "path"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid input"
