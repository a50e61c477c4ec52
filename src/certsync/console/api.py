"""The console's JSON API under ``/api/`` (OpenAPI at ``/api/openapi.json``): the pages' data and actions
for scripts, with a bearer token (``CERTSYNC_CONSOLE_OPERATOR_TOKEN``) instead of a session."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from certsync.console.context import Conflict, Unauthorized, context_of
from certsync.console.service import MAX_SELECTION, ConsoleService, QueueFilterParams, Reason
from certsync.delivery.queue import QUEUE_STATUSES
from certsync.delivery.replay import ReplayResult
from certsync.delivery.status import BreakerStatus, SystemStatus

_bearer = HTTPBearer(auto_error=False, description="CERTSYNC_CONSOLE_OPERATOR_TOKEN")


def operator(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The operator a valid bearer token acts as; 401 otherwise."""
    token = credentials.credentials if credentials is not None else None
    name = context_of(request).credentials.operator_for_token(token)
    if name is None:
        raise Unauthorized
    return name


Operator = Annotated[str, Depends(operator)]


def service(request: Request) -> ConsoleService:
    return context_of(request).service()


Service = Annotated[ConsoleService, Depends(service)]
EntryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="the retry queue entry's id")]
Filters = Annotated[QueueFilterParams, Query()]

router = APIRouter(prefix="/api", tags=["console"], dependencies=[Depends(operator)])


class Breaker(BaseModel):
    state: str = Field(description="closed, open or half_open")
    consecutive_failures: int
    opened_at: datetime | None
    next_probe_at: datetime | None = Field(description="when a call may next go; null while closed")
    last_failure_reason: str | None

    @classmethod
    def of(cls, status: BreakerStatus) -> Breaker:
        return cls(
            state=status.state.value,
            consecutive_failures=status.consecutive_failures,
            opened_at=status.opened_at,
            next_probe_at=status.next_call_at,
            last_failure_reason=status.last_failure_reason,
        )


class Outbox(BaseModel):
    waiting: int
    in_flight: int
    oldest_open_at: datetime | None
    oldest_age_seconds: float | None
    next_due_at: datetime | None


class QueueCount(BaseModel):
    entries: int
    oldest_at: datetime | None


class Overview(BaseModel):
    read_at: datetime
    breaker: Breaker
    outbox: Outbox
    queue: dict[str, QueueCount] = Field(description="by status; every status present")
    oldest_pending_age_seconds: float | None
    delivered_last_hour: int
    last_delivered_at: datetime | None

    @classmethod
    def of(cls, status: SystemStatus, statuses: tuple[str, ...]) -> Overview:
        outbox_age = status.oldest_outbox_age
        pending_age = status.oldest_pending_age
        return cls(
            read_at=status.read_at,
            breaker=Breaker.of(status.breaker),
            outbox=Outbox(
                waiting=status.outbox.waiting,
                in_flight=status.outbox.in_flight,
                oldest_open_at=status.outbox.oldest_open_at,
                oldest_age_seconds=outbox_age.total_seconds() if outbox_age is not None else None,
                next_due_at=status.outbox.next_due_at,
            ),
            queue={
                s: QueueCount(
                    entries=status.queue_count(s).entries, oldest_at=status.queue_count(s).oldest_at
                )
                for s in statuses
            },
            oldest_pending_age_seconds=pending_age.total_seconds() if pending_age is not None else None,
            delivered_last_hour=status.delivered_last_hour,
            last_delivered_at=status.last_delivered_at,
        )


class EntrySummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built from the store's typed rows

    id: int
    operation_type: str
    certification_id: UUID | None
    event_id: UUID | None
    failure_reason: str
    attempt_count: int
    status: str
    replay_count: int
    last_replayed_at: datetime | None
    last_replayed_by: str | None
    created_at: datetime
    updated_at: datetime


class EntryDetail(EntrySummary):
    payload_json: dict[str, Any]
    failure_history: list[dict[str, Any]] = Field(
        description="every failure, replay and discard, oldest first"
    )
    discarded_reason: str | None
    discarded_by: str | None


class QueuePage(BaseModel):
    entries: list[EntrySummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null at the end")


class Replay(BaseModel):
    entry_id: int
    status: str = Field(description="replayed, pending, requires_investigation or skipped")
    attempts: int
    reason: str | None

    @classmethod
    def of(cls, result: ReplayResult) -> Replay:
        return cls(
            entry_id=result.entry_id, status=result.status, attempts=result.attempts, reason=result.reason
        )


class DiscardRequest(BaseModel):
    reason: Reason


class Discarded(BaseModel):
    entry_id: int
    status: str


class Selection(BaseModel):
    filters: QueueFilterParams = Field(default_factory=QueueFilterParams)


class DiscardSelection(Selection):
    reason: Reason


class SelectionSize(BaseModel):
    entries: int = Field(description="pending or requires_investigation entries matching the filters")
    max_selection: int = MAX_SELECTION


class ReplaySelectionResult(BaseModel):
    total: int
    failed: int
    results: dict[str, int]


class DiscardSelectionResult(BaseModel):
    discarded: int


class BreakerReset(BaseModel):
    changed: bool = Field(description="false when the circuit was already closed")
    breaker: Breaker


@router.get("/overview", response_model=Overview)
async def overview(service: Service) -> Overview:
    return Overview.of(await service.status(), QUEUE_STATUSES)


@router.get("/queue", response_model=QueuePage)
async def list_queue(
    service: Service,
    filters: Filters,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> QueuePage:
    """The retry queue, newest first, filtered; keyset pages (``next_cursor``)."""
    page = await service.page(filters.to_filters(service.zone), cursor, limit)
    return QueuePage(
        entries=[EntrySummary.model_validate(row) for row in page.entries], next_cursor=page.next_cursor
    )


@router.get("/queue/selection", response_model=SelectionSize)
async def selection_size(service: Service, filters: Filters) -> SelectionSize:
    """How many entries a filtered replay or discard would act on."""
    return SelectionSize(entries=await service.selection_size(filters.to_filters(service.zone)))


@router.post("/queue/selection/replay", response_model=ReplaySelectionResult)
async def replay_selection(service: Service, by: Operator, body: Selection) -> ReplaySelectionResult:
    summary = await service.replay_selection(body.filters.to_filters(service.zone), by=by)
    return ReplaySelectionResult(total=summary.total, failed=summary.failed, results=summary.results)


@router.post("/queue/selection/discard", response_model=DiscardSelectionResult)
async def discard_selection(service: Service, by: Operator, body: DiscardSelection) -> DiscardSelectionResult:
    filters = body.filters.to_filters(service.zone)
    return DiscardSelectionResult(
        discarded=await service.discard_selection(filters, reason=body.reason, by=by)
    )


@router.get(
    "/queue/{entry_id}", response_model=EntryDetail, responses={404: {"description": "no such entry"}}
)
async def get_entry(service: Service, entry_id: EntryId) -> EntryDetail:
    return EntryDetail.model_validate(await service.entry(entry_id))


@router.post(
    "/queue/{entry_id}/replay", response_model=Replay, responses={404: {"description": "no such entry"}}
)
async def replay_entry(service: Service, by: Operator, entry_id: EntryId) -> Replay:
    """Resend the certification's current state through the retry policy and the breaker."""
    return Replay.of(await service.replay(entry_id, by=by))


@router.post(
    "/queue/{entry_id}/discard",
    response_model=Discarded,
    responses={404: {"description": "no such entry"}, 409: {"description": "already replayed or discarded"}},
)
async def discard_entry(service: Service, by: Operator, entry_id: EntryId, body: DiscardRequest) -> Discarded:
    if not await service.discard(entry_id, reason=body.reason, by=by):
        raise Conflict(f"entry {entry_id} was already replayed or discarded")
    return Discarded(entry_id=entry_id, status="discarded")


@router.get("/breaker", response_model=Breaker)
async def breaker(service: Service) -> Breaker:
    status = await service.status()
    return Breaker.of(status.breaker)


@router.post("/breaker/reset", response_model=BreakerReset)
async def reset_breaker(service: Service, by: Operator) -> BreakerReset:
    transition = await service.reset_breaker(by=by)
    status = await service.status()
    return BreakerReset(changed=transition is not None, breaker=Breaker.of(status.breaker))


CertificationId = Annotated[UUID, Path(description="the certification's id")]


@router.get(
    "/history/{certification_id}",
    responses={404: {"description": "no such certification and no captured change for it"}},
)
async def certification_history(service: Service, certification_id: CertificationId) -> dict[str, Any]:
    """One certification's sync history: the same object as `certsync history ID --json`."""
    return (await service.history(certification_id)).to_json_dict()


@router.get("/history", responses={404: {"description": "no certification of that peer mentor"}})
async def mentor_history(
    service: Service, mentor_id: Annotated[UUID, Query(description="a peer mentor's id")]
) -> dict[str, Any]:
    """The histories of a peer mentor's certifications (`certsync history --mentor ID --json`)."""
    histories = await service.mentor_history(mentor_id)
    return {"peer_mentor_id": str(mentor_id), "certifications": [h.to_json_dict() for h in histories]}


@router.get("/reconcile")
async def last_reconcile(
    service: Service, limit: Annotated[int, Query(ge=1, le=10_000)] = 500
) -> dict[str, Any] | None:
    """The last finished reconcile: its counts and (at most `limit`) mismatches; null before any."""
    last = await service.last_reconcile(limit=limit)
    return last.to_json_dict() if last is not None else None


@router.post("/reconcile/repair")
async def repair(service: Service, by: Operator) -> dict[str, Any]:
    """Reconcile now and queue a correction for every mismatch (`certsync reconcile --repair --json`)."""
    report = await service.repair(by=by)
    return {**report.to_json_dict(), "run_id": str(report.run_id), "repaired": report.repaired}
