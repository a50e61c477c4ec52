"""Listing truth, delivery side: deletes reach the portal as DELETE, and with
``CERTSYNC_DYNAMICS_ORGANISATION_ID`` only that organisation's mentors reach its portal — a mentor who
loses the last membership there is unlisted, one who gains one is delivered, and nobody else's
certification is ever sent. Real PostgreSQL, the sandbox over loopback, the worker as it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
import pytest
import structlog

from certsync.app import open_runtime
from certsync.sandbox import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from certsync.worker import WorkerStats
from tests.support.rls import Hierarchy, Mentor, rows
from tests.support.runtime import FAST, settings_for

Conn = psycopg.Connection[Any]

pytestmark = pytest.mark.integration


async def drain(database_url: str, sandbox: SandboxServer, **overrides: Any) -> WorkerStats:
    async with open_runtime(settings_for(database_url, sandbox, **overrides)) as runtime:
        return await runtime.worker(FAST, listen=False).run(once=True)


def requests_for(sandbox: SandboxServer, certification_id: UUID) -> list[tuple[str, int | None]]:
    return [
        (r.method, r.status) for r in sandbox.sandbox.requests() if r.path.endswith(f"/{certification_id}")
    ]


def held(sandbox: SandboxServer) -> set[str]:
    return set(sandbox.sandbox.snapshot()["certifications"])


async def test_a_deleted_certification_is_deleted_at_the_portal(
    database_url: str, superuser: Conn, hierarchy: Hierarchy, sandbox: SandboxServer
) -> None:
    chapter = hierarchy.chapter(hierarchy.organisation())
    mentor = hierarchy.mentor(chapter)
    gone, kept = (
        hierarchy.certification(mentor.peer_mentor_id),
        hierarchy.certification(mentor.peer_mentor_id),
    )
    await drain(database_url, sandbox)
    assert held(sandbox) == {str(gone), str(kept)}

    superuser.execute("delete from public.certifications where id = %s", (gone,))
    stats = await drain(database_url, sandbox)

    assert stats.delivered == 1
    assert held(sandbox) == {str(kept)}
    assert requests_for(sandbox, gone) == [("PUT", 200), ("DELETE", 204)]
    [(state,)] = rows(
        superuser,
        "select state from public.certification_sync_events"
        " where certification_id = %s and operation_type = 'certification.deleted'",
        (gone,),
    )
    assert state == {"id": str(gone), "version": 1, "deleted": True}


async def test_a_delete_waits_out_an_outage_like_any_change(
    database_url: str, superuser: Conn, hierarchy: Hierarchy, sandbox: SandboxServer
) -> None:
    """Same retry policy, breaker and queue as an upsert: 503s run the retries out → pending; the
    replay (the certification still gone) is a DELETE again, and succeeds."""
    mentor = hierarchy.mentor(hierarchy.chapter(hierarchy.organisation()))
    certification = hierarchy.certification(mentor.peer_mentor_id)
    await drain(database_url, sandbox)
    superuser.execute("delete from public.certifications where id = %s", (certification,))
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=503, times=4),)))

    stats = await drain(database_url, sandbox, breaker_failure_threshold=50)
    async with open_runtime(settings_for(database_url, sandbox)) as runtime:
        [listed] = await runtime.queue.list_entries()
        entry = await runtime.queue.get(listed.id)
        result = await runtime.replay_service().replay(entry.id, by="ops")

    assert stats.queued_pending == 1
    assert (entry.operation_type, entry.status, entry.attempt_count) == (
        "certification.deleted",
        "pending",
        4,
    )
    assert entry.payload_json["operation"] == "delete"
    assert result.status == "replayed"
    assert requests_for(sandbox, certification)[-1] == ("DELETE", 204)
    assert held(sandbox) == set()


@dataclass(frozen=True)
class TwoOrganisations:
    hlf: UUID
    hlf_chapter: UUID
    other_chapter: UUID
    only_hlf: Mentor
    only_other: Mentor
    both: Mentor
    certifications: dict[str, UUID]


@pytest.fixture
def scoped(hierarchy: Hierarchy) -> TwoOrganisations:
    hlf, other = hierarchy.organisation("HLF"), hierarchy.organisation("other")
    hlf_chapter, other_chapter = hierarchy.chapter(hlf), hierarchy.chapter(other)
    only_hlf, only_other = hierarchy.mentor(hlf_chapter), hierarchy.mentor(other_chapter)
    both = hierarchy.mentor(hlf_chapter, other_chapter)
    certifications = {
        name: hierarchy.certification(mentor.peer_mentor_id)
        for name, mentor in (("only_hlf", only_hlf), ("only_other", only_other), ("both", both))
    }
    return TwoOrganisations(hlf, hlf_chapter, other_chapter, only_hlf, only_other, both, certifications)


async def test_only_the_organisations_mentors_reach_its_portal(
    database_url: str, scoped: TwoOrganisations, sandbox: SandboxServer
) -> None:
    stats = await drain(database_url, sandbox, dynamics_organisation_id=scoped.hlf)

    c = scoped.certifications
    assert held(sandbox) == {str(c["only_hlf"]), str(c["both"])}
    # Not even a DELETE: the portal never hears of another organisation's mentor.
    assert requests_for(sandbox, c["only_other"]) == []
    assert (stats.delivered, stats.out_of_scope) == (2, 1)
    listed = set(sandbox.sandbox.public_listing())
    assert listed == {str(scoped.only_hlf.peer_mentor_id), str(scoped.both.peer_mentor_id)}


async def test_unset_scope_sends_every_organisation_and_warns(
    database_url: str, scoped: TwoOrganisations, sandbox: SandboxServer
) -> None:
    with structlog.testing.capture_logs() as logs:
        stats = await drain(database_url, sandbox)

    assert [e["event"] for e in logs if e["log_level"] == "warning"].count("organisation_scope_unset") == 1

    assert held(sandbox) == {str(c) for c in scoped.certifications.values()}
    assert stats.out_of_scope == 0


async def test_losing_the_last_membership_unlists_and_gaining_one_delivers(
    database_url: str, superuser: Conn, hierarchy: Hierarchy, scoped: TwoOrganisations, sandbox: SandboxServer
) -> None:
    await drain(database_url, sandbox, dynamics_organisation_id=scoped.hlf)
    c = scoped.certifications

    # "both" leaves HLF's chapter but stays in the other organisation; "only_other" joins HLF.
    hierarchy.remove_membership(scoped.both.user_id, scoped.hlf_chapter, "peer_mentor")
    hierarchy.membership(scoped.only_other.user_id, scoped.hlf_chapter, "peer_mentor")
    stats = await drain(database_url, sandbox, dynamics_organisation_id=scoped.hlf)

    assert held(sandbox) == {str(c["only_hlf"]), str(c["only_other"])}
    assert requests_for(sandbox, c["both"])[-1] == ("DELETE", 204)
    assert requests_for(sandbox, c["only_other"]) == [("PUT", 200)]
    assert stats.delivered == 2
    assert str(scoped.both.peer_mentor_id) not in sandbox.sandbox.public_listing()
    # A coordinator's membership changes nothing a portal lists: no event at all.
    before = rows(superuser, "select count(*) from public.certification_sync_events")
    hierarchy.membership(scoped.both.user_id, scoped.hlf_chapter, "coordinator")
    assert rows(superuser, "select count(*) from public.certification_sync_events") == before


async def test_a_moved_chapter_moves_its_mentors_between_portals(
    database_url: str, superuser: Conn, scoped: TwoOrganisations, sandbox: SandboxServer
) -> None:
    await drain(database_url, sandbox, dynamics_organisation_id=scoped.hlf)

    superuser.execute(
        "update public.chapters set organisation_id = (select organisation_id from public.chapters"
        " where id = %s) where id = %s",
        (scoped.other_chapter, scoped.hlf_chapter),
    )
    await drain(database_url, sandbox, dynamics_organisation_id=scoped.hlf)

    assert held(sandbox) == set()


async def test_a_membership_change_and_an_update_in_one_transaction_send_the_newest_once(
    database_url: str, superuser: Conn, hierarchy: Hierarchy, scoped: TwoOrganisations, sandbox: SandboxServer
) -> None:
    """Events of one certification with the same version (a membership change keeps it) are claimed
    once: the newest by version, then by capture order; the rest are superseded."""
    certification = scoped.certifications["only_other"]
    with superuser.transaction():
        superuser.execute(
            "update public.certifications set status = 'suspended' where id = %s", (certification,)
        )
        hierarchy.membership(scoped.only_other.user_id, scoped.hlf_chapter, "peer_mentor")
        superuser.execute(
            "update public.certifications set status = 'active' where id = %s", (certification,)
        )

    stats = await drain(database_url, sandbox, dynamics_organisation_id=scoped.hlf)

    assert requests_for(sandbox, certification) == [("PUT", 200)]
    body = sandbox.sandbox.snapshot()["certifications"][str(certification)]
    assert (body["certification"]["version"], body["certification"]["status"]) == (3, "active")
    assert stats.crashed == 0


async def test_a_replay_of_an_entry_whose_mentor_left_the_organisation_deletes(
    database_url: str, superuser: Conn, hierarchy: Hierarchy, scoped: TwoOrganisations, sandbox: SandboxServer
) -> None:
    certification = scoped.certifications["both"]
    await drain(database_url, sandbox, dynamics_organisation_id=scoped.hlf)
    [(entry_id,)] = rows(
        superuser,
        "insert into public.dynamics_sync_retry_queue (operation_type, certification_id, payload_json,"
        " failure_reason) values ('certification.updated', %s, '{}', 'HTTP 503') returning id",
        (certification,),
    )
    # The DELETE for the membership change fails; only the replay can unlist now.
    sandbox.sandbox.load_faults(FaultScript(steps=(FaultStep(status=400, times=1),)))
    hierarchy.remove_membership(scoped.both.user_id, scoped.hlf_chapter, "peer_mentor")
    await drain(database_url, sandbox, dynamics_organisation_id=scoped.hlf)
    assert str(certification) in held(sandbox)

    async with open_runtime(
        settings_for(database_url, sandbox, dynamics_organisation_id=scoped.hlf)
    ) as runtime:
        result = await runtime.replay_service().replay(entry_id, by="ops")

    assert result.status == "replayed"
    assert requests_for(sandbox, certification)[-1] == ("DELETE", 204)
    assert str(certification) not in held(sandbox)
