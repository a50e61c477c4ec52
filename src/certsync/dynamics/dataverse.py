"""The Dataverse adapter of the portal port: Dynamics 365's own Web API (``CERTSYNC_DYNAMICS_API=dataverse``).

certsync writes one row per certification into HLF's Dataverse table (``docs/dataverse.md``; the wire is
pinned in the interface, section 5)::

    upsert   PATCH  {api}/hlf_certifications(hlf_certsyncid='<id>')          204/200/201 delivered
    bulk     POST   {api}/hlf_certifications/Microsoft.Dynamics.CRM.UpsertMultiple   (all or nothing)
    delete   DELETE {api}/hlf_certifications(hlf_certsyncid='<id>')          204 or 404 done
    read     GET    {api}/hlf_certifications?$select=…  Prefer: odata.maxpagesize=n, @odata.nextLink
    check    GET    {api}/EntityDefinitions(LogicalName='hlf_certification')?…   columns, types, key

Errors are classified like every portal's (``certsync.dynamics.http``); Dataverse's error body
``{"error": {"code": "0x…", "message": "…"}}`` adds its code and message to the reason the queue keeps.
A 429 (service protection: 0x80072322 requests, 0x80072321 execution time, 0x80072326 concurrency)
pauses all sending for its ``Retry-After`` through the send gate. Dataverse allows 52 concurrent
requests per user: this adapter never has more than ``max_concurrent`` in flight in one process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from certsync.dynamics.auth import TokenProvider
from certsync.dynamics.contract import CertificationStatusName, CertificationUpsert
from certsync.dynamics.errors import PermanentDynamicsError
from certsync.dynamics.exchange import AuthorisedExchange
from certsync.dynamics.http import parse_body
from certsync.dynamics.port import CertificationDelete, ContractCheck, DeliveryReceipt, PortalHolding
from certsync.resilience.clock import Clock, SystemClock
from certsync.resilience.gate import SendGate
from certsync.resilience.instrumentation import Instrumentation

__all__ = [
    "API_PATH",
    "COLUMNS",
    "MAX_CONCURRENT_REQUESTS",
    "STATUS_CHOICES",
    "DataverseClient",
    "odata_error_detail",
    "row_for",
]

API_PATH: Final = "/api/data/v9.2"
KEY_COLUMN: Final = "hlf_certsyncid"
MAX_CONCURRENT_REQUESTS: Final = 52
"""Dataverse's service-protection limit on concurrent requests per user."""

STATUS_CHOICES: Final[Mapping[CertificationStatusName, int]] = {
    "active": 100000000,
    "suspended": 100000001,
    "expired": 100000002,
    "revoked": 100000003,
}
_STATUS_NAMES: Final[Mapping[int, CertificationStatusName]] = {v: k for k, v in STATUS_CHOICES.items()}

COLUMNS: Final[Mapping[str, str]] = {
    KEY_COLUMN: "String",
    "hlf_peermentorid": "String",
    "hlf_certificationtype": "String",
    "hlf_status": "Picklist",
    "hlf_validfrom": "DateTime",
    "hlf_validuntil": "DateTime",
    "hlf_sourceversion": "Integer",
    "hlf_publiclylisted": "Boolean",
    "hlf_changedat": "DateTime",
}
"""Every column certsync writes and the ``AttributeType`` Dataverse must report for it."""

_ODATA_HEADERS: Final = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}
_JSON: Final = {"Content-Type": "application/json; charset=utf-8"}
_DETAIL_LIMIT: Final = 300


def row_for(body: CertificationUpsert) -> dict[str, Any]:
    """The table's columns for one certification state, the alternate key excepted."""
    certification = body.certification
    return {
        "hlf_peermentorid": str(certification.peer_mentor_id),
        "hlf_certificationtype": certification.certification_type,
        "hlf_status": STATUS_CHOICES[certification.status],
        "hlf_validfrom": certification.valid_from.isoformat(),
        "hlf_validuntil": certification.valid_until.isoformat(),
        "hlf_sourceversion": certification.version,
        "hlf_publiclylisted": body.publicly_listed,
        # isoformat, not strftime: twice as fast, once per row of every bulk call.
        "hlf_changedat": _utc_seconds(body.occurred_at),
    }


def _utc_seconds(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def odata_error_detail(response: httpx.Response) -> str | None:
    """Dataverse's error code and message from an error answer, on one line and bounded; None if absent."""
    try:
        error = _ErrorBody.model_validate_json(response.content).error
    except ValidationError:
        return None
    text = " ".join(part for part in (error.code, error.message) if part)
    text = " ".join(text.split())
    return text[:_DETAIL_LIMIT] or None


class _Error(BaseModel):
    code: str | None = None
    message: str | None = None


class _ErrorBody(BaseModel):
    error: _Error


class _Row(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    certification_id: UUID = Field(alias=KEY_COLUMN)
    version: int = Field(alias="hlf_sourceversion", ge=0)
    status: int = Field(alias="hlf_status")
    publicly_listed: bool = Field(alias="hlf_publiclylisted")


class _Page(BaseModel):
    value: list[_Row]
    next_link: str | None = Field(default=None, alias="@odata.nextLink")


class _Attribute(BaseModel):
    LogicalName: str
    AttributeType: str | None = None


class _Key(BaseModel):
    KeyAttributes: list[str] = Field(default_factory=list)
    EntityKeyIndexStatus: str | None = None


class _EntityDefinition(BaseModel):
    LogicalName: str
    EntitySetName: str | None = None
    Attributes: list[_Attribute] = Field(default_factory=list)
    Keys: list[_Key] = Field(default_factory=list)


class DataverseClient:
    """The Dataverse Web API over an injected ``httpx.AsyncClient``; one attempt per call."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        tokens: TokenProvider,
        *,
        table: str = "hlf_certification",
        entity_set: str = "hlf_certifications",
        clock: Clock | None = None,
        timeout: float = 10.0,
        gate: SendGate | None = None,
        instrumentation: Instrumentation | None = None,
        max_concurrent: int = MAX_CONCURRENT_REQUESTS,
    ) -> None:
        if not 1 <= max_concurrent <= MAX_CONCURRENT_REQUESTS:
            raise ValueError(f"max_concurrent must be 1 to {MAX_CONCURRENT_REQUESTS}")
        self._base_url = base_url.rstrip("/")
        self._table = table
        self._entity_set = entity_set
        self._exchange = AuthorisedExchange(
            http,
            self._base_url + API_PATH,
            tokens,
            clock=clock if clock is not None else SystemClock(),
            timeout=timeout,
            gate=gate,
            instrumentation=instrumentation,
            headers=_ODATA_HEADERS,
            detail=odata_error_detail,
        )
        self._in_flight = asyncio.Semaphore(max_concurrent)

    def _by_key(self, certification_id: UUID) -> str:
        return f"{self._entity_set}({KEY_COLUMN}='{certification_id}')"

    async def upsert_certification(self, body: CertificationUpsert) -> DeliveryReceipt:
        """``PATCH`` by alternate key: creates the row or updates it (no ``If-Match``: an upsert)."""
        path = "/" + self._by_key(body.certification.id)
        return await self._write("PATCH", path, str(body.event_id), _encode(row_for(body)))

    async def upsert_many(self, bodies: Sequence[CertificationUpsert]) -> DeliveryReceipt:
        """One ``UpsertMultiple`` for several certifications (one request toward the limits, all or
        nothing at Dataverse). ``bodies`` must name each certification once."""
        if not bodies:
            raise ValueError("upsert_many needs at least one certification")
        if len({body.certification.id for body in bodies}) != len(bodies):
            raise ValueError("upsert_many: each certification at most once per call")
        targets = [
            {
                "@odata.type": f"Microsoft.Dynamics.CRM.{self._table}",
                "@odata.id": self._by_key(body.certification.id),
                **row_for(body),
            }
            for body in bodies
        ]
        path = f"/{self._entity_set}/Microsoft.Dynamics.CRM.UpsertMultiple"
        return await self._write("POST", path, str(bodies[0].event_id), _encode({"Targets": targets}))

    async def delete_certification(self, request: CertificationDelete) -> DeliveryReceipt:
        """``DELETE`` by alternate key; 204 or 404 (the row is not there) is done."""
        path = "/" + self._by_key(request.certification_id)
        return await self._write("DELETE", path, str(request.event_id), None, done_if_absent=True)

    async def holdings(self, *, page_size: int = 500) -> AsyncIterator[PortalHolding]:
        """Every row, ordered by the alternate key, ``page_size`` per page, following ``@odata.nextLink``."""
        select = ",".join((KEY_COLUMN, "hlf_sourceversion", "hlf_status", "hlf_publiclylisted"))
        path = f"/{self._entity_set}?$select={select}&$orderby={KEY_COLUMN} asc"
        headers = {"Prefer": f"odata.maxpagesize={page_size}"}
        next_link: str | None = None
        while True:
            async with self._in_flight:
                response = await self._exchange.request("GET", path, headers=headers, url=next_link)
            page = parse_body(_Page, response)
            for row in page.value:
                status = _STATUS_NAMES.get(row.status)
                if status is None:
                    raise PermanentDynamicsError(
                        f"malformed response: hlf_status {row.status} of {row.certification_id} is not a"
                        " certsync status",
                        status=response.status_code,
                    )
                yield PortalHolding(row.certification_id, row.version, status, row.publicly_listed)
            if page.next_link is None:
                return
            next_link = page.next_link

    async def check_contract(self) -> ContractCheck:
        """Does the table hold every column certsync writes, with its type, and an active key on
        ``hlf_certsyncid``? Each problem is named."""
        path = (
            f"/EntityDefinitions(LogicalName='{self._table}')?$select=LogicalName,EntitySetName"
            "&$expand=Attributes($select=LogicalName,AttributeType),"
            "Keys($select=KeyAttributes,EntityKeyIndexStatus)"
        )
        endpoint = f"{self._base_url}{API_PATH} ({self._table})"
        try:
            async with self._in_flight:
                response = await self._exchange.request("GET", path)
        except PermanentDynamicsError as exc:
            if exc.status != httpx.codes.NOT_FOUND:
                raise
            problem = f"the table {self._table} does not exist (or this user may not read its metadata)"
            return ContractCheck(endpoint, False, f"TABLE MISMATCH: {problem}", (problem,))
        problems = _table_problems(parse_body(_EntityDefinition, response), self._entity_set)
        if not problems:
            return ContractCheck(
                endpoint, True, f"{self._table} has every column certsync writes and an active key"
            )
        return ContractCheck(endpoint, False, f"TABLE MISMATCH: {len(problems)} problem(s)", tuple(problems))

    async def probe(self) -> None:
        """``GET WhoAmI``: Dataverse is up and takes our token (one request toward the limits)."""
        async with self._in_flight:
            await self._exchange.request("GET", "/WhoAmI")

    async def _write(
        self, method: str, path: str, event_id: str, content: bytes | None, *, done_if_absent: bool = False
    ) -> DeliveryReceipt:
        clock = self._exchange.clock
        started = clock.now()
        async with self._in_flight:
            response = await self._exchange.request(
                method,
                path,
                headers=_JSON if content is not None else None,
                content=content,
                event_id=event_id,
                done_if_absent=done_if_absent,
            )
        return DeliveryReceipt(response.status_code, (clock.now() - started).total_seconds())


def _table_problems(definition: _EntityDefinition, entity_set: str) -> list[str]:
    problems: list[str] = []
    if definition.EntitySetName is not None and definition.EntitySetName != entity_set:
        problems.append(
            f"entity set is {definition.EntitySetName}, certsync writes to {entity_set}"
            " (set CERTSYNC_DATAVERSE_ENTITY_SET)"
        )
    types = {attribute.LogicalName: attribute.AttributeType for attribute in definition.Attributes}
    for column, expected in COLUMNS.items():
        if column not in types:
            problems.append(f"missing column {column} ({expected})")
        elif types[column] != expected:
            problems.append(f"column {column} is {types[column]}, certsync writes {expected}")
    keys = [key for key in definition.Keys if key.KeyAttributes == [KEY_COLUMN]]
    if not keys:
        problems.append(f"no alternate key on {KEY_COLUMN}")
    elif not any(key.EntityKeyIndexStatus == "Active" for key in keys):
        status = keys[0].EntityKeyIndexStatus or "unknown"
        problems.append(f"the alternate key on {KEY_COLUMN} is {status}, not Active")
    return problems


def _encode(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
