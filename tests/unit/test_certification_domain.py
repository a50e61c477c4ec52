"""The certification state machine and renewal entries, as specifications (pure: no database)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from certsync.domain import (
    Certification,
    CertificationStatus,
    DomainError,
    InvalidRenewalEntry,
    InvalidTransition,
    Operation,
    RenewalEntry,
    issue_status,
    transition,
)

S = CertificationStatus
O = Operation  # noqa: E741
TODAY = date(2026, 11, 29)
NOW = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
COORDINATOR = UUID("00000000-0000-4000-8000-00000000c001")
STILL_VALID = TODAY + timedelta(days=30)
LAPSED = TODAY - timedelta(days=1)
OSLO_WINTER = timezone(timedelta(hours=1))

# Written out independently of the domain's table, so a change to the table fails here.
ALLOWED: dict[tuple[Operation, CertificationStatus], CertificationStatus] = {
    (O.RENEW, S.ACTIVE): S.ACTIVE,
    (O.RENEW, S.EXPIRED): S.ACTIVE,
    (O.RENEW, S.SUSPENDED): S.SUSPENDED,
    (O.SUSPEND, S.ACTIVE): S.SUSPENDED,
    (O.REINSTATE, S.SUSPENDED): S.ACTIVE,
    (O.REVOKE, S.ACTIVE): S.REVOKED,
    (O.REVOKE, S.SUSPENDED): S.REVOKED,
    (O.REVOKE, S.EXPIRED): S.REVOKED,
    (O.EXPIRE, S.ACTIVE): S.EXPIRED,
}
CHANGES = [op for op in Operation if op is not O.ISSUE]
FORBIDDEN = [
    (op, status)
    for op, status in itertools.product(CHANGES, CertificationStatus)
    if (op, status) not in ALLOWED
]


def certification(status: CertificationStatus, valid_until: date = STILL_VALID) -> Certification:
    return Certification(
        id=UUID("00000000-0000-4000-8000-0000000000aa"),
        peer_mentor_id=UUID("00000000-0000-4000-8000-0000000000bb"),
        certification_type="peer_mentor",
        status=status,
        valid_from=date(2025, 11, 1),
        valid_until=valid_until,
        renewal_history=(),
        version=1,
    )


def apply(cert: Certification, operation: Operation, valid_until: date, today: date) -> Certification:
    """What the repository does, in memory: decide, then store the decision."""
    if operation is O.RENEW:
        renewal = cert.renewal(
            new_valid_until=valid_until,
            renewed_by=COORDINATOR,
            renewed_at=datetime(today.year, today.month, today.day, 12, tzinfo=UTC),
        )
        return dataclasses.replace(
            cert,
            status=renewal.status,
            valid_until=renewal.valid_until,
            renewal_history=(*cert.renewal_history, renewal.entry),
        )
    return dataclasses.replace(cert, status=cert.status_after(operation, today=today))


def guard_friendly_valid_until(operation: Operation) -> date:
    """A validity end that satisfies the operation's date guard (expire needs a lapsed one)."""
    return LAPSED if operation is O.EXPIRE else STILL_VALID


# --- the transition table ----------------------------------------------------------------------


@pytest.mark.parametrize(("operation", "from_status"), list(ALLOWED))
def test_each_allowed_transition_leads_to_its_status(
    operation: Operation, from_status: CertificationStatus
) -> None:
    valid_until = guard_friendly_valid_until(operation)
    after = apply(certification(from_status, valid_until), operation, STILL_VALID, TODAY)
    assert after.status is ALLOWED[(operation, from_status)]


@pytest.mark.parametrize(("operation", "from_status"), FORBIDDEN)
def test_each_forbidden_transition_is_refused_naming_from_and_why(
    operation: Operation, from_status: CertificationStatus
) -> None:
    cert = certification(from_status, guard_friendly_valid_until(operation))
    with pytest.raises(InvalidTransition) as refused:
        apply(cert, operation, STILL_VALID, TODAY)
    assert refused.value.from_status is from_status
    assert refused.value.operation is operation
    assert f"cannot {operation.value}: {from_status.value} →" in str(refused.value)


@pytest.mark.parametrize("operation", CHANGES)
def test_revoked_is_final_for_every_operation(operation: Operation) -> None:
    with pytest.raises(InvalidTransition, match="revoked is final"):
        apply(certification(S.REVOKED), operation, STILL_VALID, TODAY)


def test_invalid_transition_is_a_domain_error() -> None:
    assert issubclass(InvalidTransition, DomainError)


def test_suspending_an_expired_certification_says_only_active_ones_can_be() -> None:
    with pytest.raises(InvalidTransition) as refused:
        certification(S.EXPIRED).status_after(O.SUSPEND, today=TODAY)
    assert str(refused.value) == (
        "cannot suspend: expired → suspended is not allowed: suspend applies only to active certifications"
    )


# --- issue -------------------------------------------------------------------------------------


def test_issuing_a_certification_makes_it_active() -> None:
    assert issue_status(valid_from=TODAY, valid_until=STILL_VALID, today=TODAY) is S.ACTIVE


def test_issuing_a_certification_valid_through_today_is_allowed() -> None:
    assert issue_status(valid_from=LAPSED, valid_until=TODAY, today=TODAY) is S.ACTIVE


def test_issuing_an_already_lapsed_certification_is_refused() -> None:
    with pytest.raises(InvalidTransition, match=r"cannot issue: \(new\) → active .* validity ended"):
        issue_status(valid_from=date(2024, 1, 1), valid_until=LAPSED, today=TODAY)


def test_issuing_with_validity_ending_before_it_starts_is_refused() -> None:
    with pytest.raises(InvalidTransition, match="before valid_from"):
        issue_status(valid_from=STILL_VALID, valid_until=TODAY, today=TODAY)


@pytest.mark.parametrize("status", list(CertificationStatus))
def test_issuing_an_existing_certification_again_is_refused(status: CertificationStatus) -> None:
    with pytest.raises(InvalidTransition):
        transition(O.ISSUE, status, valid_until=STILL_VALID, today=TODAY)


# --- date guards -------------------------------------------------------------------------------


def test_expiring_a_certification_still_valid_today_is_refused() -> None:
    with pytest.raises(InvalidTransition, match="still valid until 2026-11-29"):
        certification(S.ACTIVE, valid_until=TODAY).status_after(O.EXPIRE, today=TODAY)


def test_expiring_a_certification_whose_validity_ended_yesterday_is_allowed() -> None:
    assert certification(S.ACTIVE, valid_until=LAPSED).status_after(O.EXPIRE, today=TODAY) is S.EXPIRED


def test_reinstating_a_suspension_that_outlived_its_validity_is_refused() -> None:
    with pytest.raises(InvalidTransition, match="validity ended on 2026-11-28; renew it instead"):
        certification(S.SUSPENDED, valid_until=LAPSED).status_after(O.REINSTATE, today=TODAY)


def test_reinstating_on_the_last_valid_day_is_allowed() -> None:
    assert certification(S.SUSPENDED, valid_until=TODAY).status_after(O.REINSTATE, today=TODAY) is S.ACTIVE


def test_a_lapsed_suspension_can_be_renewed_then_reinstated() -> None:
    renewed = apply(certification(S.SUSPENDED, valid_until=LAPSED), O.RENEW, STILL_VALID, TODAY)
    assert renewed.status is S.SUSPENDED
    assert apply(renewed, O.REINSTATE, STILL_VALID, TODAY).status is S.ACTIVE


def test_status_after_refuses_issue_and_renew_which_need_more_than_a_date() -> None:
    with pytest.raises(ValueError, match="renewal"):
        certification(S.ACTIVE).status_after(O.RENEW, today=TODAY)


# --- renewal -----------------------------------------------------------------------------------


def test_renewing_an_expired_certification_reactivates_it_and_records_the_extension() -> None:
    renewal = certification(S.EXPIRED, valid_until=LAPSED).renewal(
        new_valid_until=date(2027, 11, 29), renewed_by=COORDINATOR, renewed_at=NOW, note="refresher course"
    )
    assert renewal.status is S.ACTIVE
    assert renewal.valid_until == date(2027, 11, 29)
    assert renewal.entry == RenewalEntry(
        renewed_at=NOW,
        previous_valid_until=LAPSED,
        new_valid_until=date(2027, 11, 29),
        renewed_by=COORDINATOR,
        note="refresher course",
    )


def test_renewing_to_the_current_end_again_is_accepted_so_concurrent_renewals_both_land() -> None:
    renewal = certification(S.ACTIVE).renewal(
        new_valid_until=STILL_VALID, renewed_by=COORDINATOR, renewed_at=NOW
    )
    assert renewal.valid_until == STILL_VALID


def test_renewing_to_an_earlier_end_is_refused_because_renewal_never_shortens_validity() -> None:
    with pytest.raises(InvalidTransition, match="would shorten validity"):
        certification(S.ACTIVE).renewal(
            new_valid_until=STILL_VALID - timedelta(days=1), renewed_by=COORDINATOR, renewed_at=NOW
        )


def test_renewing_an_expired_certification_to_a_date_already_passed_is_refused() -> None:
    with pytest.raises(InvalidTransition, match="has already passed"):
        certification(S.EXPIRED, valid_until=date(2026, 1, 1)).renewal(
            new_valid_until=LAPSED, renewed_by=COORDINATOR, renewed_at=NOW
        )


def test_renewal_needs_a_timezone_aware_moment() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        certification(S.ACTIVE).renewal(
            new_valid_until=STILL_VALID, renewed_by=COORDINATOR, renewed_at=datetime(2026, 11, 29, 10)
        )


def test_renewal_today_is_the_calendar_date_of_the_moment_in_its_own_zone() -> None:
    already_tomorrow_in_oslo = datetime(2026, 11, 29, 23, 30, tzinfo=UTC).astimezone(OSLO_WINTER)
    with pytest.raises(InvalidTransition, match="2026-11-29 has already passed"):
        certification(S.EXPIRED, valid_until=date(2026, 1, 1)).renewal(
            new_valid_until=TODAY, renewed_by=COORDINATOR, renewed_at=already_tomorrow_in_oslo
        )


# --- renewal entries as JSON -------------------------------------------------------------------


ENTRY_JSON: dict[str, object] = {
    "schema_version": 1,
    "renewed_at": "2026-11-29T10:00:00+00:00",
    "previous_valid_until": "2026-11-01",
    "new_valid_until": "2027-11-01",
    "renewed_by": str(COORDINATOR),
    "note": None,
}


def test_a_renewal_entry_is_stored_as_schema_version_1_json() -> None:
    entry = RenewalEntry(
        renewed_at=NOW,
        previous_valid_until=date(2026, 11, 1),
        new_valid_until=date(2027, 11, 1),
        renewed_by=COORDINATOR,
    )
    assert entry.to_json() == ENTRY_JSON


def test_a_renewal_entry_stores_its_moment_in_utc() -> None:
    entry = RenewalEntry(
        renewed_at=NOW.astimezone(OSLO_WINTER),
        previous_valid_until=date(2026, 11, 1),
        new_valid_until=date(2027, 11, 1),
        renewed_by=COORDINATOR,
    )
    assert entry.to_json()["renewed_at"] == "2026-11-29T10:00:00+00:00"


@given(
    renewed_at=st.datetimes(timezones=st.just(UTC)),
    previous=st.dates(),
    new=st.dates(),
    renewed_by=st.uuids(),
    note=st.none() | st.text(),
)
def test_renewal_entries_round_trip_through_json(
    renewed_at: datetime, previous: date, new: date, renewed_by: UUID, note: str | None
) -> None:
    entry = RenewalEntry(
        renewed_at=renewed_at,
        previous_valid_until=previous,
        new_valid_until=new,
        renewed_by=renewed_by,
        note=note,
    )
    assert RenewalEntry.from_json(entry.to_json()) == entry


def test_an_entry_without_schema_version_is_refused_by_name() -> None:
    data = {k: v for k, v in ENTRY_JSON.items() if k != "schema_version"}
    with pytest.raises(InvalidRenewalEntry, match="has no schema_version"):
        RenewalEntry.from_json(data)


def test_an_entry_of_an_unknown_schema_version_is_refused() -> None:
    with pytest.raises(InvalidRenewalEntry, match="schema_version 2 is not supported"):
        RenewalEntry.from_json({**ENTRY_JSON, "schema_version": 2})


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("renewed_by", None, "'renewed_by' is missing or not text"),
        ("renewed_by", "mentor-coordinator", "malformed"),
        ("new_valid_until", "next year", "malformed"),
        ("note", 7, "note must be text or null"),
    ],
)
def test_a_malformed_entry_is_refused_naming_the_problem(field: str, value: object, problem: str) -> None:
    with pytest.raises(InvalidRenewalEntry, match=problem):
        RenewalEntry.from_json({**ENTRY_JSON, field: value})


def test_a_stored_entry_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRenewalEntry, match="must be a JSON object, got list"):
        RenewalEntry.from_json([ENTRY_JSON])  # type: ignore[arg-type]


def test_a_renewal_entry_refuses_a_naive_moment() -> None:
    with pytest.raises(InvalidRenewalEntry, match="timezone-aware"):
        RenewalEntry.from_json({**ENTRY_JSON, "renewed_at": "2026-11-29T10:00:00"})


# --- properties over random histories ------------------------------------------------------------


steps = st.lists(
    st.tuples(st.sampled_from(CHANGES), st.integers(min_value=-400, max_value=400), st.integers(0, 60)),
    max_size=30,
)


Step = tuple[Operation, int, int]  # operation, requested validity end from today (days), days passing


def replay(steps: list[Step]) -> Iterator[tuple[Certification, Operation, Certification | None]]:
    """Runs the steps from an active certification: each before, operation and after (None: refused)."""
    cert = certification(S.ACTIVE)
    today = TODAY
    for operation, offset_days, days_passing in steps:
        today += timedelta(days=days_passing)
        try:
            after = apply(cert, operation, today + timedelta(days=offset_days), today)
        except InvalidTransition:
            yield cert, operation, None
            continue
        yield cert, operation, after
        cert = after


@given(steps=steps)
def test_no_sequence_of_operations_leaves_a_revoked_certification(steps: list[Step]) -> None:
    for before, _, after in replay(steps):
        if before.status is S.REVOKED:
            assert after is None


@given(steps=steps)
def test_validity_never_shrinks_and_each_renewal_adds_one_entry(steps: list[Step]) -> None:
    for before, operation, after in replay(steps):
        if after is not None:
            assert after.valid_until >= before.valid_until
            added = 1 if operation is O.RENEW else 0
            assert len(after.renewal_history) == len(before.renewal_history) + added
