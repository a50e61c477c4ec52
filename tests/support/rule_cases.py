"""The one table of certification rule cases, run through both the Python domain
(tests/unit/test_rule_cases.py) and the database trigger as a coordinator
(tests/integration/test_rule_cases.py), so that the two cannot drift apart.

Written out by hand rather than derived from ``TRANSITIONS``: a change to either side's rules fails
one of the two tests until the table, and the other side, follow. Dates are days from "today" (the
association's day; the database's ``private.association_today()`` in the integration test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import UUID

ACTIVE, SUSPENDED, EXPIRED, REVOKED = "active", "suspended", "expired", "revoked"
RENEWED_BY = UUID("00000000-0000-4000-8000-00000000c0c0")

Entry = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChangeCase:
    """A certification in ``from_status``, valid until today + ``valid_until``, updated to ``to_status``.

    ``renew_to``: the update is a renewal, appending one entry and moving valid_until to today + that.
    ``move_to``: the update moves valid_until to today + that without appending anything.
    ``rule``: the rule that refuses the change (None: allowed).
    """

    from_status: str
    to_status: str
    rule: str | None
    valid_until: int = 30
    renew_to: int | None = None
    move_to: int | None = None

    @property
    def allowed(self) -> bool:
        return self.rule is None

    @property
    def new_valid_until(self) -> int:
        if self.renew_to is not None:
            return self.renew_to
        return self.move_to if self.move_to is not None else self.valid_until

    def __str__(self) -> str:
        how = f"renew{self.renew_to:+d}" if self.renew_to is not None else "set"
        if self.move_to is not None:
            how = f"move{self.move_to:+d}"
        return f"{self.from_status}{self.valid_until:+d}-{how}-{self.to_status}"


def _c(from_status: str, to_status: str, rule: str | None = None, **kw: int) -> ChangeCase:
    return ChangeCase(from_status, to_status, rule, **kw)


# fmt: off
CHANGE_CASES: tuple[ChangeCase, ...] = (
    # Every status change of a certification still valid for 30 days (no renewal).
    _c(ACTIVE, ACTIVE),
    _c(ACTIVE, SUSPENDED),
    _c(ACTIVE, EXPIRED, "validity_passed"),
    _c(ACTIVE, REVOKED),
    _c(SUSPENDED, ACTIVE),
    _c(SUSPENDED, SUSPENDED),
    _c(SUSPENDED, EXPIRED, "expire_applies_only_to_active"),
    _c(SUSPENDED, REVOKED),
    _c(EXPIRED, ACTIVE, "reinstate_applies_only_to_suspended"),
    _c(EXPIRED, SUSPENDED, "suspend_applies_only_to_active"),
    _c(EXPIRED, EXPIRED),
    _c(EXPIRED, REVOKED),
    _c(REVOKED, ACTIVE, "revoked_is_final"),
    _c(REVOKED, SUSPENDED, "revoked_is_final"),
    _c(REVOKED, EXPIRED, "revoked_is_final"),
    _c(REVOKED, REVOKED),
    # The date guards, at their edges.
    _c(ACTIVE, EXPIRED, valid_until=-1),
    _c(ACTIVE, EXPIRED, "validity_passed", valid_until=0),
    _c(SUSPENDED, ACTIVE, valid_until=0),
    _c(SUSPENDED, ACTIVE, "validity_not_passed", valid_until=-1),
    _c(EXPIRED, ACTIVE, "reinstate_applies_only_to_suspended", valid_until=-1),
    # Renewals: one entry appended, valid_until moved with it.
    _c(ACTIVE, ACTIVE, renew_to=400),
    _c(ACTIVE, ACTIVE, renew_to=30),  # the current end again: recorded (two coordinators at once)
    _c(EXPIRED, ACTIVE, valid_until=-1, renew_to=400),
    _c(SUSPENDED, SUSPENDED, renew_to=400),
    _c(SUSPENDED, SUSPENDED, valid_until=-5, renew_to=400),
    _c(SUSPENDED, ACTIVE, "renewal_status", renew_to=400),
    _c(ACTIVE, SUSPENDED, "renewal_status", renew_to=400),
    _c(EXPIRED, EXPIRED, "renewal_status", valid_until=-1, renew_to=400),
    _c(ACTIVE, REVOKED, "renewal_status", renew_to=400),
    _c(REVOKED, REVOKED, "revoked_is_final", renew_to=400),
    _c(REVOKED, ACTIVE, "revoked_is_final", renew_to=400),
    _c(ACTIVE, ACTIVE, "renewal_never_shortens_validity", renew_to=10),
    _c(EXPIRED, ACTIVE, "renewal_end_not_passed", valid_until=-10, renew_to=-1),
    # valid_until moved without a renewal.
    _c(ACTIVE, ACTIVE, "validity_changes_only_by_renewal", move_to=400),
    _c(ACTIVE, ACTIVE, "validity_changes_only_by_renewal", move_to=10),
    _c(SUSPENDED, ACTIVE, "validity_changes_only_by_renewal", valid_until=-1, move_to=400),
    _c(REVOKED, REVOKED, "revoked_is_final", move_to=400),
)
# fmt: on


def entry(previous_valid_until: date, new_valid_until: date, note: str | None = None) -> Entry:
    """A valid v1 entry, as RenewalEntry.to_json writes it."""
    return {
        "schema_version": 1,
        "renewed_at": datetime(2026, 11, 29, 10, 0, tzinfo=UTC).isoformat(),
        "previous_valid_until": previous_valid_until.isoformat(),
        "new_valid_until": new_valid_until.isoformat(),
        "renewed_by": str(RENEWED_BY),
        "note": note,
    }


@dataclass(frozen=True, slots=True)
class HistoryCase:
    """An active certification valid until today + 30 whose history of ``stored`` entries (each
    recording a renewal to that same end) is replaced by what ``change`` makes of it; valid_until stays.

    ``change`` receives the stored entries and one fresh valid entry, and returns the new history.
    ``warns``: the database raises the renewal_history_long WARNING (the domain: history_is_long).
    """

    name: str
    rule: str | None
    change: Any = field(compare=False)
    stored: int = 2
    warns: bool = False

    @property
    def allowed(self) -> bool:
        return self.rule is None

    def __str__(self) -> str:
        return self.name


def _append(*extra: Any) -> Any:
    return lambda stored, fresh: [*stored, *extra] if extra else [*stored, fresh]


def _append_twice(stored: list[Entry], fresh: Entry) -> list[Entry]:
    return [*stored, fresh, fresh]


def _append_changed(**changes: Any) -> Any:
    return lambda stored, fresh: [*stored, {**fresh, **changes}]


def _append_without(key: str) -> Any:
    return lambda stored, fresh: [*stored, {k: v for k, v in fresh.items() if k != key}]


VERSION = "renewal_entry_schema_version"
MALFORMED = "renewal_entry_malformed"
APPEND_ONLY = "renewal_history_append_only"

# fmt: off
HISTORY_CASES: tuple[HistoryCase, ...] = (
    HistoryCase("append one entry", None, _append()),
    HistoryCase("append to an empty history", None, _append(), stored=0),
    HistoryCase("append without schema_version", VERSION, _append_without("schema_version")),
    HistoryCase("append schema_version 2", VERSION, _append_changed(schema_version=2)),
    HistoryCase("append schema_version as text", VERSION, _append_changed(schema_version="1")),
    HistoryCase("append schema_version true", VERSION, _append_changed(schema_version=True)),
    HistoryCase("append schema_version null", VERSION, _append_changed(schema_version=None)),
    HistoryCase("append two entries", "one_renewal_per_update", _append_twice),
    HistoryCase("remove the last entry", APPEND_ONLY, lambda stored, fresh: stored[:-1]),
    HistoryCase("empty the history", APPEND_ONLY, lambda stored, fresh: []),
    HistoryCase("edit an entry's note", APPEND_ONLY,
                lambda stored, fresh: [stored[0], {**stored[1], "note": "rewritten"}]),
    HistoryCase("replace an entry", APPEND_ONLY, lambda stored, fresh: [stored[0], fresh]),
    HistoryCase("edit one, append one", APPEND_ONLY,
                lambda stored, fresh: [{**stored[0], "note": "x"}, stored[1], fresh]),
    HistoryCase("edit one, append two", APPEND_ONLY,
                lambda stored, fresh: [{**stored[0], "note": "x"}, stored[1], fresh, fresh]),
    HistoryCase("append a string", MALFORMED, _append("renewed")),
    HistoryCase("append a naive renewed_at", MALFORMED,
                _append_changed(renewed_at="2026-11-29T10:00:00")),
    HistoryCase("append a renewed_at that is no time", MALFORMED,
                _append_changed(renewed_at="yesterday")),
    HistoryCase("append a renewed_by that is no uuid", MALFORMED, _append_changed(renewed_by="nobody")),
    HistoryCase("append a numeric note", MALFORMED, _append_changed(note=5)),
    HistoryCase("append a note", None, _append_changed(note="refresher course")),
    HistoryCase("append without note", None, _append_without("note")),
    HistoryCase("append without new_valid_until", MALFORMED, _append_without("new_valid_until")),
    HistoryCase("append a valid_until that is no date", MALFORMED,
                _append_changed(new_valid_until="2026-13-01")),
    HistoryCase("append a compact date", MALFORMED, _append_changed(previous_valid_until="20261229")),
    HistoryCase("append a renewed_at in Z", None, _append_changed(renewed_at="2026-11-29T10:00:00Z")),
    HistoryCase("append a braced renewed_by", MALFORMED,
                _append_changed(renewed_by="{" + str(RENEWED_BY) + "}")),
    HistoryCase("append an entry from another end", "renewal_entry_matches_validity",
                _append_changed(previous_valid_until="2020-01-01")),
    HistoryCase("append an entry to another end", "renewal_entry_matches_validity",
                _append_changed(new_valid_until="2099-01-01")),
    HistoryCase("append the 500th entry", None, _append(), stored=499),
    HistoryCase("append the 501st entry", None, _append(), stored=500, warns=True),
)
# fmt: on


def history_for(case: HistoryCase, today: date) -> tuple[date, list[Entry], list[Entry]]:
    """(valid_until, stored history, new history) of one history case."""
    end = today + timedelta(days=30)
    stored = [entry(end, end, note=f"renewal {i}") for i in range(case.stored)]
    return end, stored, list(case.change(stored, entry(end, end)))
