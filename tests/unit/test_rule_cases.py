"""The shared rule cases (tests/support/rule_cases.py) through the Python domain; the same cases run
through the database trigger in tests/integration/test_rule_cases.py."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from certsync.domain import (
    CHANGE_OPERATION,
    TRANSITIONS,
    Certification,
    CertificationStatus,
    DomainError,
    RenewalEntry,
    appended_renewal,
    check_change,
    history_is_long,
)
from tests.support.rule_cases import (
    CHANGE_CASES,
    HISTORY_CASES,
    RENEWED_BY,
    ChangeCase,
    HistoryCase,
    entry,
    history_for,
)

S = CertificationStatus
TODAY = date(2026, 11, 29)


def verdict(
    status: str,
    new_status: str,
    valid_until: date,
    new_valid_until: date,
    history: list[dict[str, object]],
    new_history: list[dict[str, object]],
) -> str | None:
    """What the trigger does, in the domain's terms: the refusing rule, or None."""
    try:
        renewal = appended_renewal(
            history, new_history, valid_until=valid_until, new_valid_until=new_valid_until
        )
        check_change(
            S(status),
            S(new_status),
            valid_until=valid_until,
            new_valid_until=new_valid_until,
            renewed=renewal is not None,
            today=TODAY,
        )
    except DomainError as exc:
        return exc.rule
    return None


@pytest.mark.parametrize("case", CHANGE_CASES, ids=str)
def test_each_change_case_through_the_domain(case: ChangeCase) -> None:
    valid_until = TODAY + timedelta(days=case.valid_until)
    new_valid_until = TODAY + timedelta(days=case.new_valid_until)
    appended = [entry(valid_until, new_valid_until)] if case.renew_to is not None else []
    assert verdict(case.from_status, case.to_status, valid_until, new_valid_until, [], appended) == case.rule


@pytest.mark.parametrize("case", HISTORY_CASES, ids=str)
def test_each_history_case_through_the_domain(case: HistoryCase) -> None:
    end, stored, changed = history_for(case, TODAY)
    assert verdict("active", "active", end, end, stored, changed) == case.rule
    if case.allowed:
        assert history_is_long(len(changed)) is case.warns


@pytest.mark.parametrize(
    "case", [c for c in CHANGE_CASES if c.renew_to is not None and c.move_to is None], ids=str
)
def test_a_renewal_case_decides_as_certification_renewal_does(case: ChangeCase) -> None:
    """check_change and the repository's own path (Certification.renewal) agree on every renewal case."""
    valid_until = TODAY + timedelta(days=case.valid_until)
    assert case.renew_to is not None
    cert = Certification(
        id=RENEWED_BY,
        peer_mentor_id=RENEWED_BY,
        certification_type="peer_mentor",
        status=S(case.from_status),
        valid_from=date(2020, 1, 1),
        valid_until=valid_until,
        renewal_history=(),
        version=1,
    )
    try:
        renewal = cert.renewal(
            new_valid_until=TODAY + timedelta(days=case.renew_to),
            renewed_by=RENEWED_BY,
            renewed_at=datetime(2026, 11, 29, 12, tzinfo=UTC),
        )
    except DomainError as exc:
        refused: str | None = exc.rule
    else:
        # The repository stores the status the domain decided; a case asking for another is refused.
        refused = None if renewal.status.value == case.to_status else "renewal_status"
        assert RenewalEntry.from_json(renewal.entry.to_json()) == renewal.entry
    assert refused == case.rule


def test_every_status_change_names_exactly_one_operation_of_the_table() -> None:
    """CHANGE_OPERATION reads a new status as the one non-renewal operation that leads to it."""
    targets = {(op, rule.to) for (op, _), rule in TRANSITIONS.items() if op.value not in ("issue", "renew")}
    assert {(op, status) for status, op in CHANGE_OPERATION.items()} == targets
    assert set(CHANGE_OPERATION) == set(CertificationStatus)


def test_the_cases_cover_every_status_pair() -> None:
    pairs = {(c.from_status, c.to_status) for c in CHANGE_CASES if c.renew_to is None and c.move_to is None}
    assert pairs == {(a.value, b.value) for a in CertificationStatus for b in CertificationStatus}
