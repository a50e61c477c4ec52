"""Erasing a person: the Supabase dashboard's "Delete user" is ``delete from auth.users where id = …``.

It takes the person's personal data with it (their ``peer_mentors`` row and display name, their chapter
memberships) and their certifications, and nothing in the schema may refuse it. The outbox and the retry
queue keep their rows (they hold ids and certification states, no name or email; the delete itself is
not yet captured for the portal, see docs/security.md, "Erasure"), and delivery and replay keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from certsync.app import open_runtime
from certsync.sandbox.server import SandboxServer
from tests.support.databases import unique_name
from tests.support.rls import Hierarchy, Mentor, ids, rows
from tests.support.runtime import FAST, settings_for

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]

NAME = "Kari Erasedottir"
EMAIL = "kari.erasedottir@example.org"


@dataclass(frozen=True, slots=True)
class Scene:
    coordinator: UUID
    erased: Mentor
    erased_certifications: set[UUID]
    kept: Mentor
    kept_certification: UUID
    queue_entry: int


@pytest.fixture
def scene(superuser: Conn, hierarchy: Hierarchy) -> Scene:
    """A coordinator of chapters A and B; a mentor (name, email) in both with two certifications, one
    changed since and one whose delivery failed into the retry queue; another mentor in A."""
    organisation = hierarchy.organisation()
    a, b = hierarchy.chapter(organisation, "A"), hierarchy.chapter(organisation, "B")
    coordinator = hierarchy.coordinator(a, b)
    user = hierarchy.user()
    superuser.execute("update auth.users set email = %s where id = %s", (EMAIL, user))
    for chapter in (a, b):
        hierarchy.membership(user, chapter, "peer_mentor")
    erased = Mentor(user, hierarchy.peer_mentor(user, NAME))
    first, second = (
        hierarchy.certification(erased.peer_mentor_id),
        hierarchy.certification(erased.peer_mentor_id),
    )
    superuser.execute("update public.certifications set status = 'suspended' where id = %s", (first,))
    [(entry,)] = rows(
        superuser,
        """
        insert into public.dynamics_sync_retry_queue
          (operation_type, certification_id, event_id, payload_json, failure_reason, attempt_count)
        select e.operation_type, e.certification_id, e.id,
               jsonb_build_object('contract_version', 1, 'event_id', e.id, 'certification', e.state),
               'retries exhausted: HTTP 503', 4
        from public.certification_sync_events e where e.certification_id = %s
        returning id
        """,
        (second,),
    )
    kept = hierarchy.mentor(a)
    return Scene(
        coordinator, erased, {first, second}, kept, hierarchy.certification(kept.peer_mentor_id), entry
    )


def delete_user_as_postgres(conn: Conn, user_id: UUID) -> None:
    """The dashboard's SQL editor, or any superuser session."""
    conn.execute("delete from auth.users where id = %s", (user_id,))


def delete_user_as_auth_admin(conn: Conn, user_id: UUID) -> None:
    """GoTrue's admin API (the dashboard's "Delete user", service-role key): its own role, which may delete
    from auth.users and holds no privilege on public; the cascades run as the tables' owner."""
    role = sql.Identifier(unique_name("auth_admin"))
    with conn.transaction():
        conn.execute(sql.SQL("create role {} nologin").format(role))
        conn.execute(sql.SQL("grant usage on schema auth to {}").format(role))
        conn.execute(sql.SQL("grant select, delete on auth.users to {}").format(role))
        conn.execute(sql.SQL("set local role {}").format(role))
        conn.execute("delete from auth.users where id = %s", (user_id,))
        conn.execute("reset role")
        conn.execute(sql.SQL("drop owned by {}").format(role))
        conn.execute(sql.SQL("drop role {}").format(role))


DELETERS = [delete_user_as_postgres, delete_user_as_auth_admin]


@pytest.mark.parametrize("delete_user", DELETERS, ids=["postgres", "auth admin"])
def test_deleting_a_mentors_user_erases_their_person_memberships_and_certifications(
    superuser: Conn, scene: Scene, delete_user: Callable[[Conn, UUID], None]
) -> None:
    delete_user(superuser, scene.erased.user_id)

    assert ids(superuser, "select id from auth.users where id = %s", (scene.erased.user_id,)) == set()
    assert (
        ids(superuser, "select id from public.peer_mentors where user_id = %s", (scene.erased.user_id,))
        == set()
    )
    assert (
        rows(
            superuser, "select 1 from public.chapter_memberships where user_id = %s", (scene.erased.user_id,)
        )
        == []
    )
    assert ids(superuser, "select id from public.certifications") == {scene.kept_certification}
    # Everyone else is untouched: the coordinator's memberships, the other mentor and theirs.
    assert (
        len(
            rows(
                superuser, "select 1 from public.chapter_memberships where user_id = %s", (scene.coordinator,)
            )
        )
        == 2
    )
    assert ids(superuser, "select id from public.peer_mentors") == {scene.kept.peer_mentor_id}


@pytest.mark.parametrize("delete_user", DELETERS, ids=["postgres", "auth admin"])
def test_erasure_leaves_outbox_and_queue_rows_without_the_persons_name_or_email(
    superuser: Conn, scene: Scene, delete_user: Callable[[Conn, UUID], None]
) -> None:
    events_before = rows(superuser, "select id from public.certification_sync_events order by id")

    delete_user(superuser, scene.erased.user_id)

    # The outbox keeps its rows, and the erasure itself is captured: one delete event per erased
    # certification, so the portal unlists them. The queue entry still names the event it came from.
    after = rows(superuser, "select id from public.certification_sync_events order by id")
    assert set(events_before) < set(after)
    deletes = rows(
        superuser,
        "select certification_id from public.certification_sync_events"
        " where operation_type = 'certification.deleted'",
    )
    assert sorted(c for (c,) in deletes) == sorted(scene.erased_certifications)
    assert len(after) == len(events_before) + len(scene.erased_certifications)
    [(event_id, certification_id)] = rows(
        superuser,
        "select event_id, certification_id from public.dynamics_sync_retry_queue where id = %s",
        (scene.queue_entry,),
    )
    assert event_id is not None
    assert certification_id in scene.erased_certifications
    leftovers = rows(
        superuser,
        """
        select t::text from public.certification_sync_events t
        where t::text ilike any (%(personal)s)
        union all
        select t::text from public.dynamics_sync_retry_queue t
        where t::text ilike any (%(personal)s)
        """,
        {"personal": [f"%{NAME}%", f"%{EMAIL}%", "%Erasedottir%", f"%{scene.erased.peer_mentor_id}%"]},
    )
    # Not even the pseudonymous peer mentor id: what is left about them is certification ids and versions.
    assert leftovers == []


async def test_erasing_a_listed_mentor_unlists_them_and_a_replay_of_their_entry_deletes(
    database_url: str, superuser: Conn, scene: Scene, sandbox: SandboxServer
) -> None:
    settings = settings_for(database_url, sandbox, breaker_failure_threshold=50)
    async with open_runtime(settings) as runtime:
        await runtime.worker(FAST, listen=False).run(once=True)
    listed_before = sandbox.sandbox.snapshot()
    assert str(scene.erased.peer_mentor_id) in listed_before["public_listing"]

    delete_user_as_postgres(superuser, scene.erased.user_id)

    async with open_runtime(settings) as runtime:
        stats = await runtime.worker(FAST, listen=False).run(once=True)
        result = await runtime.replay_service().replay(scene.queue_entry, by="ops")
        entry = await runtime.queue.get(scene.queue_entry)
        depth = rows(
            superuser,
            "select count(*) from public.certification_sync_events where status in ('waiting', 'in_flight')",
        )

    after = sandbox.sandbox.snapshot()
    assert depth == [(0,)]
    assert stats.delivered == len(scene.erased_certifications)
    assert sorted(after["deleted"]) == sorted(str(c) for c in scene.erased_certifications)
    assert set(after["certifications"]) == set(listed_before["certifications"]) - set(after["deleted"])
    assert str(scene.erased.peer_mentor_id) not in after["public_listing"]
    # The entry's certification is gone: the replay is a DELETE (404 at the portal: done), and what
    # the entry keeps of it is ids, not the person.
    assert (result.status, entry.status) == ("replayed", "replayed")
    assert entry.payload_json["operation"] == "delete"
    assert str(scene.erased.peer_mentor_id) not in str(entry.payload_json)
