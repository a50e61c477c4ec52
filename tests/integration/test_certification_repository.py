"""CertificationRepository against real PostgreSQL: each operation, version bumps, concurrent renewals."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from certsync.domain import CertificationStatus, InvalidRenewalEntry, InvalidTransition
from certsync.resilience.testing import ManualClock
from certsync.store.certifications import CertificationRepository
from certsync.store.errors import NotFound
from certsync.store.pool import Pool
from tests.support.seed import rules_disabled

pytestmark = pytest.mark.integration

S = CertificationStatus
COORDINATOR = UUID("00000000-0000-4000-8000-00000000c001")
OTHER_COORDINATOR = UUID("00000000-0000-4000-8000-00000000c002")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def today(clock: ManualClock) -> date:
    return clock.now().date()


@pytest.fixture
def repository(pool: Pool, clock: ManualClock) -> CertificationRepository:
    return CertificationRepository(pool, clock=clock)


@pytest.fixture
async def peer_mentor_id(pool: Pool) -> UUID:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """
            with u as (insert into auth.users (id) values (gen_random_uuid()) returning id)
            insert into public.peer_mentors (user_id, display_name) select id, 'Mentor' from u returning id
            """
        )
        row = await cur.fetchone()
    assert row is not None
    return UUID(str(row["id"]))


@pytest.fixture
async def issued(repository: CertificationRepository, peer_mentor_id: UUID, today: date) -> UUID:
    """An active certification valid for 30 more days, at version 1."""
    cert = await repository.issue(
        peer_mentor_id=peer_mentor_id,
        valid_from=today - timedelta(days=335),
        valid_until=today + timedelta(30),
    )
    return cert.id


async def stored(pool: Pool, certification_id: UUID) -> dict[str, object]:
    async with pool.connection() as conn:
        cur = await conn.execute("select * from public.certifications where id = %s", (certification_id,))
        row = await cur.fetchone()
    assert row is not None
    return row


async def set_history_length(pool: Pool, certification_id: UUID, length: int) -> None:
    """Fill the history with ``length`` valid v1 entries, as years of renewals would have.

    Years of renewals in one statement is not a change the rules allow (one renewal per update), so
    it goes through the documented repair path, as a data migration would.
    """
    async with pool.connection() as conn, rules_disabled(conn):
        await conn.execute(
            """
            update public.certifications
            set renewal_history = (
              select coalesce(jsonb_agg(jsonb_build_object(
                'schema_version', 1, 'renewed_at', '2020-01-01T00:00:00+00:00',
                'previous_valid_until', '2020-01-01', 'new_valid_until', '2021-01-01',
                'renewed_by', %(by)s::text, 'note', null)), '[]'::jsonb)
              from generate_series(1, %(length)s)
            )
            where id = %(id)s
            """,
            {"id": certification_id, "length": length, "by": str(COORDINATOR)},
        )


# --- each operation ----------------------------------------------------------------------------


async def test_issuing_stores_an_active_certification_at_version_1(
    repository: CertificationRepository, peer_mentor_id: UUID, today: date
) -> None:
    cert = await repository.issue(
        peer_mentor_id=peer_mentor_id,
        valid_from=today,
        valid_until=today + timedelta(days=365),
        certification_type="peer_mentor_advanced",
    )
    assert (cert.status, cert.version, cert.renewal_history) == (S.ACTIVE, 1, ())
    assert cert.certification_type == "peer_mentor_advanced"
    assert await repository.get(cert.id) == cert


async def test_issuing_with_a_chosen_id_keeps_it(
    repository: CertificationRepository, peer_mentor_id: UUID, today: date
) -> None:
    chosen = uuid4()
    cert = await repository.issue(
        peer_mentor_id=peer_mentor_id, valid_from=today, valid_until=today, certification_id=chosen
    )
    assert cert.id == chosen


async def test_issuing_for_an_unknown_peer_mentor_is_not_found(
    repository: CertificationRepository, today: date
) -> None:
    with pytest.raises(NotFound, match="peer mentor"):
        await repository.issue(peer_mentor_id=uuid4(), valid_from=today, valid_until=today)


async def test_issuing_an_already_lapsed_certification_stores_nothing(
    repository: CertificationRepository, peer_mentor_id: UUID, today: date, pool: Pool
) -> None:
    with pytest.raises(InvalidTransition):
        await repository.issue(
            peer_mentor_id=peer_mentor_id, valid_from=date(2020, 1, 1), valid_until=today - timedelta(1)
        )
    async with pool.connection() as conn:
        cur = await conn.execute("select count(*) as n from public.certifications")
        assert await cur.fetchone() == {"n": 0}


async def test_suspending_an_active_certification(repository: CertificationRepository, issued: UUID) -> None:
    cert = await repository.suspend(issued)
    assert (cert.status, cert.version) == (S.SUSPENDED, 2)


async def test_reinstating_a_suspended_certification(
    repository: CertificationRepository, issued: UUID
) -> None:
    await repository.suspend(issued)
    cert = await repository.reinstate(issued)
    assert (cert.status, cert.version) == (S.ACTIVE, 3)


async def test_revoking_a_suspended_certification(repository: CertificationRepository, issued: UUID) -> None:
    await repository.suspend(issued)
    cert = await repository.revoke(issued)
    assert (cert.status, cert.version) == (S.REVOKED, 3)


async def test_expiring_once_the_validity_has_passed(
    repository: CertificationRepository, issued: UUID, clock: ManualClock
) -> None:
    clock.advance(timedelta(days=31).total_seconds())
    cert = await repository.expire(issued)
    assert (cert.status, cert.version) == (S.EXPIRED, 2)


async def test_today_is_decided_in_the_configured_zone(
    pool: Pool, peer_mentor_id: UUID, clock: ManualClock
) -> None:
    oslo = ZoneInfo("Europe/Oslo")
    repository = CertificationRepository(pool, clock=clock, zone=oslo)
    cert = await repository.issue(
        peer_mentor_id=peer_mentor_id, valid_from=date(2026, 1, 1), valid_until=date(2026, 12, 1)
    )
    clock.set(datetime(2026, 12, 1, 23, 30, tzinfo=UTC))  # still 1 December in UTC, 2 December in Oslo
    assert (await repository.expire(cert.id)).status is S.EXPIRED


async def test_a_refused_transition_changes_nothing(
    repository: CertificationRepository, issued: UUID, pool: Pool
) -> None:
    with pytest.raises(InvalidTransition, match="still valid until"):
        await repository.expire(issued)
    row = await stored(pool, issued)
    assert (row["status"], row["version"]) == ("active", 1)


async def test_a_revoked_certification_cannot_be_renewed(
    repository: CertificationRepository, issued: UUID, today: date
) -> None:
    await repository.revoke(issued)
    with pytest.raises(InvalidTransition, match="revoked is final"):
        await repository.renew(issued, new_valid_until=today + timedelta(days=400), renewed_by=COORDINATOR)


async def test_renewing_an_expired_certification_reactivates_it_and_appends_a_v1_entry(
    repository: CertificationRepository, issued: UUID, clock: ManualClock, pool: Pool
) -> None:
    clock.advance(timedelta(days=31).total_seconds())
    await repository.expire(issued)
    new_end = clock.now().date() + timedelta(days=365)
    cert = await repository.renew(issued, new_valid_until=new_end, renewed_by=COORDINATOR, note="course")
    assert (cert.status, cert.valid_until, cert.version) == (S.ACTIVE, new_end, 3)
    [entry] = cert.renewal_history
    assert (entry.renewed_by, entry.new_valid_until, entry.note) == (COORDINATOR, new_end, "course")
    assert (await stored(pool, issued))["renewal_history"] == [entry.to_json()]


async def test_renewing_a_suspended_certification_keeps_it_suspended(
    repository: CertificationRepository, issued: UUID, today: date
) -> None:
    await repository.suspend(issued)
    cert = await repository.renew(issued, new_valid_until=today + timedelta(days=400), renewed_by=COORDINATOR)
    assert cert.status is S.SUSPENDED


@pytest.mark.parametrize("operation", ["get", "suspend", "reinstate", "revoke", "expire"])
async def test_an_unknown_certification_is_not_found(
    repository: CertificationRepository, operation: str
) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        await getattr(repository, operation)(uuid4())


async def test_renewing_an_unknown_certification_is_not_found(
    repository: CertificationRepository, today: date
) -> None:
    with pytest.raises(NotFound):
        await repository.renew(uuid4(), new_valid_until=today, renewed_by=COORDINATOR)


# --- version -----------------------------------------------------------------------------------


async def test_version_grows_by_exactly_one_per_change_including_a_plain_sql_update(
    repository: CertificationRepository, issued: UUID, today: date, pool: Pool
) -> None:
    versions = [(await repository.get(issued)).version]
    versions.append((await repository.suspend(issued)).version)
    async with pool.connection() as conn:
        await conn.execute(
            "update public.certifications set certification_type = 'renamed', version = 99 where id = %s",
            (issued,),
        )
    versions.append((await repository.get(issued)).version)
    versions.append((await repository.reinstate(issued)).version)
    renewed = await repository.renew(issued, new_valid_until=today + timedelta(400), renewed_by=COORDINATOR)
    versions.append(renewed.version)
    assert versions == [1, 2, 3, 4, 5]


# --- concurrency -------------------------------------------------------------------------------


async def until_sessions_wait_on_a_lock(conn: psycopg.AsyncConnection[dict[str, object]], count: int) -> None:
    """Polls, because PostgreSQL offers no notification that a session started waiting on a lock."""
    for _ in range(1000):
        cur = await conn.execute(
            "select count(*) as n from pg_stat_activity"
            " where datname = current_database() and wait_event_type = 'Lock'"
        )
        row = await cur.fetchone()
        if row is not None and row["n"] == count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{count} sessions never waited on the row lock")


async def test_two_coordinators_renewing_at_once_both_land(
    repository: CertificationRepository, issued: UUID, today: date, database_url: str
) -> None:
    new_end = today + timedelta(days=365)
    # A third session holds the row so that both renewals are in flight, on their own connections,
    # before either can proceed: neither may overwrite the other's entry.
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as holder:
        await holder.execute("select 1 from public.certifications where id = %s for update", (issued,))
        renewals = [
            asyncio.create_task(repository.renew(issued, new_valid_until=new_end, renewed_by=who))
            for who in (COORDINATOR, OTHER_COORDINATOR)
        ]
        async with await psycopg.AsyncConnection.connect(
            database_url, autocommit=True, row_factory=dict_row
        ) as observer:
            await until_sessions_wait_on_a_lock(observer, 2)
        await holder.commit()
        await asyncio.gather(*renewals)
    cert = await repository.get(issued)
    assert sorted(str(e.renewed_by) for e in cert.renewal_history) == sorted(
        [str(COORDINATOR), str(OTHER_COORDINATOR)]
    )
    assert cert.version == 3


# --- long histories ----------------------------------------------------------------------------


async def test_a_history_passing_500_entries_logs_a_warning_with_ids_only(
    repository: CertificationRepository, issued: UUID, today: date, pool: Pool
) -> None:
    await set_history_length(pool, issued, 500)
    with capture_logs() as logs:
        cert = await repository.renew(issued, new_valid_until=today + timedelta(400), renewed_by=COORDINATOR)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert warnings == [
        {
            "event": "certification_renewal_history_long",
            "log_level": "warning",
            "certification_id": str(issued),
            "renewal_count": 501,
            "threshold": 500,
            "see": "docs/renewal-history.md",
        }
    ]
    assert len(cert.renewal_history) == 501


async def test_a_history_of_exactly_500_entries_logs_no_warning(
    repository: CertificationRepository, issued: UUID, today: date, pool: Pool
) -> None:
    await set_history_length(pool, issued, 499)
    with capture_logs() as logs:
        await repository.renew(issued, new_valid_until=today + timedelta(400), renewed_by=COORDINATOR)
    assert [e for e in logs if e["log_level"] == "warning"] == []


async def test_a_stored_entry_without_schema_version_is_refused_on_read(
    repository: CertificationRepository, issued: UUID, pool: Pool
) -> None:
    # Written before the rules existed (the database refuses it now: renewal_entry_schema_version).
    async with pool.connection() as conn, rules_disabled(conn):
        await conn.execute(
            """update public.certifications set renewal_history = '[{"renewed_at": "2020-01-01"}]'
               where id = %s""",
            (issued,),
        )
    with pytest.raises(InvalidRenewalEntry, match="has no schema_version"):
        await repository.get(issued)
