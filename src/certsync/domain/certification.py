"""Certification states, the one table of allowed transitions, and renewal history entries.

Every refusal names its rule (``DomainError.rule``); the database trigger
``private.enforce_certification_rules`` refuses the same stored changes with the same rule names
(SQLSTATE 23514), and one table of cases (``tests/support/rule_cases.py``) holds both to that.

Pure: no I/O, no clock. Callers pass ``today`` (a date) or ``renewed_at`` (an aware datetime in the
zone that decides "today") read from an injected clock, and persist what the domain decides.

::

    issue ─▶ active ──suspend──▶ suspended ──reinstate (validity not passed)──▶ active
               │  ▲                  │
       expire  │  │ renew            │ renew (stays suspended: only reinstate lifts a suspension)
   (validity   ▼  │                  ▼
     passed)  expired            suspended
    revoke: active | suspended | expired ──▶ revoked   (final: nothing leaves it)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Final
from uuid import UUID

from certsync.errors import CertsyncError

RENEWAL_ENTRY_SCHEMA_VERSION: Final = 1
"""The ``schema_version`` written into every new renewal entry (see docs/renewal-history.md)."""

RENEWAL_HISTORY_WARNING_THRESHOLD: Final = 500
"""Past this many entries a history is worth moving to ``certification_renewal_events``: a warning, not
a refusal (the repository logs it, the database trigger raises a WARNING; docs/renewal-history.md)."""


class DomainError(CertsyncError):
    """Base of every rule the domain refuses; callers show the message as is (it names no person).

    ``rule`` is the rule's name, the same one the database reports when it refuses the change.
    """

    rule: str = "domain_rule"

    exit_code = 2
    http_status = 422


class CertificationStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Operation(StrEnum):
    """What a coordinator, the sweep or an administrator can do to a certification."""

    ISSUE = "issue"
    RENEW = "renew"
    SUSPEND = "suspend"
    REINSTATE = "reinstate"
    REVOKE = "revoke"
    EXPIRE = "expire"


class InvalidTransition(DomainError):
    """An operation the transition table does not allow from the current status, or whose guard fails."""

    def __init__(
        self,
        operation: Operation,
        from_status: CertificationStatus | None,
        to_status: CertificationStatus,
        reason: str,
        *,
        rule: str,
    ) -> None:
        self.operation = operation
        self.from_status = from_status
        self.to_status = to_status
        self.reason = reason
        self.rule = rule
        origin = from_status.value if from_status is not None else "(new)"
        super().__init__(f"cannot {operation.value}: {origin} → {to_status.value} is not allowed: {reason}")


class InvalidRenewalEntry(DomainError):
    """A renewal entry that this code cannot read (missing or unknown schema_version, bad field), or a
    change of a history that is not one well-formed append."""

    def __init__(self, message: str, *, rule: str = "renewal_entry_malformed") -> None:
        super().__init__(message)
        self.rule = rule


# A guard sees the validity end and today's date, and says why the transition must not happen (or None).
# Its rule name is the function's name without the underscore (the trigger uses the same names).
Guard = Callable[[date, date], str | None]


def _validity_not_passed(valid_until: date, today: date) -> str | None:
    if valid_until < today:
        return f"validity ended on {valid_until.isoformat()}; renew it instead"
    return None


def _validity_passed(valid_until: date, today: date) -> str | None:
    if valid_until >= today:
        return f"still valid until {valid_until.isoformat()}"
    return None


@dataclass(frozen=True, slots=True)
class _Rule:
    to: CertificationStatus
    guard: Guard | None = None


_S = CertificationStatus
_O = Operation

# The only place that says which status an operation may start from and where it leads.
# Renewing a suspended certification extends its validity but keeps it suspended: a suspension is
# lifted only by an explicit reinstate, and without this a suspension that outlived its validity
# could never be lifted (reinstate refuses a lapsed certification).
TRANSITIONS: Final[Mapping[tuple[Operation, CertificationStatus | None], _Rule]] = MappingProxyType(
    {
        (_O.ISSUE, None): _Rule(_S.ACTIVE, _validity_not_passed),
        (_O.RENEW, _S.ACTIVE): _Rule(_S.ACTIVE),
        (_O.RENEW, _S.EXPIRED): _Rule(_S.ACTIVE),
        (_O.RENEW, _S.SUSPENDED): _Rule(_S.SUSPENDED),
        (_O.SUSPEND, _S.ACTIVE): _Rule(_S.SUSPENDED),
        (_O.REINSTATE, _S.SUSPENDED): _Rule(_S.ACTIVE, _validity_not_passed),
        (_O.REVOKE, _S.ACTIVE): _Rule(_S.REVOKED),
        (_O.REVOKE, _S.SUSPENDED): _Rule(_S.REVOKED),
        (_O.REVOKE, _S.EXPIRED): _Rule(_S.REVOKED),
        (_O.EXPIRE, _S.ACTIVE): _Rule(_S.EXPIRED, _validity_passed),
    }
)

# Where each operation leads when it is allowed; used to name the target of a refused operation.
_NOMINAL_TARGET: Final = MappingProxyType(
    {
        _O.ISSUE: _S.ACTIVE,
        _O.RENEW: _S.ACTIVE,
        _O.SUSPEND: _S.SUSPENDED,
        _O.REINSTATE: _S.ACTIVE,
        _O.REVOKE: _S.REVOKED,
        _O.EXPIRE: _S.EXPIRED,
    }
)


def transition(
    operation: Operation, current: CertificationStatus | None, *, valid_until: date, today: date
) -> CertificationStatus:
    """The status ``operation`` leads to from ``current`` (None: not yet issued), or InvalidTransition."""
    rule = TRANSITIONS.get((operation, current))
    if rule is None:
        name, why = _why_not(operation, current)
        raise InvalidTransition(operation, current, _NOMINAL_TARGET[operation], why, rule=name)
    if rule.guard is not None:
        reason = rule.guard(valid_until, today)
        if reason is not None:
            raise InvalidTransition(operation, current, rule.to, reason, rule=guard_rule(rule.guard))
    return rule.to


def guard_rule(guard: Guard) -> str:
    """The rule name of a guard: ``validity_not_passed`` or ``validity_passed``."""
    return guard.__name__.removeprefix("_")


def _why_not(operation: Operation, current: CertificationStatus | None) -> tuple[str, str]:
    """(rule, reason) for an operation the table does not list from ``current``."""
    if current is _S.REVOKED:
        return "revoked_is_final", "revoked is final"
    if current is not None and operation is _O.ISSUE:
        return "already_issued", "the certification is already issued"
    starts = sorted(s.value for (op, s) in TRANSITIONS if op is operation and s is not None)
    return (
        f"{operation.value}_applies_only_to_{'_or_'.join(starts)}",
        f"{operation.value} applies only to {' or '.join(starts)} certifications",
    )


def issue_status(*, valid_from: date, valid_until: date, today: date) -> CertificationStatus:
    """The status of a new certification; refuses an empty or already lapsed validity period."""
    if valid_until < valid_from:
        raise InvalidTransition(
            _O.ISSUE,
            None,
            _S.ACTIVE,
            f"valid_until {valid_until} is before valid_from {valid_from}",
            rule="certifications_validity_check",
        )
    return transition(_O.ISSUE, None, valid_until=valid_until, today=today)


@dataclass(frozen=True, slots=True)
class RenewalEntry:
    """One renewal, as stored in ``certifications.renewal_history`` (schema version 1).

    ``renewed_by`` is the acting user's id: names never enter the history, so it can be logged,
    exported and sent without carrying personal data.
    """

    renewed_at: datetime
    previous_valid_until: date
    new_valid_until: date
    renewed_by: UUID
    note: str | None = None
    schema_version: int = RENEWAL_ENTRY_SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.renewed_at.tzinfo is None:
            raise InvalidRenewalEntry("renewal entry renewed_at must be timezone-aware")

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (ISO dates, UTC timestamp, uuid as text)."""
        return {
            "schema_version": self.schema_version,
            "renewed_at": self.renewed_at.astimezone(UTC).isoformat(),
            "previous_valid_until": self.previous_valid_until.isoformat(),
            "new_valid_until": self.new_valid_until.isoformat(),
            "renewed_by": str(self.renewed_by),
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> RenewalEntry:
        """Read one stored entry; InvalidRenewalEntry names what is missing or malformed."""
        if not isinstance(data, Mapping):
            raise InvalidRenewalEntry(f"renewal entry must be a JSON object, got {type(data).__name__}")
        if "schema_version" not in data:
            raise InvalidRenewalEntry("renewal entry has no schema_version", rule=_SCHEMA_VERSION_RULE)
        version = data["schema_version"]
        if version != RENEWAL_ENTRY_SCHEMA_VERSION or isinstance(version, bool):
            raise InvalidRenewalEntry(
                f"renewal entry schema_version {version!r} is not supported "
                f"(this code reads {RENEWAL_ENTRY_SCHEMA_VERSION})",
                rule=_SCHEMA_VERSION_RULE,
            )
        note = data.get("note")
        renewed_at, previous, new, renewed_by = (
            _text(data, key)
            for key in ("renewed_at", "previous_valid_until", "new_valid_until", "renewed_by")
        )
        if note is not None and not isinstance(note, str):
            raise InvalidRenewalEntry("renewal entry note must be text or null")
        # The formats to_json writes, and no others (the database's check uses the same patterns):
        # fromisoformat alone would also take forms such as 20261129 that the database refuses.
        if not _TIMESTAMP.fullmatch(renewed_at):
            raise InvalidRenewalEntry(
                "renewal entry renewed_at must be a timezone-aware ISO 8601 timestamp (with its UTC offset)"
            )
        if not (_DATE.fullmatch(previous) and _DATE.fullmatch(new)):
            raise InvalidRenewalEntry(
                "renewal entry is malformed: valid_until fields must be ISO dates (YYYY-MM-DD)"
            )
        if not _UUID.fullmatch(renewed_by):
            raise InvalidRenewalEntry("renewal entry is malformed: renewed_by must be a uuid")
        try:
            return cls(
                renewed_at=datetime.fromisoformat(renewed_at),
                previous_valid_until=date.fromisoformat(previous),
                new_valid_until=date.fromisoformat(new),
                renewed_by=UUID(renewed_by),
                note=note,
            )
        except ValueError as exc:
            raise InvalidRenewalEntry(f"renewal entry is malformed: {exc}") from exc


_SCHEMA_VERSION_RULE: Final = "renewal_entry_schema_version"
_TIMESTAMP: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?)", re.ASCII
)
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_UUID: Final = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.ASCII | re.IGNORECASE
)


def _text(data: Mapping[str, object], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise InvalidRenewalEntry(f"renewal entry field {key!r} is missing or not text")
    return value


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a renewal decides: the status and validity end to store, and the entry to append."""

    status: CertificationStatus
    valid_until: date
    entry: RenewalEntry


@dataclass(frozen=True, slots=True)
class Certification:
    """A certification as stored; ``version`` is the database's counter (the domain never sets it)."""

    id: UUID
    peer_mentor_id: UUID
    certification_type: str
    status: CertificationStatus
    valid_from: date
    valid_until: date
    renewal_history: tuple[RenewalEntry, ...]
    version: int

    def status_after(self, operation: Operation, *, today: date) -> CertificationStatus:
        """The status after suspend, reinstate, revoke or expire; InvalidTransition says why not."""
        if operation in (_O.ISSUE, _O.RENEW):
            raise ValueError(f"use issue_status() or renewal() for {operation.value}")
        return transition(operation, self.status, valid_until=self.valid_until, today=today)

    def renewal(
        self, *, new_valid_until: date, renewed_by: UUID, renewed_at: datetime, note: str | None = None
    ) -> Renewal:
        """Decide a renewal through ``new_valid_until`` made at ``renewed_at``.

        ``renewed_at`` is timezone-aware, expressed in the zone that decides "today" (its calendar
        date there is today); the entry stores it in UTC.

        A renewal never shortens validity: asking for the current end again is accepted and recorded
        (two coordinators renewing the same mentor at once both land); asking for an earlier one is
        refused, as is an end that has already passed.
        """
        if renewed_at.tzinfo is None:
            raise ValueError("renewed_at must be timezone-aware")
        today = renewed_at.date()
        status = transition(_O.RENEW, self.status, valid_until=self.valid_until, today=today)
        if new_valid_until < self.valid_until:
            raise _shortens(self.status, status, self.valid_until, new_valid_until)
        if new_valid_until < today:
            raise _end_passed(self.status, status, new_valid_until)
        entry = RenewalEntry(
            renewed_at=renewed_at,
            previous_valid_until=self.valid_until,
            new_valid_until=new_valid_until,
            renewed_by=renewed_by,
            note=note,
        )
        return Renewal(status=status, valid_until=new_valid_until, entry=entry)


def _shortens(
    current: CertificationStatus, status: CertificationStatus, valid_until: date, new_valid_until: date
) -> InvalidTransition:
    return InvalidTransition(
        _O.RENEW,
        current,
        status,
        f"new valid_until {new_valid_until} would shorten validity ending {valid_until}",
        rule="renewal_never_shortens_validity",
    )


def _end_passed(
    current: CertificationStatus, status: CertificationStatus, new_valid_until: date
) -> InvalidTransition:
    return InvalidTransition(
        _O.RENEW,
        current,
        status,
        f"new valid_until {new_valid_until} has already passed",
        rule="renewal_end_not_passed",
    )


# --- a stored change, as the database sees it -----------------------------------------------------
#
# The database does not see operations, only a row before and after an UPDATE. A change that appends
# one renewal entry is a renewal; otherwise the new status names the operation (each status is the
# target of exactly one other operation). The trigger private.enforce_certification_rules applies the
# same reading to TRANSITIONS (mirrored in private.certification_transitions), in the same order.

CHANGE_OPERATION: Final[Mapping[CertificationStatus, Operation]] = MappingProxyType(
    {_S.ACTIVE: _O.REINSTATE, _S.SUSPENDED: _O.SUSPEND, _S.EXPIRED: _O.EXPIRE, _S.REVOKED: _O.REVOKE}
)
"""The operation a status change means when no renewal entry is appended."""


def check_change(
    current: CertificationStatus,
    new: CertificationStatus,
    *,
    valid_until: date,
    new_valid_until: date,
    renewed: bool,
    today: date,
) -> None:
    """Refuse (InvalidTransition, naming the rule) a stored change that no operation of the table makes.

    ``renewed``: the change appends one renewal entry (see :func:`appended_renewal`).
    """
    if renewed:
        status = transition(_O.RENEW, current, valid_until=valid_until, today=today)
        if new_valid_until < valid_until:
            raise _shortens(current, status, valid_until, new_valid_until)
        if new_valid_until < today:
            raise _end_passed(current, status, new_valid_until)
        if new is not status:
            raise InvalidTransition(
                _O.RENEW,
                current,
                new,
                f"a renewal leaves a {current.value} certification {status.value}",
                rule="renewal_status",
            )
        return
    if current is _S.REVOKED and (new is not current or new_valid_until != valid_until):
        raise InvalidTransition(
            CHANGE_OPERATION[new], current, new, "revoked is final", rule="revoked_is_final"
        )
    if new_valid_until != valid_until:
        raise InvalidTransition(
            _O.RENEW,
            current,
            new,
            "valid_until changes only by a renewal, which appends its entry",
            rule="validity_changes_only_by_renewal",
        )
    if new is not current:
        transition(CHANGE_OPERATION[new], current, valid_until=valid_until, today=today)


def appended_renewal(
    history: Sequence[object], new_history: Sequence[object], *, valid_until: date, new_valid_until: date
) -> RenewalEntry | None:
    """The one entry a change appends to a history (None: the history is unchanged).

    InvalidRenewalEntry names the rule when the change edits or removes an entry, appends more than one,
    appends one this code cannot read, or one that does not record the change of ``valid_until``.
    """
    kept = len(history)
    if len(new_history) < kept or list(new_history[:kept]) != list(history):
        raise InvalidRenewalEntry(
            "renewal history only grows by appending: existing entries may not be edited or removed",
            rule="renewal_history_append_only",
        )
    appended = new_history[kept:]
    if not appended:
        return None
    if len(appended) > 1:
        raise InvalidRenewalEntry(
            f"one renewal per update: {len(appended)} entries appended at once", rule="one_renewal_per_update"
        )
    [data] = appended
    if not isinstance(data, Mapping):
        raise InvalidRenewalEntry(f"renewal entry must be a JSON object, got {type(data).__name__}")
    entry = RenewalEntry.from_json(data)
    if (entry.previous_valid_until, entry.new_valid_until) != (valid_until, new_valid_until):
        raise InvalidRenewalEntry(
            f"the renewal entry records {entry.previous_valid_until} → {entry.new_valid_until}, "
            f"the change is {valid_until} → {new_valid_until}",
            rule="renewal_entry_matches_validity",
        )
    return entry


def history_is_long(entries: int) -> bool:
    """Whether a history of ``entries`` entries is past the warning threshold."""
    return entries > RENEWAL_HISTORY_WARNING_THRESHOLD
