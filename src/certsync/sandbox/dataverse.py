"""The Dataverse Web API emulator over HTTP: interface section 5's routes under ``/api/data/v9.2/``.

Every API request passes, in this order: the fault script (scripted steps answer without touching
anything else), the bearer token (401 with ``WWW-Authenticate: Bearer authorization_uri=…``, not
counted by the limits, as Dataverse's gateway refuses it first), the service-protection limits
(``dataverse_limits``: 429 with ``Retry-After``), the fault script's latency, then the route. Every
answer carries ``OData-Version: 4.0`` and the two ``x-ms-ratelimit-…-xrm-requests`` headers. Admin
routes (``/_sandbox/…``) and ``/oauth2/token`` pass none of this. See docs/dataverse.md.

Routes (``{set}`` is ``hlf_certifications``, ``{ref}`` is ``(<guid>)`` or ``(hlf_certsyncid='…')``):

- ``GET {set}`` (``$select``, ``$filter``, ``$top``, ``$orderby``, ``$count``; ``Prefer:
  odata.maxpagesize=n`` pages with an opaque ``$skiptoken`` in ``@odata.nextLink``), ``POST {set}``;
- ``GET``/``PATCH``/``DELETE {set}{ref}`` (``If-Match``, ``If-None-Match``, ``Prefer:
  return=representation``);
- ``POST {set}/Microsoft.Dynamics.CRM.UpsertMultiple`` | ``CreateMultiple`` | ``UpdateMultiple``;
- ``GET EntityDefinitions`` (``$filter=LogicalName eq '…'``), ``GET
  EntityDefinitions(LogicalName='…')`` (``$select``, ``$expand=Attributes(…),Keys(…)``), ``GET
  EntityDefinitions(LogicalName='…')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata``;
- ``GET WhoAmI``;
- ``POST $batch`` (multipart/mixed, changesets all or nothing, ``$<Content-ID>`` references).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import json
import operator
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from certsync.sandbox.app import ADMIN_PREFIX, CLIENT_CLOSED_REQUEST, _drop_connection, portal_app
from certsync.sandbox.dataverse_limits import REQUESTS_CODE, Admission, LimitsError, parse_limits
from certsync.sandbox.dataverse_state import (
    INVALID_ARGUMENT,
    NOT_FOUND_SEGMENT,
    ODATA_BAD_REQUEST,
    SYSTEM_COLUMNS,
    DataverseConfig,
    DataverseEmulator,
    ODataError,
    RowRef,
    TableMetadata,
    etag,
    parse_row_ref,
)
from certsync.sandbox.faults import FaultDecision, FaultScriptError, parse_fault_script

API_PREFIX = "/api/data/v9.2"
_STATE_KEY = "certsync.dataverse"
_ODATA_VERSION = (b"odata-version", b"4.0")
_BULK_ACTIONS = ("UpsertMultiple", "CreateMultiple", "UpdateMultiple")
_BULK_OUTCOMES = {"UpsertMultiple": "upserted", "CreateMultiple": "created", "UpdateMultiple": "updated"}
_METHODS = ["GET", "POST", "PATCH", "DELETE", "PUT"]

log = structlog.get_logger("certsync.sandbox.dataverse")


class DataverseApp(FastAPI):
    """FastAPI with faults, auth and service protection in front of ``/api/data/…``."""

    emulator: DataverseEmulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX + "/"):
            await super().__call__(scope, receive, send)
            return
        await self._api_request(scope, receive, send)

    async def _api_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        emulator = self.emulator
        method, path = scope["method"], scope["path"]
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]
        }
        noted: dict[str, Any] = {"status": None, "outcome": None, "targets": None, "key": None}
        scope[_STATE_KEY] = noted
        decision = emulator.decide(method, path)
        accounting = _Accounting(emulator, scope, headers, decision)

        async def annotated_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                noted["status"] = message["status"]
                # Settled before the status line leaves (uvicorn sends it at once, and for a 204 that
                # is the whole answer): a client that reads the log or the limits right after its
                # answer finds its request there.
                accounting.settle()
                extra = [(name.encode(), value.encode()) for name, value in emulator.remaining().items()]
                message = {**message, "headers": [*message.get("headers", ()), _ODATA_VERSION, *extra]}
            await send(message)

        try:
            if decision.action != "pass":
                if decision.delay:
                    await emulator.config.sleep(decision.delay)
                if decision.action == "drop":
                    await _drop_connection(receive, send)
                else:
                    await _send_fault(decision, annotated_send)
                return
            if not _authorized(emulator, headers):
                noted["outcome"] = "invalid_token"
                await _send_unauthorized(scope, annotated_send)
                return
            verdict = emulator.admit()
            if not isinstance(verdict, Admission):
                noted["outcome"] = verdict.code
                accounting.decision = FaultDecision(action="respond", status=429, fault=verdict.fault)
                await _send_json(
                    annotated_send,
                    429,
                    {"error": {"code": verdict.code, "message": verdict.message}},
                    [(b"retry-after", str(verdict.retry_after).encode())],
                )
                return
            accounting.admission = verdict
            if decision.delay:
                await emulator.config.sleep(decision.delay)
            await super().__call__(scope, receive, annotated_send)
        finally:
            accounting.settle()


class _Accounting:
    """Once per request: free its service-protection slot and write its request-log entry."""

    def __init__(
        self, emulator: DataverseEmulator, scope: Scope, headers: Mapping[str, str], decision: FaultDecision
    ) -> None:
        self.emulator, self.scope, self.headers, self.decision = emulator, scope, headers, decision
        self.admission: Admission | None = None
        self._settled = False

    def settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        emulator, scope, decision = self.emulator, self.scope, self.decision
        if self.admission is not None:
            emulator.finish(self.admission)
        noted = scope[_STATE_KEY]
        entry = emulator.record(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            has_authorization=bool(self.headers.get("authorization", "").strip()),
            status=noted["status"],
            fault=decision.fault,
            outcome=noted["outcome"],
            targets=noted["targets"],
            key=noted["key"],
            delay_ms=round(decision.delay * 1000, 3),
        )
        log.debug(
            "dataverse_request",
            seq=entry.seq,
            method=entry.method,
            path=entry.path,
            status=entry.status,
            fault=entry.fault,
            outcome=entry.outcome,
            targets=entry.targets,
        )


def _authorized(emulator: DataverseEmulator, headers: Mapping[str, str]) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and emulator.tokens.is_valid(token.strip())


def _origin(scope: Scope) -> str:
    scheme = scope.get("scheme", "http")
    host = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
    if host is None:
        server = scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}"
    return f"{scheme}://{host}"


async def _send_unauthorized(scope: Scope, send: Send) -> None:
    """As Dataverse: 401, an empty body, and where to get a token (here: the emulator's own)."""
    origin = _origin(scope)
    challenge = f"Bearer authorization_uri={origin}/oauth2/token, resource_id={origin}/"
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [(b"www-authenticate", challenge.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def _send_json(
    send: Send, status: int, content: Mapping[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(content).encode()
    all_headers = [
        (b"content-type", b"application/json; odata.metadata=minimal"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _send_fault(decision: FaultDecision, send: Send) -> None:
    status = decision.status or 500
    code = REQUESTS_CODE if status == 429 else "0x80040216"
    headers = []
    if decision.retry_after is not None:
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    message = f"Injected fault: {decision.fault}."
    await _send_json(send, status, {"error": {"code": code, "message": message}}, headers)


def _note(request: Request, **values: Any) -> None:
    noted = request.scope.get(_STATE_KEY)
    if isinstance(noted, dict):
        noted.update(values)


async def _answer_odata_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ODataError)
    _note(request, outcome=exc.outcome)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _client_gone(request: Request, exc: Exception) -> Response:
    _note(request, outcome="client_disconnected")
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def create_dataverse_app(config: DataverseConfig) -> DataverseApp:
    """A fresh emulator with its own state; serve it with ``SandboxServer`` or ``run_sandbox``."""
    app = portal_app(DataverseApp, "certsync Dataverse emulator")
    app.emulator = DataverseEmulator(config)
    app.add_exception_handler(ODataError, _answer_odata_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    _add_api_routes(app, app.emulator)
    _add_token_route(app, app.emulator)
    _add_admin_routes(app, app.emulator)
    return app


# --- the API ---------------------------------------------------------------------------------------

_ENTITY_DEFINITION = re.compile(r"EntityDefinitions\(LogicalName='(?P<name>[^']*)'\)")
_PICKLISTS = re.compile(
    r"EntityDefinitions\(LogicalName='(?P<name>[^']*)'\)/Attributes/Microsoft\.Dynamics\.CRM\."
    r"PicklistAttributeMetadata"
)


def _add_api_routes(app: FastAPI, emulator: DataverseEmulator) -> None:
    @app.api_route(API_PREFIX + "/{rest:path}", methods=_METHODS, include_in_schema=False)
    async def api(rest: str, request: Request) -> Response:  # noqa: PLR0911, PLR0912 (a router: a branch and a return per route)
        metadata = emulator.metadata
        entity_set = metadata.entity_set
        method = request.method
        if rest == "$batch":
            _only(method, "POST")
            return await _batch(request, app, emulator)
        if rest in ("WhoAmI", "WhoAmI()"):
            _only(method, "GET")
            return _odata(request, _who_am_i(request, emulator))
        if rest == "EntityDefinitions":
            _only(method, "GET")
            return _odata(request, _entity_definitions(request, metadata))
        if match := _PICKLISTS.fullmatch(rest):
            _only(method, "GET")
            _known_table(match["name"], metadata)
            return _odata(
                request,
                {
                    "@odata.context": _context(request, "EntityDefinitions(…)/Attributes"),
                    "value": metadata.picklists(),
                },
            )
        if match := _ENTITY_DEFINITION.fullmatch(rest):
            _only(method, "GET")
            _known_table(match["name"], metadata)
            return _odata(request, _entity_definition(request, metadata))
        if rest == entity_set:
            if method == "GET":
                return _list(request, emulator)
            _only(method, "POST")
            return await _create(request, emulator)
        if rest.startswith(entity_set + "/Microsoft.Dynamics.CRM."):
            action = rest.removeprefix(entity_set + "/Microsoft.Dynamics.CRM.")
            if action not in _BULK_ACTIONS:
                raise _segment_not_found(action)
            _only(method, "POST")
            return await _bulk(request, emulator, action)  # type: ignore[arg-type]
        if rest.startswith(entity_set + "("):
            ref = parse_row_ref(rest, metadata, entity_set_required=True)
            _note(request, key=ref[1])
            if ref[0] == "key":
                emulator.check_key_usable()
            if method == "GET":
                return _retrieve(request, emulator, ref)
            if method == "PATCH":
                return await _patch(request, emulator, ref)
            _only(method, "DELETE")
            emulator.delete(ref, if_match=request.headers.get("if-match"))
            _note(request, outcome="deleted")
            return Response(status_code=204)
        raise _segment_not_found(rest.split("/", 1)[0].split("(", 1)[0])


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise ODataError(
            405, ODATA_BAD_REQUEST, f"The HTTP method '{method}' is not allowed for this resource."
        )


def _segment_not_found(segment: str) -> ODataError:
    return ODataError(404, NOT_FOUND_SEGMENT, f"Resource not found for the segment '{segment}'.")


def _known_table(name: str, metadata: TableMetadata) -> None:
    if name != metadata.logical_name:
        raise ODataError(404, "0x80040217", f"Could not find entity with name '{name}'.")


def _api_root(request: Request) -> str:
    return f"{_origin(request.scope)}{API_PREFIX}"


def _context(request: Request, fragment: str) -> str:
    return f"{_api_root(request)}/$metadata#{fragment}"


def _odata(request: Request, content: Mapping[str, Any]) -> JSONResponse:
    _note(request, outcome="read")
    return JSONResponse(dict(content))


def _who_am_i(request: Request, emulator: DataverseEmulator) -> dict[str, Any]:
    config = emulator.config
    return {
        "@odata.context": _context(request, "Microsoft.Dynamics.CRM.WhoAmIResponse"),
        "BusinessUnitId": str(config.business_unit_id),
        "UserId": str(config.user_id),
        "OrganizationId": str(config.organization_id),
    }


def _entity_definitions(request: Request, metadata: TableMetadata) -> dict[str, Any]:
    """``EntityDefinitions?$filter=LogicalName eq '…'`` (what the SDK asks before any CRUD)."""
    wanted = request.query_params.get("$filter")
    entity = metadata.entity()
    matches = True
    if wanted is not None:
        match = re.fullmatch(r"\s*LogicalName\s+eq\s+'(?P<name>[^']*)'\s*", wanted)
        if match is None:
            raise ODataError(
                400,
                ODATA_BAD_REQUEST,
                f"The emulator filters EntityDefinitions by LogicalName only: {wanted}",
            )
        matches = match["name"] == metadata.logical_name
    select = _split(request.query_params.get("$select"))
    value = [_selected(entity, select, keep=("MetadataId",))] if matches else []
    return {"@odata.context": _context(request, "EntityDefinitions"), "value": value}


def _entity_definition(request: Request, metadata: TableMetadata) -> dict[str, Any]:
    entity = metadata.entity()
    select = _split(request.query_params.get("$select"))
    expand = _parse_expand(request.query_params.get("$expand", ""))
    answer: dict[str, Any] = {"@odata.context": _context(request, "EntityDefinitions/$entity")}
    answer.update(
        _selected(
            {k: v for k, v in entity.items() if k not in ("Attributes", "Keys")}, select, keep=("MetadataId",)
        )
    )
    for navigation, inner_select in expand.items():
        if navigation not in ("Attributes", "Keys"):
            raise ODataError(
                400,
                ODATA_BAD_REQUEST,
                f"Could not find a property named '{navigation}' on type "
                "'Microsoft.Dynamics.CRM.EntityMetadata'.",
            )
        answer[navigation] = [
            _selected(item, inner_select, keep=("@odata.type", "MetadataId")) for item in entity[navigation]
        ]
    return answer


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _selected(
    item: Mapping[str, Any], select: list[str] | None, keep: tuple[str, ...] = ()
) -> dict[str, Any]:
    if select is None:
        return dict(item)
    return {name: value for name, value in item.items() if name in select or name in keep}


def _parse_expand(text: str) -> dict[str, list[str] | None]:
    """``Attributes($select=a,b),Keys($select=c)`` → ``{"Attributes": ["a","b"], "Keys": ["c"]}``."""
    expanded: dict[str, list[str] | None] = {}
    for match in re.finditer(r"(?P<name>\w+)(?:\((?P<options>[^)]*)\))?\s*(?:,|$)", text.strip()):
        if not match["name"]:
            continue
        select: list[str] | None = None
        for option in (match["options"] or "").split(";"):
            name, _, value = option.partition("=")
            if name.strip() == "$select":
                select = _split(value)
        expanded[match["name"]] = select
    return expanded


# rows ---------------------------------------------------------------------------------------------------


def _row_body(
    request: Request, emulator: DataverseEmulator, row: Mapping[str, Any], select: list[str] | None
) -> dict[str, Any]:
    metadata = emulator.metadata
    primary = metadata.primary_id
    shown = {"@odata.etag": etag(row), primary: row[primary]}
    names = [column.logical_name for column in metadata.columns] + list(SYSTEM_COLUMNS)
    for name in names if select is None else select:
        if name != primary:
            shown[name] = row.get(name)
    return shown


def _checked_select(emulator: DataverseEmulator, text: str | None) -> list[str] | None:
    select = _split(text)
    if select is not None:
        for name in select:
            _check_property(emulator.metadata, name)
    return select


def _check_property(metadata: TableMetadata, name: str) -> None:
    if name != metadata.primary_id and name not in SYSTEM_COLUMNS and metadata.column(name) is None:
        raise ODataError(
            400,
            ODATA_BAD_REQUEST,
            f"Could not find a property named '{name}' on type '{metadata.entity_type}'.",
        )


def _select_fragment(emulator: DataverseEmulator, select: list[str] | None) -> str:
    entity_set = emulator.metadata.entity_set
    return f"{entity_set}({','.join(select)})" if select else entity_set


def _prefers(request: Request) -> dict[str, str]:
    preferences: dict[str, str] = {}
    for part in request.headers.get("prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            preferences[name.strip().lower()] = value.strip().strip('"')
    return preferences


def _retrieve(request: Request, emulator: DataverseEmulator, ref: RowRef) -> Response:
    _only_options(request, ("$select",))
    select = _checked_select(emulator, request.query_params.get("$select"))
    row = emulator.get(ref)
    if request.headers.get("if-none-match", "").strip() == etag(row):
        _note(request, outcome="not_modified")
        return Response(status_code=304)
    body = {"@odata.context": _context(request, _select_fragment(emulator, select) + "/$entity")}
    body.update(_row_body(request, emulator, row, select))
    _note(request, outcome="retrieved")
    return JSONResponse(body, headers={"ETag": etag(row)})


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        raise ODataError(400, ODATA_BAD_REQUEST, "The request body is not valid JSON.") from None


async def _object_body(request: Request) -> dict[str, Any]:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ODataError(400, ODATA_BAD_REQUEST, "The request body must be a JSON object.")
    return body


def _entity_id(request: Request, emulator: DataverseEmulator, row: Mapping[str, Any]) -> str:
    return f"{_api_root(request)}/{emulator.metadata.entity_set}({row[emulator.metadata.primary_id]})"


def _written(
    request: Request, emulator: DataverseEmulator, row: Mapping[str, Any], created: bool
) -> Response:
    entity_id = _entity_id(request, emulator, row)
    if _prefers(request).get("return") == "representation":
        select = _checked_select(emulator, request.query_params.get("$select"))
        body = {"@odata.context": _context(request, _select_fragment(emulator, select) + "/$entity")}
        body.update(_row_body(request, emulator, row, select))
        return JSONResponse(
            body,
            status_code=201 if created else 200,
            headers={
                "OData-EntityId": entity_id,
                "ETag": etag(row),
                "Preference-Applied": "return=representation",
            },
        )
    return Response(status_code=204, headers={"OData-EntityId": entity_id})


async def _patch(request: Request, emulator: DataverseEmulator, ref: RowRef) -> Response:
    body = await _object_body(request)
    written = emulator.write(
        ref,
        body,
        if_match=request.headers.get("if-match"),
        if_none_match=request.headers.get("if-none-match"),
    )
    _note(request, outcome="created" if written.created else "updated")
    return _written(request, emulator, written.row, written.created)


async def _create(request: Request, emulator: DataverseEmulator) -> Response:
    body = await _object_body(request)
    written = emulator.create(body)
    _note(request, outcome="created", key=written.row.get(emulator.metadata.key_column))
    return _written(request, emulator, written.row, True)


async def _bulk(
    request: Request,
    emulator: DataverseEmulator,
    action: Literal["UpsertMultiple", "CreateMultiple", "UpdateMultiple"],
) -> Response:
    body = await _object_body(request)
    targets = body.get("Targets")
    if not isinstance(targets, list):
        raise ODataError(400, INVALID_ARGUMENT, f'{action} needs "Targets": a list of records.')
    _note(request, targets=len(targets))
    ids = emulator.bulk(action, targets)
    _note(request, outcome=_BULK_OUTCOMES[action])
    if action == "UpdateMultiple":
        return Response(status_code=204)
    return JSONResponse(
        {"@odata.context": _context(request, f"Microsoft.Dynamics.CRM.{action}Response"), "Ids": ids}
    )


# listing ------------------------------------------------------------------------------------------------

_QUERY_OPTIONS = ("$select", "$filter", "$top", "$orderby", "$count", "$skiptoken")
_COMPARISON = re.compile(
    r"\s*(?P<name>\w+)\s+(?P<op>eq|ne|gt|ge|lt|le)\s+"
    r"(?P<value>'(?:[^']|'')*'|-?\d+|true|false|null)\s*",
    re.IGNORECASE,
)


def _only_options(request: Request, allowed: tuple[str, ...]) -> None:
    for name in request.query_params:
        if name.startswith("$") and name not in allowed:
            raise ODataError(400, ODATA_BAD_REQUEST, f"The query parameter '{name}' is not supported here.")


def _literal(text: str) -> object:
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    return int(text)


def _parse_filter(emulator: DataverseEmulator, text: str) -> list[tuple[str, str, object]]:
    clauses = []
    for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        match = _COMPARISON.fullmatch(part)
        if match is None:
            raise ODataError(
                400,
                ODATA_BAD_REQUEST,
                "The emulator understands $filter as comparisons joined by 'and' "
                f"(eq, ne, gt, ge, lt, le): {part!r}",
            )
        _check_property(emulator.metadata, match["name"])
        clauses.append((match["name"], match["op"].lower(), _literal(match["value"])))
    return clauses


_ORDERINGS: Mapping[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}


def _compare(held: object, op: str, wanted: object) -> bool:
    if isinstance(held, str) and isinstance(wanted, str):
        held, wanted = held.lower(), wanted.lower()  # Dataverse compares text case-insensitively
    if op in ("eq", "ne"):
        return (held == wanted) == (op == "eq")
    if held is None or wanted is None or type(held) is not type(wanted):
        return False
    return _ORDERINGS[op](held, wanted)


def _encode_token(position: tuple[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(position)).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[str, str]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error):
        raise ODataError(400, ODATA_BAD_REQUEST, "The $skiptoken is not one this service issued.") from None
    if not (
        isinstance(decoded, list) and len(decoded) == 2 and all(isinstance(part, str) for part in decoded)
    ):
        raise ODataError(400, ODATA_BAD_REQUEST, "The $skiptoken is not one this service issued.")
    return decoded[0], decoded[1]


def _list(request: Request, emulator: DataverseEmulator) -> Response:
    _only_options(request, _QUERY_OPTIONS)
    params = request.query_params
    metadata = emulator.metadata
    select = _checked_select(emulator, params.get("$select"))
    clauses = _parse_filter(emulator, params["$filter"]) if params.get("$filter") else []
    orderby = params.get("$orderby")
    if orderby is not None and orderby.strip().lower() not in (
        metadata.key_column,
        f"{metadata.key_column} asc",
    ):
        raise ODataError(
            400, ODATA_BAD_REQUEST, f"The emulator orders by {metadata.key_column} only: {orderby}"
        )
    top = _top(params.get("$top"))
    positions, ordered = emulator.query()
    start = 0
    if (token := params.get("$skiptoken")) is not None:
        start = bisect.bisect_right(positions, _decode_token(token))
    matching = (
        row
        for row in itertools.islice(ordered, start, None)
        if all(_compare(row.get(n), op, v) for n, op, v in clauses)
    )
    preferences = _prefers(request)
    page_size = emulator.config.max_page_size
    applied: list[str] = []
    if (wanted := preferences.get("odata.maxpagesize")) is not None:
        try:
            page_size = max(1, min(int(wanted), emulator.config.max_page_size))
        except ValueError:
            raise ODataError(
                400, ODATA_BAD_REQUEST, f"Prefer odata.maxpagesize={wanted} is not a number."
            ) from None
        applied.append(f"odata.maxpagesize={page_size}")
    if top is not None:
        # As Dataverse: with $top there is one page of at most $top rows and no nextLink.
        page, more = list(itertools.islice(matching, top)), False
    else:
        page = list(itertools.islice(matching, page_size + 1))
        page, more = page[:page_size], len(page) > page_size
    body: dict[str, Any] = {"@odata.context": _context(request, _select_fragment(emulator, select))}
    if params.get("$count", "").lower() == "true":
        body["@odata.count"] = sum(
            1 for row in ordered if all(_compare(row.get(n), op, v) for n, op, v in clauses)
        )
    body["value"] = [_row_body(request, emulator, row, select) for row in page]
    if more:
        last = page[-1]
        position = (str(last.get(metadata.key_column) or "").lower(), str(last[metadata.primary_id]))
        kept = [(name, value) for name, value in params.multi_items() if name != "$skiptoken"]
        kept.append(("$skiptoken", _encode_token(position)))
        query = urlencode(kept, quote_via=quote, safe="$,'()")
        body["@odata.nextLink"] = f"{_api_root(request)}/{metadata.entity_set}?{query}"
    _note(request, outcome="listed")
    headers = {"Preference-Applied": ",".join(applied)} if applied else None
    return JSONResponse(body, headers=headers)


def _top(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        top = int(text)
    except ValueError:
        raise ODataError(400, ODATA_BAD_REQUEST, f"Invalid value '{text}' for $top query option.") from None
    if top < 0:
        raise ODataError(400, ODATA_BAD_REQUEST, f"Invalid value '{text}' for $top query option.")
    return top


# $batch --------------------------------------------------------------------------------------------------

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_MAX_BATCH_REQUESTS = 1000
_FORWARDED_HEADERS = (
    "content-type",
    "odata-entityid",
    "etag",
    "location",
    "retry-after",
    "preference-applied",
)


def _multipart(body: str, boundary: str) -> list[tuple[dict[str, str], str]]:
    """The parts of a multipart/mixed body: (headers with lower-cased names, content)."""
    parts = []
    for chunk in body.replace("\r\n", "\n").split(f"--{boundary}")[1:]:
        if chunk.startswith("--"):
            break
        head, _, content = chunk.strip("\n").partition("\n\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, sep, value in (line.partition(":") for line in head.splitlines())
            if sep
        }
        parts.append((headers, content))
    return parts


def _inner_request(text: str) -> tuple[str, str, dict[str, str], str]:
    head, _, body = text.strip("\n").partition("\n\n")
    first, *header_lines = head.splitlines()
    method, _, rest = first.partition(" ")
    url = rest.rsplit(" HTTP/", 1)[0].strip()
    headers = {
        name.strip(): value.strip()
        for name, sep, value in (line.partition(":") for line in header_lines)
        if sep
    }
    return method.upper(), url, headers, body.strip()


def _http_part(response: httpx.Response, content_id: str | None) -> str:
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"HTTP/1.1 {response.status_code} {response.reason_phrase}"]
    lines += [f"{name}: {response.headers[name]}" for name in _FORWARDED_HEADERS if name in response.headers]
    lines += ["", response.text]
    return "\r\n".join(lines) + "\r\n"


_Run = Callable[[str, Mapping[str, str]], Awaitable[httpx.Response]]


async def _batch(request: Request, app: FastAPI, emulator: DataverseEmulator) -> Response:
    """``POST $batch`` (multipart/mixed): each part is run as its own request (faults, limits, log);
    a changeset is all or nothing and may refer to a record it created by ``$<Content-ID>``; without
    ``Prefer: odata.continue-on-error`` the batch stops at the first failed part."""
    content_type = request.headers.get("content-type", "")
    found = _BOUNDARY.search(content_type)
    if found is None or "multipart/mixed" not in content_type:
        raise ODataError(400, ODATA_BAD_REQUEST, "A $batch body is multipart/mixed with a boundary.")
    parts = _multipart((await request.body()).decode("utf-8"), found.group(1))
    if len(parts) > _MAX_BATCH_REQUESTS:
        raise ODataError(400, INVALID_ARGUMENT, f"A $batch holds at most {_MAX_BATCH_REQUESTS} requests.")
    continue_on_error = "odata.continue-on-error" in _prefers(request)
    outer = {name: request.headers[name] for name in ("authorization",) if name in request.headers}
    answered: list[str] = []
    count = 0
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=_origin(request.scope)) as inner:

        async def run(text: str, created: Mapping[str, str]) -> httpx.Response:
            method, url, headers, body = _inner_request(text)
            if url.startswith("$") and (reference := url.split("/", 1)[0][1:]) in created:
                url = created[reference] + url[len(reference) + 1 :]
            target = urlsplit(url)
            path = target.path if target.path.startswith("/") else f"{API_PREFIX}/{target.path}"
            query = f"?{target.query}" if target.query else ""
            return await inner.request(
                method, path + query, headers={**headers, **outer}, content=body.encode() if body else None
            )

        for headers, content in parts:
            nested = _BOUNDARY.search(headers.get("content-type", ""))
            if nested is not None and "multipart/mixed" in headers["content-type"]:
                changeset = _multipart(content, nested.group(1))
                count += len(changeset)
                part, ok = await _changeset(run, emulator, changeset)
            else:
                count += 1
                response = await run(content, {})
                part, ok = _http_part(response, headers.get("content-id")), response.status_code < 400
            answered.append(part)
            if not ok and not continue_on_error:
                break
    _note(request, targets=count, outcome="batch")
    boundary = f"batchresponse_{uuid4_hex()}"
    text = "".join(f"--{boundary}\r\n{part}" for part in answered) + f"--{boundary}--\r\n"
    return Response(text.encode(), status_code=200, media_type=f"multipart/mixed; boundary={boundary}")


async def _changeset(
    run: _Run, emulator: DataverseEmulator, changeset: list[tuple[dict[str, str], str]]
) -> tuple[str, bool]:
    """Run a changeset's requests in order; at the first failure undo them all and answer it alone."""
    saved = emulator.checkpoint()
    created: dict[str, str] = {}
    results: list[tuple[httpx.Response, str | None]] = []
    for part_headers, part in changeset:
        response = await run(part, created)
        content_id = part_headers.get("content-id")
        if response.status_code >= 400:
            emulator.restore(saved)
            return _http_part(response, content_id), False
        if content_id is not None and "odata-entityid" in response.headers:
            created[content_id] = response.headers["odata-entityid"]
        results.append((response, content_id))
    boundary = f"changesetresponse_{uuid4_hex()}"
    body = "".join(f"--{boundary}\r\n{_http_part(*result)}" for result in results)
    return f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n{body}--{boundary}--\r\n", True


def uuid4_hex() -> str:
    return uuid.uuid4().hex


# --- the token endpoint and the admin API ----------------------------------------------------------------


def _add_token_route(app: FastAPI, emulator: DataverseEmulator) -> None:
    @app.post("/oauth2/token")
    async def token(request: Request) -> JSONResponse:
        form = await request.form()
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if not (
            isinstance(client_id, str)
            and isinstance(client_secret, str)
            and emulator.tokens.credentials_match(client_id, client_secret)
        ):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        return JSONResponse(
            {
                "access_token": emulator.tokens.issue(),
                "token_type": "Bearer",
                "expires_in": emulator.tokens.ttl_seconds,
            },
            headers={"Cache-Control": "no-store"},
        )


def _add_admin_routes(app: FastAPI, emulator: DataverseEmulator) -> None:
    def faults_view() -> dict[str, Any]:
        return {
            "script": emulator.faults.script.to_json_dict(),
            "remaining_steps": emulator.faults.remaining_steps(),
        }

    @app.get(f"{ADMIN_PREFIX}/faults")
    async def get_faults() -> dict[str, Any]:
        return faults_view()

    @app.post(f"{ADMIN_PREFIX}/faults")
    async def set_faults(request: Request) -> JSONResponse:
        try:
            script = parse_fault_script(await request.json())
            emulator.load_faults(script)
        except (FaultScriptError, ValueError) as exc:
            return JSONResponse({"error": "invalid_fault_script", "detail": str(exc)}, status_code=422)
        log.info("dataverse_faults_loaded", steps=len(script.steps))
        return JSONResponse(faults_view())

    @app.get(f"{ADMIN_PREFIX}/limits")
    async def get_limits() -> dict[str, Any]:
        return emulator.protection.view()

    @app.post(f"{ADMIN_PREFIX}/limits")
    async def set_limits(request: Request) -> JSONResponse:
        try:
            limits = parse_limits(await request.json())
        except (LimitsError, ValueError) as exc:
            return JSONResponse({"error": "invalid_limits", "detail": str(exc)}, status_code=422)
        emulator.load_limits(limits)
        return JSONResponse(emulator.protection.view())

    @app.post(f"{ADMIN_PREFIX}/refuse")
    async def set_refused(request: Request) -> JSONResponse:
        body = await request.json()
        keys = body.get("hlf_certsyncids") if isinstance(body, dict) else None
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            return JSONResponse(
                {"error": "invalid_refusals", "detail": 'expected {"hlf_certsyncids": ["…"]}'},
                status_code=422,
            )
        return JSONResponse({"refused": emulator.set_refused(keys)})

    @app.post(f"{ADMIN_PREFIX}/metadata")
    async def set_metadata(request: Request) -> JSONResponse:
        body = await request.json()
        try:
            metadata = _metadata_variant(emulator.config.metadata, body)
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": "invalid_metadata", "detail": str(exc)}, status_code=422)
        emulator.set_metadata(metadata)
        return JSONResponse(metadata.to_json_dict())

    @app.post(f"{ADMIN_PREFIX}/reset")
    async def reset() -> dict[str, str]:
        emulator.reset()
        return {"status": "reset"}

    @app.get(f"{ADMIN_PREFIX}/requests")
    async def requests(since: int = 0) -> dict[str, list[dict[str, Any]]]:
        return {"requests": [entry.to_json_dict() for entry in emulator.requests(since)]}

    @app.get(f"{ADMIN_PREFIX}/state")
    async def state() -> dict[str, Any]:
        return emulator.snapshot()

    @app.post(f"{ADMIN_PREFIX}/expire-tokens")
    async def expire_tokens() -> dict[str, int]:
        return {"expired": emulator.tokens.expire_all()}


_ATTRIBUTE_TYPES = ("String", "Picklist", "DateTime", "Integer", "Boolean", "Uniqueidentifier", "BigInt")
_KEY_STATUSES = ("Active", "Pending", "InProgress", "Failed")


def _metadata_variant(start: TableMetadata, body: object) -> TableMetadata:
    """``{"missing": [...], "types": {col: AttributeType}, "key": bool, "key_status": "Pending"}``,
    applied to the start configuration's metadata (``{}`` restores it)."""
    if not isinstance(body, dict) or set(body) - {"missing", "types", "key", "key_status"}:
        raise ValueError(
            'expected {"missing": [...], "types": {...}, "key": true|false, "key_status": "..."}'
        )
    missing = body.get("missing", [])
    types = body.get("types", {})
    key = body.get("key", True)
    key_status = body.get("key_status")
    if not isinstance(missing, list) or not all(isinstance(name, str) for name in missing):
        raise ValueError("missing: a list of column names")
    if not isinstance(types, dict) or not all(value in _ATTRIBUTE_TYPES for value in types.values()):
        raise ValueError(f"types: column → one of {', '.join(_ATTRIBUTE_TYPES)}")
    if not isinstance(key, bool):
        raise ValueError("key: true or false")
    if key_status is not None and key_status not in _KEY_STATUSES:
        raise ValueError(f"key_status: one of {', '.join(_KEY_STATUSES)}")
    unknown = (set(missing) | set(types)) - {column.logical_name for column in start.columns}
    if unknown:
        raise ValueError(f"not columns of the table: {', '.join(sorted(unknown))}")
    return start.changed(missing=missing, types=types, key_status=key_status, key=key)
