"""The Dataverse emulator's memory: its configuration, the table's metadata, its rows, the request log.

The table is interface section 5's ``hlf_certification``: rows keyed by a primary id (a GUID the
emulator assigns) and addressed as well by the alternate key ``hlf_certsyncid``. Writes are checked
against the *current* metadata (so a test that drops or retypes a column sees writes of it refused
too) and applied all or nothing. Everything lives in one ``DataverseEmulator`` guarded by a lock, so a
test thread may read a snapshot while the server's event loop serves.

Errors are ``ODataError``; their codes, where Microsoft documents them, are Dataverse's own:

==============  ======  =========================================================================
``0x8006088a``  404     resource not found for the segment (unknown entity set, action, route)
``0x80060888``  400     OData: unknown property, a value of the wrong type, a bad query option
``0x80044331``  400     validation: text longer than the column, a choice value out of range
``0x80040217``  404     no such record (by id or by alternate key)
``0x80040237``  412     ``If-None-Match: *`` and the record exists
``0x80060882``  412     ``If-Match`` names another row version
``0x80060892``  412     a create whose ``hlf_certsyncid`` another record already holds
``0x80040265``  400     refused by a plug-in (``POST /_sandbox/refuse``)
``0x80060891``  400     the alternate key is missing from the metadata or not Active (our choice)
``0x80040203``  400     a bulk action with no targets or more than ``max_targets`` (our choice)
==============  ======  =========================================================================
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, Literal

from certsync.resilience.clock import Clock, Sleep, SystemClock, real_sleep
from certsync.sandbox.dataverse_limits import Admission, Refusal, ServiceLimits, ServiceProtection
from certsync.sandbox.faults import FaultDecision, FaultEngine, FaultScript
from certsync.sandbox.state import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TOKEN, Tokens

CRM_NAMESPACE = "Microsoft.Dynamics.CRM."

NOT_FOUND_SEGMENT = "0x8006088a"
ODATA_BAD_REQUEST = "0x80060888"
VALIDATION_FAILED = "0x80044331"
RECORD_NOT_FOUND = "0x80040217"
RECORD_EXISTS = "0x80040237"
VERSION_MISMATCH = "0x80060882"
DUPLICATE_KEY = "0x80060892"
PLUGIN_REFUSED = "0x80040265"
KEY_NOT_USABLE = "0x80060891"
INVALID_ARGUMENT = "0x80040203"

AttributeType = Literal["String", "Picklist", "DateTime", "Integer", "Boolean", "Uniqueidentifier", "BigInt"]
KeyStatus = Literal["Active", "Pending", "InProgress", "Failed"]

STATUS_OPTIONS: Mapping[str, int] = {
    "Active": 100000000,
    "Suspended": 100000001,
    "Expired": 100000002,
    "Revoked": 100000003,
}
"""``hlf_status``'s choice: label → value (interface section 5)."""

_EDM_TYPES: Mapping[AttributeType, str] = {
    "String": "Edm.String",
    "Picklist": "Edm.Int32",
    "Integer": "Edm.Int32",
    "Boolean": "Edm.Boolean",
    "DateTime": "Edm.DateTimeOffset",
    "Uniqueidentifier": "Edm.Guid",
    "BigInt": "Edm.Int64",
}
_INT32 = (-(2**31), 2**31 - 1)
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class ODataError(Exception):
    """An answer ``{"error": {"code", "message"}}`` with ``status``, as Dataverse sends it."""

    def __init__(self, status: int, code: str, message: str, *, outcome: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.outcome = outcome or code

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the table as its metadata describes it."""

    logical_name: str
    attribute_type: AttributeType
    max_length: int | None = None
    date_only: bool = False

    @property
    def edm_type(self) -> str:
        return "Edm.Date" if self.date_only else _EDM_TYPES[self.attribute_type]

    def metadata(self) -> dict[str, Any]:
        """The column as ``EntityDefinitions(…)/Attributes`` describes it."""
        data: dict[str, Any] = {
            "@odata.type": f"#{CRM_NAMESPACE}{self.attribute_type}AttributeMetadata",
            "LogicalName": self.logical_name,
            "SchemaName": self.logical_name,
            "AttributeType": self.attribute_type,
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"attribute:{self.logical_name}")),
        }
        if self.max_length is not None:
            data["MaxLength"] = self.max_length
        if self.attribute_type == "DateTime":
            data["Format"] = "DateOnly" if self.date_only else "DateAndTime"
            data["DateTimeBehavior"] = {"Value": "DateOnly" if self.date_only else "UserLocal"}
        return data


PINNED_COLUMNS: tuple[Column, ...] = (
    Column("hlf_certsyncid", "String", max_length=36),
    Column("hlf_peermentorid", "String", max_length=36),
    Column("hlf_certificationtype", "String", max_length=100),
    Column("hlf_status", "Picklist"),
    Column("hlf_validfrom", "DateTime", date_only=True),
    Column("hlf_validuntil", "DateTime", date_only=True),
    Column("hlf_sourceversion", "Integer"),
    Column("hlf_publiclylisted", "Boolean"),
    Column("hlf_changedat", "DateTime"),
)
"""Interface section 5's columns, as HLF's table defines them (docs/dataverse.md)."""

SYSTEM_COLUMNS = ("versionnumber", "createdon", "modifiedon")


@dataclass(frozen=True, slots=True)
class TableMetadata:
    """What ``EntityDefinitions`` answers about the table, and what writes are checked against.

    ``key_attributes`` of ``None`` means the table has no alternate key at all.
    """

    logical_name: str = "hlf_certification"
    entity_set: str = "hlf_certifications"
    primary_id: str = "hlf_certificationid"
    columns: tuple[Column, ...] = PINNED_COLUMNS
    key_attributes: tuple[str, ...] | None = ("hlf_certsyncid",)
    key_status: KeyStatus = "Active"
    # Each field of every row written is looked up by name: a dict, built with the metadata.
    _by_name: dict[str, Column] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {column.logical_name: column for column in self.columns})

    @property
    def key_column(self) -> str:
        return "hlf_certsyncid"

    @property
    def entity_type(self) -> str:
        return f"{CRM_NAMESPACE}{self.logical_name}"

    def column(self, name: str) -> Column | None:
        return self._by_name.get(name)

    def changed(
        self,
        *,
        missing: Iterable[str] = (),
        types: Mapping[str, AttributeType] | None = None,
        key_status: KeyStatus | None = None,
        key: bool = True,
    ) -> TableMetadata:
        """A variant for tests of ``contract check``: columns dropped or retyped, the key not Active."""
        dropped = set(missing)
        retyped = dict(types or {})
        columns = tuple(
            Column(c.logical_name, retyped[c.logical_name]) if c.logical_name in retyped else c
            for c in self.columns
            if c.logical_name not in dropped
        )
        return replace(
            self,
            columns=columns,
            key_attributes=self.key_attributes if key else None,
            key_status=key_status or self.key_status,
        )

    def entity(self) -> dict[str, Any]:
        attributes = [
            Column(self.primary_id, "Uniqueidentifier").metadata(),
            *(column.metadata() for column in self.columns),
            Column("versionnumber", "BigInt").metadata(),
            Column("createdon", "DateTime").metadata(),
            Column("modifiedon", "DateTime").metadata(),
        ]
        keys = (
            []
            if self.key_attributes is None
            else [
                {
                    "LogicalName": f"{self.logical_name}_certsyncid_key",
                    "SchemaName": f"{self.logical_name}_certsyncid_key",
                    "KeyAttributes": list(self.key_attributes),
                    "EntityKeyIndexStatus": self.key_status,
                    "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"key:{self.logical_name}")),
                }
            ]
        )
        return {
            "LogicalName": self.logical_name,
            "SchemaName": self.logical_name,
            "EntitySetName": self.entity_set,
            "PrimaryIdAttribute": self.primary_id,
            "PrimaryNameAttribute": self.key_column,
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"entity:{self.logical_name}")),
            "Attributes": attributes,
            "Keys": keys,
        }

    def picklists(self) -> list[dict[str, Any]]:
        """``…/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata`` with their options."""
        return [
            {
                "LogicalName": column.logical_name,
                "MetadataId": column.metadata()["MetadataId"],
                "OptionSet": {
                    "Options": [
                        {
                            "Value": value,
                            "Label": {"LocalizedLabels": [{"Label": label, "LanguageCode": 1033}]},
                        }
                        for label, value in STATUS_OPTIONS.items()
                    ]
                },
            }
            for column in self.columns
            if column.attribute_type == "Picklist"
        ]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "logical_name": self.logical_name,
            "entity_set": self.entity_set,
            "columns": {column.logical_name: column.attribute_type for column in self.columns},
            "key_attributes": None if self.key_attributes is None else list(self.key_attributes),
            "key_status": self.key_status,
        }


_ORG_NAMESPACE = uuid.UUID("6b1f3c0e-7f4a-4c55-9d0e-2c1b9a8e5d31")
ORGANIZATION_ID = uuid.uuid5(_ORG_NAMESPACE, "organization")
BUSINESS_UNIT_ID = uuid.uuid5(_ORG_NAMESPACE, "business-unit")
APPLICATION_USER_ID = uuid.uuid5(_ORG_NAMESPACE, "application-user")


@dataclass(frozen=True, slots=True)
class DataverseConfig:
    """How the emulator starts (``POST /_sandbox/reset`` returns to exactly this).

    Tokens as in ``SandboxConfig`` (static ones, and ``/oauth2/token`` for ``client_id``/``secret``).
    ``faults`` plays scripted steps and latency (its ``rate_limit`` is refused: Dataverse's limits are
    ``limits``). ``refused`` are ``hlf_certsyncid`` values a plug-in refuses in any write. ``monotonic``
    drives the limits' windows and token expiry, ``clock`` stamps rows and the log, ``sleep`` waits out
    latency (a test passes a sleep that moves its clock: execution time without waiting).
    """

    static_tokens: tuple[str, ...] = field(default=(DEFAULT_TOKEN,), repr=False)
    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = field(default=DEFAULT_CLIENT_SECRET, repr=False)
    token_ttl_seconds: int = 3599
    metadata: TableMetadata = field(default_factory=TableMetadata)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    faults: FaultScript = field(default_factory=FaultScript)
    refused: tuple[str, ...] = ()
    max_targets: int = 1000
    max_page_size: int = 5000
    request_log_size: int = 100_000
    organization_id: uuid.UUID = ORGANIZATION_ID
    business_unit_id: uuid.UUID = BUSINESS_UNIT_ID
    user_id: uuid.UUID = APPLICATION_USER_ID
    monotonic: Callable[[], float] = time.monotonic
    clock: Clock = field(default_factory=SystemClock)
    sleep: Sleep = real_sleep

    def __post_init__(self) -> None:
        if self.faults.rate_limit is not None:
            raise ValueError("the Dataverse emulator's rate limits are its service-protection limits")
        if self.token_ttl_seconds < 1:
            raise ValueError("token_ttl_seconds must be at least 1")
        if self.max_targets < 1:
            raise ValueError("max_targets must be at least 1")


@dataclass(frozen=True, slots=True)
class DataverseRequest:
    """One API request as received and answered; never the token or the body.

    ``targets`` is how many rows a bulk action carried; ``key`` the alternate key (or id) a single-row
    request addressed; ``fault`` what was injected (``status:503``, ``drop``, ``rate_limit:requests``,
    ``rate_limit:execution_time``, ``rate_limit:concurrency``); ``outcome`` what the emulator made of
    it (``created``, ``updated``, ``deleted``, ``upserted``, or the error code it answered).
    """

    seq: int
    at: datetime
    method: str
    path: str
    query: str
    has_authorization: bool
    status: int | None
    fault: str | None
    outcome: str | None
    targets: int | None
    key: str | None
    delay_ms: float

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


RowRef = tuple[Literal["id", "key"], str]
"""How a request names a row: by primary id (a GUID) or by the alternate key's value."""


@dataclass(frozen=True, slots=True)
class Written:
    """What one write did to one row."""

    created: bool
    row: dict[str, Any]


class DataverseEmulator:
    """The emulator's whole mutable state, built from a ``DataverseConfig``."""

    def __init__(self, config: DataverseConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        self.tokens = Tokens(
            static_tokens=config.static_tokens,
            client_id=config.client_id,
            client_secret=config.client_secret,
            ttl_seconds=config.token_ttl_seconds,
            monotonic=config.monotonic,
        )
        self.faults = FaultEngine(config.faults, config.monotonic)
        self.protection = ServiceProtection(config.limits, config.monotonic)
        self.reset()

    def reset(self) -> None:
        """Forget every row, token and request; back to the start configuration."""
        with self._lock:
            self._rows: dict[str, dict[str, Any]] = {}  # primary id → row
            self._by_key: dict[str, str] = {}  # lower-cased hlf_certsyncid → primary id
            self._deleted: list[str] = []
            self._row_version = 0
            self._changes = 0  # bumped by every change to the rows: query()'s cache key
            self._ordered: tuple[int, list[tuple[str, str]], list[dict[str, Any]]] | None = None
            self.metadata = self.config.metadata
            self.refused: set[str] = {key.lower() for key in self.config.refused}
            self._requests: deque[DataverseRequest] = deque(maxlen=self.config.request_log_size)
            self._seq = 0
            self.tokens.expire_all()
            self.faults.load(self.config.faults)
            self.protection.load(self.config.limits)

    # admin -------------------------------------------------------------------------------------------

    def set_metadata(self, metadata: TableMetadata) -> None:
        with self._lock:
            self.metadata = metadata
            self._changes += 1

    def set_refused(self, keys: Iterable[str]) -> list[str]:
        with self._lock:
            self.refused = {key.lower() for key in keys}
            return sorted(self.refused)

    def load_faults(self, script: FaultScript) -> None:
        if script.rate_limit is not None:
            raise ValueError("use POST /_sandbox/limits for the Dataverse emulator's rate limits")
        with self._lock:
            self.faults.load(script)

    def load_limits(self, limits: ServiceLimits) -> None:
        with self._lock:
            self.protection.load(limits)

    # the ASGI wrapper's accounting -------------------------------------------------------------------

    def decide(self, method: str, path: str) -> FaultDecision:
        with self._lock:
            return self.faults.decide(method, path)

    def admit(self) -> Admission | Refusal:
        with self._lock:
            return self.protection.admit()

    def finish(self, admission: Admission) -> None:
        with self._lock:
            self.protection.finish(admission)

    def remaining(self) -> dict[str, str]:
        with self._lock:
            return self.protection.remaining()

    def record(self, **fields: Any) -> DataverseRequest:
        with self._lock:
            self._seq += 1
            entry = DataverseRequest(seq=self._seq, at=self.config.clock.now(), **fields)
            self._requests.append(entry)
            return entry

    def requests(self, since: int = 0) -> list[DataverseRequest]:
        with self._lock:
            return [entry for entry in self._requests if entry.seq > since]

    # rows --------------------------------------------------------------------------------------------

    def check_key_usable(self) -> None:
        """Addressing rows by ``hlf_certsyncid`` needs the alternate key, and it must be Active."""
        metadata = self.metadata
        if metadata.key_attributes is None:
            raise ODataError(
                400,
                KEY_NOT_USABLE,
                f"The key attribute(s) {metadata.key_column} are not an alternate key of "
                f"entity {metadata.logical_name}.",
            )
        if metadata.key_status != "Active":
            raise ODataError(
                400,
                KEY_NOT_USABLE,
                f"The alternate key on {metadata.key_column} of entity {metadata.logical_name} is not "
                f"active (EntityKeyIndexStatus {metadata.key_status}).",
            )

    def get(self, ref: RowRef) -> dict[str, Any]:
        with self._lock:
            primary = self._resolve(ref)
            if primary is None:
                raise self._not_found(ref)
            return dict(self._rows[primary])

    def write(
        self,
        ref: RowRef,
        body: Mapping[str, Any],
        *,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> Written:
        """``PATCH`` one row: an upsert unless ``If-Match``/``If-None-Match`` say otherwise."""
        with self._lock:
            values = self._validated(body, ref=ref, creating_allowed=True)
            self._refuse_if_refused([self._key_of(ref, values)])
            primary = self._resolve(ref)
            if if_none_match is not None and if_none_match.strip() == "*" and primary is not None:
                raise ODataError(412, RECORD_EXISTS, "A record with matching key values already exists.")
            if if_match is not None:
                if primary is None:
                    raise self._not_found(ref)
                self._check_etag(primary, if_match)
            return self._apply(ref, primary, values)

    def create(self, body: Mapping[str, Any]) -> Written:
        """``POST`` one row: a new record, with the id it names or a fresh one."""
        with self._lock:
            values = self._validated(body, ref=None, creating_allowed=True)
            self._refuse_if_refused([values.get(self.metadata.key_column)])
            return self._insert(values)

    def delete(self, ref: RowRef, *, if_match: str | None = None) -> dict[str, Any]:
        with self._lock:
            primary = self._resolve(ref)
            if primary is None:
                raise self._not_found(ref)
            if if_match is not None:
                self._check_etag(primary, if_match)
            row = self._rows.pop(primary)
            self._changes += 1
            key = row.get(self.metadata.key_column)
            if isinstance(key, str):
                self._by_key.pop(key.lower(), None)
                self._deleted.append(key)
            return row

    def bulk(
        self, action: Literal["UpsertMultiple", "CreateMultiple", "UpdateMultiple"], targets: list[Any]
    ) -> list[str]:
        """Apply every target or none: the first refused one fails the whole call, nothing changes."""
        with self._lock:
            if not targets or len(targets) > self.config.max_targets:
                raise ODataError(
                    400,
                    INVALID_ARGUMENT,
                    f"{action} takes 1 to {self.config.max_targets} targets; got {len(targets)}.",
                )
            planned = [self._plan_target(action, target) for target in targets]
            self._refuse_if_refused([self._key_of(ref, values) for ref, values in planned])
            undo: list[tuple[str, dict[str, Any] | None]] = []
            ids: list[str] = []
            try:
                for ref, values in planned:
                    primary = None if ref is None else self._resolve(ref)
                    if action == "UpdateMultiple" and primary is None:
                        assert ref is not None
                        raise self._not_found(ref)
                    previous = None if primary is None else dict(self._rows[primary])
                    if action == "CreateMultiple" or ref is None:
                        written = self._insert(values)
                    else:
                        written = self._apply(ref, primary, values)
                    row_id = str(written.row[self.metadata.primary_id])
                    undo.append((row_id, previous))
                    ids.append(row_id)
            except ODataError:
                self._undo(undo)
                raise
            return ids

    def checkpoint(self) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
        """The rows as they are, for a ``$batch`` changeset to return to if one of its requests fails."""
        with self._lock:
            return {k: dict(v) for k, v in self._rows.items()}, dict(self._by_key), list(self._deleted)

    def restore(self, checkpoint: tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]) -> None:
        with self._lock:
            rows, by_key, deleted = checkpoint
            self._rows, self._by_key, self._deleted = dict(rows), dict(by_key), list(deleted)
            self._changes += 1

    def query(self) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
        """Every row ordered by the alternate key (rows without one first), then by id, with each
        row's position ``(lower-cased key, id)`` — what a ``$skiptoken`` names. Kept sorted between
        changes, so that paging through a large table does not sort it again for every page; the rows
        are the emulator's own: read them, never change them."""
        with self._lock:
            if self._ordered is None or self._ordered[0] != self._changes:
                key, primary = self.metadata.key_column, self.metadata.primary_id
                ranked = sorted(
                    ((str(row.get(key) or "").lower(), str(row[primary])), row) for row in self._rows.values()
                )
                self._ordered = (
                    self._changes,
                    [position for position, _ in ranked],
                    [dict(row) for _, row in ranked],
                )
            return self._ordered[1], self._ordered[2]

    def snapshot(self) -> dict[str, Any]:
        """Rows by alternate key (by id when they have none), deletions, refusals, metadata, limits."""
        with self._lock:
            key = self.metadata.key_column
            return {
                "rows": {
                    str(row.get(key) or primary): dict(row) for primary, row in sorted(self._rows.items())
                },
                "deleted": list(self._deleted),
                "refused": sorted(self.refused),
                "metadata": self.metadata.to_json_dict(),
                "limits": self.protection.view(),
            }

    # internals ---------------------------------------------------------------------------------------

    def _undo(self, undo: list[tuple[str, dict[str, Any] | None]]) -> None:
        self._changes += 1
        for row_id, previous in reversed(undo):
            current = self._rows.pop(row_id, None)
            if current is not None and isinstance(current.get(self.metadata.key_column), str):
                self._by_key.pop(str(current[self.metadata.key_column]).lower(), None)
            if previous is not None:
                self._rows[row_id] = previous
                if isinstance(previous.get(self.metadata.key_column), str):
                    self._by_key[str(previous[self.metadata.key_column]).lower()] = row_id

    def _plan_target(self, action: str, target: Any) -> tuple[RowRef | None, dict[str, Any]]:
        metadata = self.metadata
        if not isinstance(target, dict):
            raise ODataError(400, ODATA_BAD_REQUEST, f"{action}: every target is a JSON object.")
        odata_type = str(target.get("@odata.type", "")).lstrip("#")
        if odata_type != metadata.entity_type:
            raise ODataError(
                400,
                ODATA_BAD_REQUEST,
                f'{action}: every target needs "@odata.type": "{metadata.entity_type}".',
            )
        ref: RowRef | None = None
        odata_id = target.get("@odata.id")
        if odata_id is not None:
            ref = parse_row_ref(str(odata_id).rsplit("/", 1)[-1], metadata, entity_set_required=True)
        elif action != "CreateMultiple":
            if isinstance(target.get(metadata.primary_id), str):
                ref = ("id", str(target[metadata.primary_id]))
            elif isinstance(target.get(metadata.key_column), str):
                ref = ("key", str(target[metadata.key_column]))
            elif action == "UpdateMultiple":
                raise ODataError(
                    400, ODATA_BAD_REQUEST, f"UpdateMultiple: a target lacks {metadata.primary_id}."
                )
        if ref is not None and ref[0] == "key":
            self.check_key_usable()
        body = {name: value for name, value in target.items() if not name.startswith("@odata.")}
        return ref, self._validated(body, ref=ref, creating_allowed=action != "UpdateMultiple")

    def _validated(
        self, body: Mapping[str, Any], *, ref: RowRef | None, creating_allowed: bool
    ) -> dict[str, Any]:
        metadata = self.metadata
        values: dict[str, Any] = {}
        for name, value in body.items():
            if name == metadata.primary_id:
                if value is not None and not (isinstance(value, str) and _GUID.match(value)):
                    raise _wrong_type(value, "Edm.Guid")
                if (
                    ref is not None
                    and ref[0] == "id"
                    and value is not None
                    and value.lower() != ref[1].lower()
                ):
                    raise ODataError(400, ODATA_BAD_REQUEST, f"{name} in the body differs from the URL's id.")
                if value is not None:
                    values[name] = value.lower()
                continue
            column = metadata.column(name)
            if column is None:
                raise ODataError(
                    400,
                    ODATA_BAD_REQUEST,
                    f"The property '{name}' does not exist on type '{metadata.entity_type}'. "
                    "Make sure to only use property names that are defined by the type.",
                )
            values[name] = _coerce(column, value, metadata.logical_name)
        key = values.get(metadata.key_column)
        if ref is not None and ref[0] == "key" and key is not None and str(key).lower() != ref[1].lower():
            raise ODataError(
                400, ODATA_BAD_REQUEST, f"{metadata.key_column} in the body differs from the URL's key."
            )
        return values

    def _refuse_if_refused(self, keys: Iterable[object]) -> None:
        for key in keys:
            if isinstance(key, str) and key.lower() in self.refused:
                raise ODataError(
                    400,
                    PLUGIN_REFUSED,
                    f"The sandbox's plug-in refused the record with {self.metadata.key_column} '{key}'.",
                    outcome="refused",
                )

    def _key_of(self, ref: RowRef | None, values: Mapping[str, Any]) -> object:
        if ref is not None and ref[0] == "key":
            return ref[1]
        if values.get(self.metadata.key_column) is not None:
            return values[self.metadata.key_column]
        if ref is not None:
            held = self._rows.get(ref[1].lower())
            return None if held is None else held.get(self.metadata.key_column)
        return None

    def _resolve(self, ref: RowRef) -> str | None:
        kind, value = ref
        if kind == "id":
            return value.lower() if value.lower() in self._rows else None
        return self._by_key.get(value.lower())

    def _check_etag(self, primary: str, if_match: str) -> None:
        wanted = if_match.strip()
        if wanted == "*":
            return
        if wanted != etag(self._rows[primary]):
            raise ODataError(
                412,
                VERSION_MISMATCH,
                "The version of the existing record doesn't match the RowVersion property provided.",
            )

    def _not_found(self, ref: RowRef) -> ODataError:
        kind, value = ref
        if kind == "id":
            message = f"{self.metadata.logical_name} With Id = {value} Does Not Exist"
        else:
            message = (
                f"A record with the specified key values does not exist in {self.metadata.logical_name} "
                "entity"
            )
        return ODataError(404, RECORD_NOT_FOUND, message, outcome="not_found")

    def _stamp(self) -> tuple[int, str]:
        self._row_version += 1
        return self._row_version, _utc_seconds(self.config.clock.now())

    def _apply(self, ref: RowRef, primary: str | None, values: dict[str, Any]) -> Written:
        if primary is None:
            seeded = dict(values)
            if ref[0] == "key":
                seeded[self.metadata.key_column] = ref[1]
            else:
                seeded[self.metadata.primary_id] = ref[1].lower()
            return self._insert(seeded)
        held = self._rows[primary]
        version, now = self._stamp()
        row = {**held, **values, "versionnumber": version, "modifiedon": now}
        self._set_row(primary, row, previous_key=held.get(self.metadata.key_column))
        return Written(created=False, row=dict(row))

    def _insert(self, values: dict[str, Any]) -> Written:
        metadata = self.metadata
        primary = str(values.get(metadata.primary_id) or uuid.uuid4()).lower()
        if primary in self._rows:
            raise ODataError(412, RECORD_EXISTS, "A record with matching key values already exists.")
        key = values.get(metadata.key_column)
        if isinstance(key, str) and key.lower() in self._by_key:
            raise ODataError(
                412,
                DUPLICATE_KEY,
                f"A record that has the attribute values {key} already exists. The entity key "
                f"{metadata.logical_name}_certsyncid_key requires that this set of attributes contains "
                "unique values.",
            )
        version, now = self._stamp()
        row: dict[str, Any] = {metadata.primary_id: primary}
        row.update({column.logical_name: None for column in metadata.columns})
        row.update(values)
        row.update(
            {metadata.primary_id: primary, "versionnumber": version, "createdon": now, "modifiedon": now}
        )
        self._set_row(primary, row, previous_key=None)
        return Written(created=True, row=dict(row))

    def _set_row(self, primary: str, row: dict[str, Any], previous_key: object) -> None:
        key_column = self.metadata.key_column
        if isinstance(previous_key, str):
            self._by_key.pop(previous_key.lower(), None)
        key = row.get(key_column)
        if isinstance(key, str):
            if self._by_key.get(key.lower(), primary) != primary:
                raise ODataError(412, DUPLICATE_KEY, f"Another record already holds {key_column} '{key}'.")
            self._by_key[key.lower()] = primary
        self._rows[primary] = row
        self._changes += 1


def etag(row: Mapping[str, Any]) -> str:
    return f'W/"{row["versionnumber"]}"'


def parse_row_ref(segment: str, metadata: TableMetadata, *, entity_set_required: bool) -> RowRef:
    """``hlf_certifications(<guid>)`` or ``hlf_certifications(hlf_certsyncid='…')`` (or just the part
    in parentheses) as a ``RowRef``; anything else is a 400."""
    match = re.fullmatch(r"(?:(?P<set>\w+))?\((?P<inner>.*)\)", segment.strip())
    if match is None or (entity_set_required and match["set"] != metadata.entity_set):
        raise ODataError(400, ODATA_BAD_REQUEST, f"'{segment}' does not name a {metadata.logical_name} row.")
    inner = match["inner"].strip()
    if _GUID.match(inner):
        return ("id", inner.lower())
    key = re.fullmatch(r"(?P<name>\w+)\s*=\s*'(?P<value>(?:[^']|'')*)'", inner)
    if key is None:
        raise ODataError(400, ODATA_BAD_REQUEST, f"Bad key segment '({inner})'.")
    if key["name"] != metadata.key_column:
        raise ODataError(
            400,
            KEY_NOT_USABLE,
            f"The key attribute(s) {key['name']} are not an alternate key of entity {metadata.logical_name}.",
        )
    return ("key", key["value"].replace("''", "'"))


def _wrong_type(value: object, edm_type: str) -> ODataError:
    return ODataError(
        400, ODATA_BAD_REQUEST, f"Cannot convert the literal '{value}' to the expected type '{edm_type}'."
    )


def _coerce(column: Column, value: object, logical_name: str) -> object:
    """The value as the column stores it, or the 400 Dataverse answers for it."""
    if value is None:
        return None
    return _COERCERS[column.attribute_type](column, value, logical_name)


def _coerce_string(column: Column, value: object, logical_name: str) -> object:
    if not isinstance(value, str):
        raise _wrong_type(value, column.edm_type)
    if column.max_length is not None and len(value) > column.max_length:
        raise ODataError(
            400,
            VALIDATION_FAILED,
            f"A validation error occurred. The length of the '{column.logical_name}' attribute of the "
            f"'{logical_name}' entity exceeded the maximum allowed length of '{column.max_length}'.",
        )
    return value


def _coerce_number(column: Column, value: object, logical_name: str) -> object:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong_type(value, column.edm_type)
    if column.attribute_type != "BigInt" and not _INT32[0] <= value <= _INT32[1]:
        raise _wrong_type(value, column.edm_type)
    if column.attribute_type == "Picklist" and value not in STATUS_OPTIONS.values():
        accepted = ",".join(str(option) for option in STATUS_OPTIONS.values())
        raise ODataError(
            400,
            VALIDATION_FAILED,
            f"A validation error occurred. The value {value} of '{column.logical_name}' on record of "
            f"type '{logical_name}' is outside the valid range. Accepted Values: {accepted}",
        )
    return value


def _coerce_boolean(column: Column, value: object, logical_name: str) -> object:
    if not isinstance(value, bool):
        raise _wrong_type(value, column.edm_type)
    return value


def _coerce_datetime(column: Column, value: object, logical_name: str) -> object:
    if not isinstance(value, str):
        raise _wrong_type(value, column.edm_type)
    try:
        if column.date_only:
            if not _DATE_ONLY.match(value):
                raise ValueError(value)
            return date.fromisoformat(value).isoformat()
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _wrong_type(value, column.edm_type) from None
    if moment.tzinfo is None:
        raise _wrong_type(value, column.edm_type)
    return _utc_seconds(moment)


def _coerce_guid(column: Column, value: object, logical_name: str) -> object:
    if not isinstance(value, str) or not _GUID.match(value):
        raise _wrong_type(value, column.edm_type)
    return value.lower()


_COERCERS: Mapping[AttributeType, Callable[[Column, object, str], object]] = {
    "String": _coerce_string,
    "Picklist": _coerce_number,
    "Integer": _coerce_number,
    "BigInt": _coerce_number,
    "Boolean": _coerce_boolean,
    "DateTime": _coerce_datetime,
    "Uniqueidentifier": _coerce_guid,
}


def _utc_seconds(moment: datetime) -> str:
    # isoformat, not strftime: twice per row written, and strftime was 13 % of a bulk drain's emulator.
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
