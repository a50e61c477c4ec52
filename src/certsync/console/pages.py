"""The console's HTML pages: server-rendered, plain forms, no JavaScript needed.

Every page but the sign-in asks for a signed-in session; every POST carries the session's CSRF token
and answers with a redirect (or a result page for a filtered action), so a reload never repeats it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode
from uuid import UUID

import structlog
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import FormData

from certsync.console.auth import SESSION_COOKIE, Session
from certsync.console.context import (
    Conflict,
    CsrfRejected,
    SignInRequired,
    Unauthorized,
    context_of,
    resolve_session,
    validation_message,
)
from certsync.console.service import MAX_SELECTION, QueueFilterParams, Reason
from certsync.delivery.history import STATES, CertificationHistory
from certsync.delivery.queue import QUEUE_STATUSES
from certsync.delivery.reconcile import KINDS
from certsync.errors import BadInput, NotFound

log = structlog.get_logger(__name__)

router = APIRouter(include_in_schema=False, dependencies=[Depends(resolve_session)])

EntryId = Annotated[int, Path(ge=1, le=2**63 - 1)]
PAGE_SIZES = (25, 50, 100, 200)
_REASON: TypeAdapter[str] = TypeAdapter(Reason)

NOTICES = {
    "replayed": "Replayed: the portal accepted the certification's current state.",
    "pending": "The replay failed again; the entry is still pending (see its history).",
    "requires_investigation": "The portal refused the replay; the entry needs investigation.",
    "skipped": "Nothing to replay: the entry was already replayed or discarded.",
    "discarded": "Discarded, with your reason recorded.",
    "breaker-reset": "The circuit breaker is closed: deliveries resume.",
    "breaker-closed": "The circuit breaker was already closed.",
}


def signed_in(request: Request) -> Session:
    session = context_of(request).session(request)
    if session is None or session.operator is None:
        raise SignInRequired
    return session


async def posted_form(request: Request) -> tuple[str, FormData]:
    """A state-changing form: the operator's name, once the session and its CSRF token check out."""
    session = context_of(request).session(request)
    if session is None or session.operator is None:
        raise Unauthorized
    form = await request.form()
    if not session.accepts_csrf(text(form, "csrf_token")):
        raise CsrfRejected
    return session.operator, form


def text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def parse_filters(values: Any) -> QueueFilterParams:
    try:
        return QueueFilterParams.model_validate(dict(values))
    except ValidationError as exc:
        raise BadInput(validation_message(exc.errors())) from None


def parse_reason(form: FormData) -> str:
    try:
        return _REASON.validate_python(text(form, "reason") or "")
    except ValidationError:
        raise BadInput("a reason is required (1 to 500 characters)") from None


def render(request: Request, template: str, session: Session, **values: Any) -> Response:
    context = context_of(request)
    notice = request.query_params.get("notice")
    return context.templates.TemplateResponse(
        request,
        template,
        {"session": session, "notice": NOTICES.get(notice or ""), "now": context.clock.now(), **values},
    )


def safe_next(target: str | None) -> str:
    # Only a path on this site: never a redirect to another host (``//evil``, ``/\evil``).
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


@router.get("/login")
async def login_page(request: Request, next: str = "/") -> Response:
    context = context_of(request)
    session = context.session(request)
    if session is not None and session.operator is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    session = session or context.codec.new_anonymous()
    response = _login_form(request, session, safe_next(next), error=None, status=200)
    context.set_session(response, session)
    return response


def _login_form(
    request: Request, session: Session, target: str, *, error: str | None, status: int
) -> Response:
    context = context_of(request)
    return context.templates.TemplateResponse(
        request,
        "login.html",
        {
            "session": session,
            "next": target,
            "error": error,
            "token_sign_in": context.credentials.token is not None,
            "password_sign_in": context.credentials.username is not None,
        },
        status_code=status,
    )


@router.post("/login")
async def login(request: Request) -> Response:
    context = context_of(request)
    session = context.session(request)
    form = await request.form()
    if session is None or not session.accepts_csrf(text(form, "csrf_token")):
        raise CsrfRejected
    credentials = context.credentials
    target = safe_next(text(form, "next"))
    # Token sign-ins name no username: they are throttled together, under the empty one.
    username = text(form, "username") or ""
    if (wait := context.throttle.retry_after(username)) is not None:
        log.warning("console_sign_in_throttled", retry_after_seconds=wait)
        refused = _login_form(
            request,
            session,
            target,
            error=f"Too many failed sign-ins: try again in {_duration(wait)}.",
            status=429,
        )
        refused.headers["Retry-After"] = str(wait)
        return refused
    operator = credentials.operator_for_token(text(form, "token")) or credentials.operator_for_password(
        text(form, "username"), text(form, "password")
    )
    if operator is None:
        context.throttle.failed(username)
        return _login_form(request, session, target, error="Those credentials are not valid.", status=401)
    context.throttle.succeeded(username)
    expires_at = context.codec.expiry()
    record = await context.sessions().open(
        operator, context.clock.now(), datetime.fromtimestamp(expires_at, UTC)
    )
    response = RedirectResponse(target, status_code=303)
    context.set_session(response, session.signed_in(operator, expires_at, record))
    return response


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{-(-seconds // 60)} min"


@router.post("/logout")
async def logout(request: Request) -> Response:
    await posted_form(request)
    session = context_of(request).session(request)
    if session is not None and session.record is not None:
        await context_of(request).sessions().close(session.record)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.post("/sessions/revoke")
async def revoke_sessions(request: Request) -> Response:
    """Sign out every browser on every console process, this one included."""
    operator, _ = await posted_form(request)
    revoked = await context_of(request).sessions().close_all()
    log.info("console_sessions_revoked", operator=operator, sessions=revoked)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/")
async def overview(request: Request) -> Response:
    session = signed_in(request)
    service = context_of(request).service()
    status = await service.status()
    return render(
        request,
        "overview.html",
        session,
        status=status,
        statuses=QUEUE_STATUSES,
        reconcile=await service.last_reconcile(limit=1),
        kinds=[str(k) for k in KINDS],
    )


@router.get("/queue")
async def queue(request: Request) -> Response:
    session = signed_in(request)
    params = request.query_params
    filters = parse_filters(params)
    limit = _page_size(params.get("limit"))
    service = context_of(request).service()
    page = await service.page(filters.to_filters(service.zone), params.get("cursor"), limit)
    kept = filters.query_items()
    return render(
        request,
        "queue.html",
        session,
        filters=filters,
        page=page,
        limit=limit,
        page_sizes=PAGE_SIZES,
        statuses=QUEUE_STATUSES,
        operation_types=await service.operation_types(),
        first_page_query=urlencode([*kept, ("limit", str(limit))]),
        next_page_query=urlencode([*kept, ("limit", str(limit)), ("cursor", page.next_cursor or "")]),
        selection_query=urlencode(kept),
        is_first_page=not params.get("cursor"),
    )


def _page_size(raw: str | None) -> int:
    if not raw:
        return 50
    if not raw.isdigit() or int(raw) not in PAGE_SIZES:
        raise BadInput(f"limit: one of {', '.join(map(str, PAGE_SIZES))}")
    return int(raw)


@router.get("/queue/selection")
async def confirm_selection(request: Request, action: str = "replay") -> Response:
    session = signed_in(request)
    if action not in ("replay", "discard"):
        raise BadInput("action: 'replay' or 'discard'")
    filters = parse_filters(request.query_params)
    service = context_of(request).service()
    count = await service.selection_size(filters.to_filters(service.zone))
    return render(
        request,
        "confirm.html",
        session,
        action=action,
        filters=filters,
        hidden=filters.query_items(),
        count=count,
        max_selection=MAX_SELECTION,
        back_query=urlencode(filters.query_items()),
    )


@router.post("/queue/selection/replay")
async def replay_selection(request: Request) -> Response:
    operator, form = await posted_form(request)
    filters = parse_filters(form)
    service = context_of(request).service()
    summary = await service.replay_selection(filters.to_filters(service.zone), by=operator)
    session = signed_in(request)
    return render(
        request,
        "done.html",
        session,
        action="replay",
        total=summary.total,
        results=summary.results,
        back_query=urlencode(filters.query_items()),
    )


@router.post("/queue/selection/discard")
async def discard_selection(request: Request) -> Response:
    operator, form = await posted_form(request)
    filters = parse_filters(form)
    reason = parse_reason(form)
    service = context_of(request).service()
    discarded = await service.discard_selection(filters.to_filters(service.zone), reason=reason, by=operator)
    return render(
        request,
        "done.html",
        signed_in(request),
        action="discard",
        total=discarded,
        results={"discarded": discarded},
        back_query=urlencode(filters.query_items()),
    )


@router.get("/queue/{entry_id}")
async def entry(request: Request, entry_id: EntryId) -> Response:
    session = signed_in(request)
    row = await context_of(request).service().entry(entry_id)
    return render(
        request,
        "entry.html",
        session,
        entry=row,
        payload=json.dumps(row.payload_json, indent=2, sort_keys=True, default=str),
        history=list(reversed(row.failure_history)),
        actionable=row.actionable,
    )


@router.post("/queue/{entry_id}/replay")
async def replay_entry(request: Request, entry_id: EntryId) -> Response:
    operator, _ = await posted_form(request)
    result = await context_of(request).service().replay(entry_id, by=operator)
    return RedirectResponse(f"/queue/{entry_id}?notice={result.status}", status_code=303)


@router.post("/queue/{entry_id}/discard")
async def discard_entry(request: Request, entry_id: EntryId) -> Response:
    operator, form = await posted_form(request)
    reason = parse_reason(form)
    if not await context_of(request).service().discard(entry_id, reason=reason, by=operator):
        raise Conflict(f"entry {entry_id} was already replayed or discarded")
    return RedirectResponse(f"/queue/{entry_id}?notice=discarded", status_code=303)


@router.post("/breaker/reset")
async def reset_breaker(request: Request) -> Response:
    operator, _ = await posted_form(request)
    transition = await context_of(request).service().reset_breaker(by=operator)
    notice = "breaker-reset" if transition is not None else "breaker-closed"
    return RedirectResponse(f"/?notice={notice}", status_code=303)


@router.get("/history")
async def history(request: Request, id: str = "", of: str = "certification") -> Response:
    """Search by certification id or peer mentor id; the results below the form."""
    session = signed_in(request)
    if of not in ("certification", "mentor"):
        raise BadInput("of: 'certification' or 'mentor'")
    wanted = id.strip()
    histories: list[CertificationHistory] = []
    error: str | None = None
    status_code = 200
    if wanted:
        try:
            key = UUID(wanted)
        except ValueError:
            error, status_code = f"{wanted!r} is not an id (a UUID).", 422
        else:
            service = context_of(request).service()
            try:
                if of == "certification":
                    histories = [await service.history(key)]
                else:
                    histories = await service.mentor_history(key)
            except NotFound as exc:
                error, status_code = f"{exc}.", 404
    response = render(
        request, "history.html", session, id=wanted, of=of, histories=histories, error=error, states=STATES
    )
    response.status_code = status_code
    return response


@router.get("/reconcile")
async def reconcile(request: Request) -> Response:
    session = signed_in(request)
    last = await context_of(request).service().last_reconcile(limit=1000)
    return render(request, "reconcile.html", session, last=last, kinds=[str(k) for k in KINDS])


@router.get("/reconcile/repair")
async def confirm_repair(request: Request) -> Response:
    session = signed_in(request)
    last = await context_of(request).service().last_reconcile(limit=1)
    return render(request, "reconcile_confirm.html", session, last=last, kinds=[str(k) for k in KINDS])


@router.post("/reconcile/repair")
async def repair(request: Request) -> Response:
    operator, _ = await posted_form(request)
    report = await context_of(request).service().repair(by=operator)
    return render(
        request, "reconcile_done.html", signed_in(request), report=report, kinds=[str(k) for k in KINDS]
    )
