"""Contract v1's body: the publicly_listed rule, its JSON form, and the JSON Schema both sides hold to."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import ValidationError

from certsync.dynamics.contract import (
    CertificationState,
    CertificationUpsert,
    contract_schema,
    is_publicly_listed,
)

TODAY = date(2026, 11, 29)
EVENT_ID = UUID("6f1c2a34-0b1d-4c5e-9f00-1234567890ab")


def state(status: str = "active", valid_until: date = date(2027, 11, 1)) -> CertificationState:
    return CertificationState(
        id=UUID("11111111-2222-4333-8444-555555555555"),
        peer_mentor_id=UUID("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"),
        certification_type="peer_mentor",
        status=status,
        valid_from=date(2025, 11, 1),
        valid_until=valid_until,
        version=3,
    )


def body(**changes: Any) -> dict[str, Any]:
    upsert = CertificationUpsert.for_state(
        EVENT_ID, datetime(2026, 11, 29, 10, 0, tzinfo=UTC), state(), TODAY
    )
    return {**upsert.to_json_dict(), **changes}


def schema_errors(instance: dict[str, Any]) -> list[str]:
    validator = Draft202012Validator(contract_schema(), format_checker=FormatChecker())
    return [error.message for error in validator.iter_errors(instance)]


# --- publicly_listed -----------------------------------------------------------------------------


def test_active_and_valid_until_today_is_publicly_listed() -> None:
    assert is_publicly_listed("active", TODAY, TODAY) is True


def test_active_and_valid_until_later_is_publicly_listed() -> None:
    assert is_publicly_listed("active", TODAY + timedelta(days=1), TODAY) is True


def test_active_but_valid_until_yesterday_is_not_publicly_listed() -> None:
    assert is_publicly_listed("active", TODAY - timedelta(days=1), TODAY) is False


@pytest.mark.parametrize("status", ["expired", "suspended", "revoked"])
def test_a_certification_that_is_not_active_is_never_publicly_listed(status: str) -> None:
    assert is_publicly_listed(status, TODAY + timedelta(days=365), TODAY) is False


def test_the_upsert_derives_publicly_listed_from_the_state_and_today() -> None:
    lapsed = state("active", valid_until=TODAY - timedelta(days=1))

    upsert = CertificationUpsert.for_state(EVENT_ID, datetime.now(UTC), lapsed, TODAY)

    assert upsert.publicly_listed is False


# --- the JSON form -------------------------------------------------------------------------------


def test_the_json_body_validates_against_the_schema() -> None:
    assert schema_errors(body()) == []


def test_occurred_at_is_sent_in_utc_ending_in_z() -> None:
    oslo = timezone(timedelta(hours=1))
    upsert = CertificationUpsert.for_state(
        EVENT_ID, datetime(2026, 11, 29, 11, 0, tzinfo=oslo), state(), TODAY
    )

    occurred_at = upsert.to_json_dict()["occurred_at"]

    assert occurred_at == "2026-11-29T10:00:00Z"
    # jsonschema checks "date-time" only with an optional extra; check the format here instead.
    assert datetime.fromisoformat(occurred_at) == datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


def test_a_naive_occurred_at_cannot_be_serialised() -> None:
    upsert = CertificationUpsert.for_state(EVENT_ID, datetime(2026, 11, 29, 10, 0), state(), TODAY)

    with pytest.raises(ValueError, match="timezone-aware"):
        upsert.to_json_dict()


def test_the_model_refuses_fields_outside_the_contract() -> None:
    with pytest.raises(ValidationError):
        CertificationUpsert.model_validate({**body(), "display_name": "someone"})


def test_the_model_refuses_a_version_below_one() -> None:
    with pytest.raises(ValidationError):
        CertificationState.model_validate({**body()["certification"], "version": 0})


# --- the schema holds the portal to the same rules ------------------------------------------------


def test_the_schema_refuses_another_contract_version() -> None:
    assert schema_errors(body(contract_version=2))


def test_the_schema_refuses_personal_data_beside_the_contract_fields() -> None:
    assert schema_errors(body(display_name="someone"))


def test_the_schema_refuses_an_unknown_status() -> None:
    certification = {**body()["certification"], "status": "pending"}

    assert schema_errors(body(certification=certification))


def test_the_schema_refuses_an_event_id_that_is_not_a_uuid() -> None:
    assert schema_errors(body(event_id="not-a-uuid-but-exactly-36-characters"))


def test_the_schema_refuses_an_impossible_date() -> None:
    certification = {**body()["certification"], "valid_until": "2026-13-01"}

    assert schema_errors(body(certification=certification))


def test_the_schema_requires_publicly_listed() -> None:
    instance = body()
    del instance["publicly_listed"]

    assert schema_errors(instance)
