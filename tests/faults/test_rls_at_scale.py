"""Row-level security at a larger size: many organisations, users in several chapters of several of them,
every user's reads and writes checked against the rule (``tests/integration/test_rls_property.py``
states it and checks small hierarchies); and the anon key's path sees and runs nothing.

Requests are made as PostgREST makes them (``tests/support/rls.py``). The catalogue lint (RLS on every
table, no ``security definer`` in an exposed schema, every view ``security_invoker``) lives in
``tests/integration/test_rls_lint.py``; this module adds what anon may execute.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from tests.integration import test_rls_property as rule
from tests.support.rls import (
    EXPOSED_SCHEMAS,
    ROLES,
    Hierarchy,
    MembershipRole,
    Shape,
    TwoOrganisations,
    acting_as,
    as_user,
    build,
    ids,
    insert_certification,
    rows,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Conn = psycopg.Connection[Any]

AT_SCALE = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def large_shapes(draw: st.DrawFn) -> Shape:
    """4-8 organisations, 8-16 chapters, 12-24 users each in 1-4 chapters (of any organisations, either
    role), at least half of them mentors, 20-60 certifications."""
    organisations = draw(st.integers(4, 8))
    chapter_orgs = tuple(draw(st.lists(st.integers(0, organisations - 1), min_size=8, max_size=16)))
    users = draw(st.integers(12, 24))
    memberships: set[tuple[int, int, MembershipRole]] = set()
    for user in range(users):
        chapters = draw(st.lists(st.integers(0, len(chapter_orgs) - 1), min_size=1, max_size=4, unique=True))
        memberships |= {(user, chapter, draw(st.sampled_from(ROLES))) for chapter in chapters}
    mentors = draw(st.frozensets(st.integers(0, users - 1), min_size=users // 2))
    certifications = tuple(draw(st.lists(st.sampled_from(sorted(mentors)), min_size=20, max_size=60)))
    return Shape(chapter_orgs, users, frozenset(memberships), mentors, certifications)


def coordinated_mentors(shape: Shape, user: int) -> set[int]:
    chapters = shape.coordinated_chapters(user)
    return {u for (u, ch, role) in shape.memberships if role == "peer_mentor" and ch in chapters} & set(
        shape.mentors
    )


@AT_SCALE
@given(shape=large_shapes())
def test_at_scale_every_user_reads_exactly_what_the_rule_defines(
    hierarchy: Hierarchy, api: Conn, shape: Shape
) -> None:
    rule.test_every_user_sees_exactly_the_certifications_the_rule_defines.hypothesis.inner_test(  # type: ignore[attr-defined]  # set by @given
        hierarchy, api, shape
    )
    rule.test_every_user_sees_exactly_the_chapters_and_organisations_of_their_own_memberships.hypothesis.inner_test(  # type: ignore[attr-defined]  # set by @given
        hierarchy, api, shape
    )


@AT_SCALE
@given(shape=large_shapes())
def test_at_scale_every_user_updates_exactly_the_certifications_they_coordinate_and_deletes_none(
    hierarchy: Hierarchy, api: Conn, shape: Shape
) -> None:
    rule.test_every_user_updates_exactly_the_certifications_they_coordinate.hypothesis.inner_test(  # type: ignore[attr-defined]  # set by @given
        hierarchy, api, shape
    )
    for user_id in ids(api, "select id from auth.users"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege), as_user(api, user_id) as c:
            c.execute("delete from public.certifications")


@AT_SCALE
@given(shape=large_shapes())
def test_at_scale_every_user_creates_certifications_exactly_for_the_mentors_they_coordinate(
    hierarchy: Hierarchy, api: Conn, superuser: Conn, shape: Shape
) -> None:
    built = build(hierarchy, shape)
    mentor_of = dict(rows(superuser, "select user_id, id from public.peer_mentors"))
    for user, user_id in enumerate(built.users):
        allowed = {mentor_of[built.users[m]] for m in coordinated_mentors(shape, user)}
        created = set()
        with as_user(api, user_id) as c:
            for mentor_id in mentor_of.values():
                try:
                    with c.transaction():  # a savepoint: a refused insert must not end the request
                        insert_certification(c, mentor_id)
                    created.add(mentor_id)
                except psycopg.errors.InsufficientPrivilege:
                    pass
        assert created == allowed, f"user {user}"


def exposed_relations(superuser: Conn, kinds: list[str]) -> list[tuple[str, str]]:
    """(schema, name) of every relation of these ``relkind``s in a schema the API exposes."""
    return [
        (str(schema), str(name))
        for schema, name in rows(
            superuser,
            "select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = any(%s) and c.relkind = any(%s)",
            (EXPOSED_SCHEMAS, kinds),
        )
    ]


def test_anon_reads_nothing_from_any_table_or_view_the_api_exposes(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    relations = exposed_relations(superuser, ["r", "p", "v", "m", "f"])
    assert relations, "the exposed schemas hold tables"
    for schema, name in relations:
        try:
            with acting_as(api, "anon", read_only=True) as c:
                count = c.execute(
                    sql.SQL("select count(*) from {}").format(sql.Identifier(schema, name))
                ).fetchone()
            assert count == (0,), f"anon sees rows of {schema}.{name}"
        except psycopg.errors.InsufficientPrivilege:
            pass  # refused outright: also nothing seen


def test_anon_cannot_write_any_table_the_api_exposes(
    superuser: Conn, api: Conn, world: TwoOrganisations
) -> None:
    for schema, name in exposed_relations(superuser, ["r", "p"]):
        table = sql.Identifier(schema, name)
        for statement in (sql.SQL("delete from {}"), sql.SQL("insert into {} default values")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), acting_as(api, "anon") as c:
                c.execute(statement.format(table))


def test_anon_may_execute_no_function_in_a_schema_the_api_exposes(superuser: Conn) -> None:
    assert (
        rows(
            superuser,
            "select n.nspname, p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = any(%s) and has_function_privilege('anon', p.oid, 'execute')",
            (EXPOSED_SCHEMAS,),
        )
        == []
    )
