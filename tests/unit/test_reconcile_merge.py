"""The reconcile merge-join against a naive dict oracle, and the confirm step, without any I/O."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certsync.delivery.reconcile import (
    ExpectedHolding,
    Mismatch,
    MismatchKind,
    PeriodicReconcile,
    PortalHolding,
    ReconcileReport,
    ReconcileStreamError,
    classify,
    confirm,
    merge,
)
from certsync.resilience.testing import ManualClock
from certsync.store.reconcile import FreshRead

T = TypeVar("T")

STATUSES = ("active", "suspended", "expired", "revoked")


async def stream(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


# Few distinct ids, so the two sides overlap often; byte-level randomness so uuid order is exercised.
ids = st.sampled_from([uuid.UUID(int=(n * 0x9E3779B97F4A7C15_F39CC0605CEDC834) % 2**128) for n in range(40)])
portal_side = st.dictionaries(
    ids,
    st.tuples(st.integers(1, 4), st.sampled_from(STATUSES), st.booleans()),
    max_size=30,
)
database_side = st.dictionaries(
    ids,
    st.tuples(st.integers(1, 4), st.sampled_from(STATUSES), st.booleans(), st.booleans()),
    max_size=30,
)


def oracle(
    portal: dict[UUID, tuple[int, str, bool]], database: dict[UUID, tuple[int, str, bool, bool]]
) -> tuple[dict[UUID, MismatchKind], int]:
    """Everything in memory, by dict lookups, the kinds written out as the interface pins them."""
    found: dict[UUID, MismatchKind] = {}
    in_transit = 0
    for cert_id in portal.keys() | database.keys():
        held = portal.get(cert_id)
        expected = database.get(cert_id)
        if expected is not None and expected[3]:
            in_transit += 1
            continue
        if held is not None and held[2] and (expected is None or not expected[2]):
            found[cert_id] = MismatchKind.LISTED_BUT_SHOULD_NOT_BE
        elif held is not None and expected is None:
            found[cert_id] = MismatchKind.UNKNOWN_TO_DATABASE
        elif held is None and expected is not None:
            found[cert_id] = MismatchKind.MISSING
        elif (
            held is not None
            and expected is not None
            and (held[0] < expected[0] or held[1] != expected[1] or held[2] != expected[2])
        ):
            found[cert_id] = MismatchKind.STALE
    return found, in_transit


def holdings(portal: dict[UUID, tuple[int, str, bool]]) -> list[PortalHolding]:
    return [PortalHolding(k, v, s, listed) for k, (v, s, listed) in sorted(portal.items())]  # type: ignore[arg-type]


def expectations(database: dict[UUID, tuple[int, str, bool, bool]]) -> list[ExpectedHolding]:
    return [
        ExpectedHolding(k, v, s, listed, transit) for k, (v, s, listed, transit) in sorted(database.items())
    ]


@settings(max_examples=300, deadline=None)
@given(portal=portal_side, database=database_side)
def test_merge_finds_exactly_what_the_oracle_finds(
    portal: dict[UUID, tuple[int, str, bool]], database: dict[UUID, tuple[int, str, bool, bool]]
) -> None:
    scan = asyncio.run(merge(stream(holdings(portal)), stream(expectations(database))))

    expected_kinds, in_transit = oracle(portal, database)
    assert {m.certification_id: m.kind for m in scan.mismatches} == expected_kinds
    assert len(scan.mismatches) == len(expected_kinds)  # each id once
    assert [m.certification_id for m in scan.mismatches] == sorted(expected_kinds)  # in id order
    assert scan.in_transit == in_transit
    assert scan.portal_held == len(portal)
    assert scan.database_expected == len(database)
    for mismatch in scan.mismatches:
        assert mismatch.portal_version == (portal[mismatch.certification_id][0] if mismatch.portal else None)
        assert (mismatch.portal is None) == (mismatch.certification_id not in portal)
        assert (mismatch.database is None) == (mismatch.certification_id not in database)


def test_uuid_order_is_byte_order_as_postgresql_and_the_portal_sort() -> None:
    values = [uuid.UUID(int=n) for n in (0xFF << 120, 1, 0x80 << 120, 0x7F << 120, 2**64)]
    assert sorted(values) == sorted(values, key=lambda u: u.bytes) == sorted(values, key=str)


@pytest.mark.parametrize("side", ["portal", "database"])
async def test_an_unordered_listing_is_refused_rather_than_misreported(side: str) -> None:
    a, b = uuid.UUID(int=1), uuid.UUID(int=2)
    portal = [PortalHolding(b, 1, "active", True), PortalHolding(a, 1, "active", True)]
    database = [ExpectedHolding(b, 1, "active", True, False), ExpectedHolding(a, 1, "active", True, False)]
    if side == "portal":
        database = sorted(database, key=lambda e: e.certification_id)
    else:
        portal = sorted(portal, key=lambda p: p.certification_id)
    with pytest.raises(ReconcileStreamError, match=side):
        await merge(stream(portal), stream(database))


def test_first_match_wins() -> None:
    cert = uuid.uuid4()
    listed = PortalHolding(cert, 1, "active", True)
    # Listed by the portal and absent from the database: both first kinds hold; the first is reported.
    assert classify(listed, None) is MismatchKind.LISTED_BUT_SHOULD_NOT_BE
    assert classify(PortalHolding(cert, 1, "expired", False), None) is MismatchKind.UNKNOWN_TO_DATABASE
    assert classify(None, ExpectedHolding(cert, 1, "active", True, False)) is MismatchKind.MISSING
    # Listed but the database says suspended: also stale, reported as listed_but_should_not_be.
    assert classify(listed, ExpectedHolding(cert, 2, "suspended", False, False)) is (
        MismatchKind.LISTED_BUT_SHOULD_NOT_BE
    )
    assert classify(listed, ExpectedHolding(cert, 2, "active", True, False)) is MismatchKind.STALE
    # A portal ahead of the database in version but equal in what it shows is no mismatch.
    assert (
        classify(PortalHolding(cert, 3, "active", True), ExpectedHolding(cert, 2, "active", True, False))
        is None
    )


def test_confirm_drops_what_changed_during_the_scan_and_counts_what_is_in_transit() -> None:
    landed, moving, still, gone = (uuid.UUID(int=n) for n in (1, 2, 3, 4))
    held = PortalHolding(landed, 5, "active", True)
    found = [
        Mismatch(landed, MismatchKind.STALE, held, ExpectedHolding(landed, 4, "suspended", False, False)),
        Mismatch(moving, MismatchKind.MISSING, None, ExpectedHolding(moving, 1, "active", True, False)),
        Mismatch(still, MismatchKind.MISSING, None, ExpectedHolding(still, 1, "active", True, False)),
        Mismatch(gone, MismatchKind.MISSING, None, ExpectedHolding(gone, 1, "active", True, False)),
    ]
    fresh = {
        # Delivered during the scan: the database now says what the portal showed.
        landed: FreshRead(landed, ExpectedHolding(landed, 5, "active", True, False), False),
        moving: FreshRead(moving, ExpectedHolding(moving, 2, "active", True, True), True),
        still: FreshRead(still, ExpectedHolding(still, 1, "active", True, False), False),
        # Deleted during the scan, and its delete already delivered: the portal lacks it, so does the db.
        gone: FreshRead(gone, None, False),
    }
    kept, in_transit = confirm(found, fresh)
    assert [(m.certification_id, m.kind) for m in kept] == [(still, MismatchKind.MISSING)]
    assert in_transit == 1


def test_report_json_is_the_pinned_object() -> None:
    cert = uuid.UUID(int=7)
    report = ReconcileReport(
        run_id=uuid.uuid4(),
        mismatches=(
            Mismatch(cert, MismatchKind.MISSING, None, ExpectedHolding(cert, 3, "active", True, False)),
        ),
        in_transit=2,
        repaired=0,
        portal_held=0,
        database_expected=1,
    )
    assert report.to_json_dict() == {
        "mismatches": [
            {"certification_id": str(cert), "kind": "missing", "portal_version": None, "database_version": 3}
        ],
        "counts": {"listed_but_should_not_be": 0, "unknown_to_database": 0, "missing": 1, "stale": 0},
        "in_transit": 2,
    }


class _Flaky:
    """Fails its first scheduled reconcile (a portal outage), then finds nothing due, then stops."""

    def __init__(self, stop: asyncio.Event, clock: ManualClock) -> None:
        self.calls: list[float] = []
        self._stop = stop
        self._clock = clock

    async def reconcile_if_due(self, *, interval_seconds: float, started_by: str) -> ReconcileReport | None:
        self.calls.append(self._clock.now().timestamp())
        if len(self.calls) == 1:
            raise ConnectionError("portal down")
        if len(self.calls) == 3:
            self._stop.set()
        return None


async def test_a_failed_periodic_reconcile_is_logged_and_tried_again_never_fatal() -> None:
    clock = ManualClock()
    stop = asyncio.Event()
    flaky = _Flaky(stop, clock)
    periodic = PeriodicReconcile(flaky, interval_seconds=600, sleep=clock.sleep, started_by="worker test")

    await asyncio.wait_for(periodic.run(stop), timeout=5)

    assert periodic.failures == 1
    assert len(flaky.calls) == 3
    assert clock.sleeps == [60.0, 60.0]  # checks every min(interval, 60 s); the claim decides
