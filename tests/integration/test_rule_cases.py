"""The shared rule cases (tests/support/rule_cases.py) through the database: each one an UPDATE by a
coordinator, as PostgREST runs it. A refusal is SQLSTATE 23514 naming the rule, and leaves nothing
behind (no change, no outbox event); the same cases run through the domain in tests/unit/test_rule_cases.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from certsync.domain import TRANSITIONS
from tests.support.databases import create_database, drop_database, unique_name
from tests.support.rls import Hierarchy, TwoOrganisations, as_user, build_two_organisations
from tests.support.rule_cases import CHANGE_CASES, HISTORY_CASES, ChangeCase, HistoryCase, entry, history_for

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]


# One database for the module: each case works on a certification of its own, so they cannot meet,
# and ~70 cases do not pay for ~70 database clones.
@pytest.fixture(scope="module", name="rules_database_url")
def rules_database_url_fixture(pg_admin_url: str, template_database: str) -> Iterator[str]:
    name = unique_name("certsync_rules")
    url = create_database(pg_admin_url, name, template=template_database)
    yield url
    drop_database(pg_admin_url, name)


@pytest.fixture(scope="module", name="superuser")
def superuser_fixture(rules_database_url: str) -> Iterator[Conn]:
    with psycopg.connect(rules_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module", name="api")
def api_fixture(rules_database_url: str) -> Iterator[Conn]:
    with psycopg.connect(rules_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module", name="world")
def world_fixture(superuser: Conn) -> TwoOrganisations:
    return build_two_organisations(Hierarchy(superuser))


@pytest.fixture(scope="module", name="today")
def today_fixture(superuser: Conn) -> date:
    row = superuser.execute("select private.association_today()").fetchone()
    assert row is not None
    value: date = row[0]
    return value


@pytest.fixture(name="warnings")
def warnings_fixture(api: Conn) -> Iterator[list[str]]:
    """The WARNING messages the server sends on the coordinator's connection."""
    received: list[str] = []

    def keep(diagnostic: psycopg.errors.Diagnostic) -> None:
        if diagnostic.severity_nonlocalized == "WARNING" and diagnostic.message_primary:
            received.append(diagnostic.message_primary)

    api.add_notice_handler(keep)
    yield received
    api.remove_notice_handler(keep)


def certification(
    superuser: Conn, world: TwoOrganisations, status: str, valid_until: date, history: list[dict[str, Any]]
) -> UUID:
    """A certification of a mentor coordinator_a1 coordinates, inserted as it stands (INSERT is free)."""
    row = superuser.execute(
        "insert into public.certifications (peer_mentor_id, status, valid_from, valid_until, renewal_history)"
        " values (%s, %s, %s, %s, %s) returning id",
        (
            world.mentor_a1.peer_mentor_id,
            status,
            valid_until - timedelta(days=400),
            valid_until,
            Jsonb(history),
        ),
    ).fetchone()
    assert row is not None
    certification_id: UUID = row[0]
    return certification_id


def snapshot(superuser: Conn, certification_id: UUID) -> tuple[Any, ...]:
    row = superuser.execute(
        "select c.status, c.valid_until, c.renewal_history, c.version,"
        " (select count(*) from public.certification_sync_events e where e.certification_id = c.id)"
        " from public.certifications c where c.id = %s",
        (certification_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def update_as_coordinator(
    api: Conn, world: TwoOrganisations, certification_id: UUID, status: str, valid_until: date, history: Any
) -> str | None:
    """One request; the refusing rule (checked to be a 23514 that names it), or None when it landed."""
    refused: errors.CheckViolation | None = None
    try:
        with as_user(api, world.coordinator_a1) as c:
            updated = c.execute(
                "update public.certifications set status = %s, valid_until = %s, renewal_history = %s"
                " where id = %s returning id",
                (status, valid_until, Jsonb(history), certification_id),
            ).fetchall()
    except errors.CheckViolation as exc:
        refused = exc
    if refused is None:
        assert updated == [(certification_id,)]
        return None
    rule = refused.diag.constraint_name
    assert (refused.sqlstate, (refused.diag.message_primary or "").startswith(f"{rule}: ")) == ("23514", True)
    return rule


@pytest.mark.parametrize("case", CHANGE_CASES, ids=str)
def test_each_change_case_as_a_coordinator(
    case: ChangeCase, api: Conn, superuser: Conn, world: TwoOrganisations, today: date
) -> None:
    valid_until = today + timedelta(days=case.valid_until)
    new_valid_until = today + timedelta(days=case.new_valid_until)
    stored = [entry(valid_until - timedelta(days=365), valid_until)]
    history = [*stored, entry(valid_until, new_valid_until)] if case.renew_to is not None else stored
    cert = certification(superuser, world, case.from_status, valid_until, stored)
    before = snapshot(superuser, cert)

    rule = update_as_coordinator(api, world, cert, case.to_status, new_valid_until, history)

    after = snapshot(superuser, cert)
    assert rule == case.rule
    if case.allowed:
        assert after[:3] == (case.to_status, new_valid_until, history)
        assert (after[3], after[4]) == (before[3] + 1, before[4] + 1)  # version bumped, change captured
    else:
        assert after == before


@pytest.mark.parametrize("case", HISTORY_CASES, ids=str)
def test_each_history_case_as_a_coordinator(
    case: HistoryCase,
    api: Conn,
    superuser: Conn,
    world: TwoOrganisations,
    today: date,
    warnings: list[str],
) -> None:
    end, stored, changed = history_for(case, today)
    cert = certification(superuser, world, "active", end, stored)
    before = snapshot(superuser, cert)

    rule = update_as_coordinator(api, world, cert, "active", end, changed)

    assert rule == case.rule
    after = snapshot(superuser, cert)
    assert after[2] == (changed if case.allowed else stored)
    assert after[4] == before[4] + (1 if case.allowed else 0)
    long = [w for w in warnings if w.startswith("renewal_history_long: ")]
    assert long == (
        [
            f"renewal_history_long: certification {cert} has 501 renewal entries"
            " (threshold 500): see docs/renewal-history.md"
        ]
        if case.warns
        else []
    )


def test_the_database_transition_table_is_the_domains(superuser: Conn) -> None:
    stored = set(superuser.execute("select * from private.certification_transitions()").fetchall())
    domain = {
        (op.value, start.value, rule.to.value, rule.guard.__name__.removeprefix("_") if rule.guard else None)
        for (op, start), rule in TRANSITIONS.items()
        if start is not None
    }
    assert stored == domain
