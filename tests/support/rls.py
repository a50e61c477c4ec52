"""Row-level security test support: act as an API role exactly as PostgREST does, and build hierarchies.

PostgREST opens one transaction per request, then ``set local role <role>`` and
``select set_config('request.jwt.claims', '<json>', true)``; ``auth.uid()`` reads ``sub`` from those
claims. :func:`acting_as` does the same on a sync psycopg connection. :class:`Hierarchy` inserts
organisations, chapters, users, memberships, peer mentors and certifications as the superuser (which
bypasses RLS), returning their ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

ApiRole = Literal["anon", "authenticated", "service_role"]
MembershipRole = Literal["coordinator", "peer_mentor"]

# The schemas PostgREST serves (Supabase's default "Exposed schemas": public, graphql_public).
EXPOSED_SCHEMAS = ["public", "graphql_public"]

# Every table the RLS tests build rows in, children first, so one TRUNCATE empties a database.
HIERARCHY_TABLES = (
    "public.certifications",
    "public.peer_mentors",
    "public.chapter_memberships",
    "public.chapters",
    "public.organisations",
    "auth.users",
)


def claims_for(user_id: UUID | None, role: ApiRole = "authenticated") -> dict[str, Any]:
    """The JWT claims Supabase issues: ``role`` always, ``sub`` for a signed-in user."""
    claims: dict[str, Any] = {"role": role}
    if user_id is not None:
        claims["sub"] = str(user_id)
    return claims


@contextmanager
def acting_as(
    conn: psycopg.Connection[Any],
    role: ApiRole,
    claims: Mapping[str, Any] | None = None,
    *,
    read_only: bool = False,
) -> Iterator[psycopg.Connection[Any]]:
    """One request's transaction as ``role`` with ``claims``; committed on exit, rolled back on error.

    ``read_only=True`` is how PostgREST runs GET and HEAD requests.
    """
    with conn.transaction():
        if read_only:
            conn.execute("set transaction read only")
        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
        conn.execute(
            "select set_config('request.jwt.claims', %s, true)",
            (json.dumps(dict(claims) if claims is not None else {"role": role}),),
        )
        yield conn


@contextmanager
def as_user(
    conn: psycopg.Connection[Any], user_id: UUID, *, read_only: bool = False
) -> Iterator[psycopg.Connection[Any]]:
    """A signed-in user's request (role ``authenticated``, ``sub`` = ``user_id``)."""
    with acting_as(conn, "authenticated", claims_for(user_id), read_only=read_only) as c:
        yield c


def rows(
    conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] | dict[str, Any] = ()
) -> list[tuple[Any, ...]]:
    return conn.execute(query, params).fetchall()


def ids(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> set[UUID]:
    """The first column of every row ``query`` returns, as a set."""
    return {row[0] for row in conn.execute(query, params).fetchall()}


def visible_certification_ids(conn: psycopg.Connection[Any]) -> set[UUID]:
    return ids(conn, "select id from public.certifications")


def touch_certifications(
    conn: psycopg.Connection[Any], certification_ids: set[UUID] | None = None
) -> set[UUID]:
    """Update certifications (all, or those ids) without changing their data; returns the updated ids."""
    if certification_ids is None:
        query = "update public.certifications set status = status returning id"
        return ids(conn, query)
    return ids(
        conn,
        "update public.certifications set status = status where id = any(%s) returning id",
        (list(certification_ids),),
    )


def insert_certification(conn: psycopg.Connection[Any], peer_mentor_id: UUID) -> None:
    """Insert a certification for ``peer_mentor_id`` as whoever ``conn`` is acting as."""
    conn.execute(
        "insert into public.certifications (peer_mentor_id, valid_from, valid_until)"
        " values (%s, '2026-01-01', '2027-01-01')",
        (peer_mentor_id,),
    )


@dataclass(frozen=True, slots=True)
class Mentor:
    """A user with a ``peer_mentors`` row."""

    user_id: UUID
    peer_mentor_id: UUID


class Hierarchy:
    """Builds rows as the superuser on an autocommit connection; every method returns the new id(s)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def _one(self, query: str, params: tuple[Any, ...]) -> UUID:
        row = self._conn.execute(query, params).fetchone()
        assert row is not None
        value: UUID = row[0]
        return value

    def organisation(self, name: str = "organisation") -> UUID:
        return self._one("insert into public.organisations (name) values (%s) returning id", (name,))

    def chapter(self, organisation_id: UUID, name: str = "chapter") -> UUID:
        return self._one(
            "insert into public.chapters (organisation_id, name) values (%s, %s) returning id",
            (organisation_id, name),
        )

    def user(self) -> UUID:
        # No email: test accounts carry no personal data. The id is ours to give, as GoTrue gives it.
        return self._one("insert into auth.users (id) values (gen_random_uuid()) returning id", ())

    def membership(self, user_id: UUID, chapter_id: UUID, role: MembershipRole) -> None:
        self._conn.execute(
            "insert into public.chapter_memberships (user_id, chapter_id, role) values (%s, %s, %s)",
            (user_id, chapter_id, role),
        )

    def remove_membership(self, user_id: UUID, chapter_id: UUID, role: MembershipRole) -> None:
        self._conn.execute(
            "delete from public.chapter_memberships where user_id = %s and chapter_id = %s and role = %s",
            (user_id, chapter_id, role),
        )

    def peer_mentor(self, user_id: UUID, display_name: str = "mentor") -> UUID:
        return self._one(
            "insert into public.peer_mentors (user_id, display_name) values (%s, %s) returning id",
            (user_id, display_name),
        )

    def certification(
        self,
        peer_mentor_id: UUID,
        valid_from: date = date(2026, 1, 1),
        valid_until: date = date(2027, 1, 1),
    ) -> UUID:
        return self._one(
            "insert into public.certifications (peer_mentor_id, valid_from, valid_until)"
            " values (%s, %s, %s) returning id",
            (peer_mentor_id, valid_from, valid_until),
        )

    def coordinator(self, *chapter_ids: UUID) -> UUID:
        """A new user coordinating every chapter given."""
        user_id = self.user()
        for chapter_id in chapter_ids:
            self.membership(user_id, chapter_id, "coordinator")
        return user_id

    def mentor(self, *chapter_ids: UUID) -> Mentor:
        """A new peer mentor with a ``peer_mentor`` membership in every chapter given."""
        user_id = self.user()
        for chapter_id in chapter_ids:
            self.membership(user_id, chapter_id, "peer_mentor")
        return Mentor(user_id, self.peer_mentor(user_id))

    def empty(self) -> None:
        """Remove every row the builder can create (between hypothesis examples on one database)."""
        self._conn.execute(f"truncate {', '.join(HIERARCHY_TABLES)} cascade")


@dataclass(frozen=True, slots=True)
class TwoOrganisations:
    """The isolation scenario: organisations A and B, and a mentor who belongs to both.

    Chapters a1, a2 (organisation A) and b1 (organisation B). ``coordinator_a1`` coordinates a1,
    ``coordinator_b1`` coordinates b1. ``mentor_a1`` is in a1, ``mentor_a2`` in a2, ``mentor_b1`` in b1,
    and ``shared_mentor`` in a1 and b1. Each mentor holds one certification, named ``cert_<mentor>``.
    """

    organisation_a: UUID
    organisation_b: UUID
    chapter_a1: UUID
    chapter_a2: UUID
    chapter_b1: UUID
    coordinator_a1: UUID
    coordinator_b1: UUID
    mentor_a1: Mentor
    mentor_a2: Mentor
    mentor_b1: Mentor
    shared_mentor: Mentor
    cert_a1: UUID
    cert_a2: UUID
    cert_b1: UUID
    cert_shared: UUID

    @property
    def all_certifications(self) -> set[UUID]:
        return {self.cert_a1, self.cert_a2, self.cert_b1, self.cert_shared}


def build_two_organisations(h: Hierarchy) -> TwoOrganisations:
    org_a, org_b = h.organisation("A"), h.organisation("B")
    a1, a2, b1 = h.chapter(org_a, "A1"), h.chapter(org_a, "A2"), h.chapter(org_b, "B1")
    mentor_a1, mentor_a2, mentor_b1 = h.mentor(a1), h.mentor(a2), h.mentor(b1)
    shared = h.mentor(a1, b1)
    return TwoOrganisations(
        organisation_a=org_a,
        organisation_b=org_b,
        chapter_a1=a1,
        chapter_a2=a2,
        chapter_b1=b1,
        coordinator_a1=h.coordinator(a1),
        coordinator_b1=h.coordinator(b1),
        mentor_a1=mentor_a1,
        mentor_a2=mentor_a2,
        mentor_b1=mentor_b1,
        shared_mentor=shared,
        cert_a1=h.certification(mentor_a1.peer_mentor_id),
        cert_a2=h.certification(mentor_a2.peer_mentor_id),
        cert_b1=h.certification(mentor_b1.peer_mentor_id),
        cert_shared=h.certification(shared.peer_mentor_id),
    )


# Hierarchies by index (the property tests generate them) ------------------------------------------------

ROLES: tuple[MembershipRole, ...] = ("coordinator", "peer_mentor")


@dataclass(frozen=True, slots=True)
class Shape:
    """A hierarchy by index: chapter i belongs to organisation ``chapter_orgs[i]``; users are 0..n-1."""

    chapter_orgs: tuple[int, ...]
    users: int
    memberships: frozenset[tuple[int, int, MembershipRole]]  # (user, chapter, role)
    mentors: frozenset[int]  # users with a peer_mentors row
    certifications: tuple[int, ...]  # one entry per certification: the mentor's user index

    def coordinated_chapters(self, user: int) -> set[int]:
        return {ch for (u, ch, role) in self.memberships if u == user and role == "coordinator"}

    def coordinated_certifications(self, user: int) -> set[int]:
        chapters = self.coordinated_chapters(user)
        mentors = {
            u for (u, ch, role) in self.memberships if role == "peer_mentor" and ch in chapters and u != user
        }
        return {i for i, owner in enumerate(self.certifications) if owner in mentors}

    def visible_certifications(self, user: int) -> set[int]:
        own = {i for i, owner in enumerate(self.certifications) if owner == user}
        return own | self.coordinated_certifications(user)

    def visible_chapters(self, user: int) -> set[int]:
        return {ch for (u, ch, _) in self.memberships if u == user}

    def visible_organisations(self, user: int) -> set[int]:
        return {self.chapter_orgs[ch] for ch in self.visible_chapters(user)}


@dataclass(frozen=True, slots=True)
class Built:
    """The ids the database gave to a shape's rows, by the shape's indexes."""

    organisations: tuple[UUID, ...]
    chapters: tuple[UUID, ...]
    users: tuple[UUID, ...]
    certifications: tuple[UUID, ...]

    def certification_ids(self, indexes: set[int]) -> set[UUID]:
        return {self.certifications[i] for i in indexes}


def build(h: Hierarchy, shape: Shape) -> Built:
    h.empty()
    organisations = tuple(h.organisation() for _ in range(max(shape.chapter_orgs) + 1))
    chapters = tuple(h.chapter(organisations[o]) for o in shape.chapter_orgs)
    users = tuple(h.user() for _ in range(shape.users))
    for user, chapter, role in sorted(shape.memberships):
        h.membership(users[user], chapters[chapter], role)
    mentor_ids = {u: h.peer_mentor(users[u]) for u in sorted(shape.mentors)}
    certifications = tuple(h.certification(mentor_ids[u]) for u in shape.certifications)
    return Built(organisations, chapters, users, certifications)


@pytest.fixture(name="superuser")
def superuser_fixture(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit superuser connection (bypasses RLS) to the test's fresh database."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(name="api")
def api_fixture(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """The connection requests run on, one transaction each, as PostgREST's pooled connection does."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(name="hierarchy")
def hierarchy_fixture(superuser: psycopg.Connection[Any]) -> Hierarchy:
    return Hierarchy(superuser)


@pytest.fixture(name="world")
def world_fixture(hierarchy: Hierarchy) -> TwoOrganisations:
    return build_two_organisations(hierarchy)
