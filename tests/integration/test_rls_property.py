"""Row-level security as a property: for random hierarchies, what each user sees and changes is exactly
what the rule defines, computed in Python from the generated hierarchy (``Shape``, tests/support/rls.py).

The rule: a user sees the certifications of their own ``peer_mentors`` row, and sees and changes those
of every peer mentor holding a ``peer_mentor`` membership in a chapter where the user holds a
``coordinator`` membership; chapters and organisations are visible through the user's own memberships.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.rls import (
    ROLES,
    Hierarchy,
    Shape,
    as_user,
    build,
    ids,
    touch_certifications,
    visible_certification_ids,
)

pytestmark = pytest.mark.integration

Conn = psycopg.Connection[Any]

# One database per test function serves every example: each example empties it first.
DB_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    organisations = draw(st.integers(1, 3))
    chapter_orgs = tuple(draw(st.lists(st.integers(0, organisations - 1), min_size=1, max_size=5)))
    users = draw(st.integers(1, 6))
    memberships = draw(
        st.frozensets(
            st.tuples(
                st.integers(0, users - 1), st.integers(0, len(chapter_orgs) - 1), st.sampled_from(ROLES)
            ),
            max_size=12,
        )
    )
    # Most users are mentors; some are not (a coordinator only), and some mentors have no membership.
    mentors = draw(st.frozensets(st.integers(0, users - 1)))
    certifications = tuple(draw(st.lists(st.sampled_from(sorted(mentors)), max_size=10))) if mentors else ()
    return Shape(chapter_orgs, users, memberships, mentors, certifications)


@DB_SETTINGS
@given(shape=shapes())
def test_every_user_sees_exactly_the_certifications_the_rule_defines(
    hierarchy: Hierarchy, api: Conn, shape: Shape
) -> None:
    built = build(hierarchy, shape)
    for user, user_id in enumerate(built.users):
        with as_user(api, user_id, read_only=True) as c:
            seen = visible_certification_ids(c)
        assert seen == built.certification_ids(shape.visible_certifications(user)), f"user {user}"


@DB_SETTINGS
@given(shape=shapes())
def test_every_user_updates_exactly_the_certifications_they_coordinate(
    hierarchy: Hierarchy, api: Conn, shape: Shape
) -> None:
    built = build(hierarchy, shape)
    for user, user_id in enumerate(built.users):
        with as_user(api, user_id) as c:
            updated = touch_certifications(c)
        assert updated == built.certification_ids(shape.coordinated_certifications(user)), f"user {user}"


@DB_SETTINGS
@given(shape=shapes())
def test_every_user_sees_exactly_the_chapters_and_organisations_of_their_own_memberships(
    hierarchy: Hierarchy, api: Conn, shape: Shape
) -> None:
    built = build(hierarchy, shape)
    for user, user_id in enumerate(built.users):
        with as_user(api, user_id, read_only=True) as c:
            chapters = ids(c, "select id from public.chapters")
            organisations = ids(c, "select id from public.organisations")
        assert chapters == {built.chapters[ch] for ch in shape.visible_chapters(user)}, f"user {user}"
        assert organisations == {built.organisations[o] for o in shape.visible_organisations(user)}, (
            f"user {user}"
        )
