"""``certsync history`` and ``/api/history``: every state a change can be in, made for real (the worker
against the sandbox, a reconcile, a replay and a discard), read back from what certsync recorded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import httpx
import pytest

from certsync.app import Runtime, open_runtime
from certsync.console import create_console_app
from certsync.sandbox.server import SandboxServer
from certsync.store.outbox import DeliveredClose
from certsync.store.pool import Pool
from tests.support.cli import assert_one_line_error, certsync, cli_env
from tests.support.console import BASE, BEARER, console_settings
from tests.support.history import OPERATOR, Planted, history_json, plant_every_state
from tests.support.seed import seed_certifications

pytestmark = pytest.mark.integration


@pytest.fixture
async def runtime(database_url: str, sandbox: SandboxServer) -> AsyncIterator[Runtime]:
    async with open_runtime(console_settings(database_url, sandbox)) as rt:
        yield rt


@pytest.fixture
async def planted(pool: Pool, runtime: Runtime, sandbox: SandboxServer) -> Planted:
    return await plant_every_state(pool, runtime, sandbox)


def states(document: dict[str, Any]) -> list[tuple[int, str]]:
    return [(c["version"], c["state"]) for c in document["changes"]]


async def test_every_state_a_change_can_be_in_is_told(database_url: str, planted: Planted) -> None:
    delivered = await history_json(database_url, str(planted.delivered))
    assert delivered["certification_id"] == str(planted.delivered)
    assert states(delivered) == [(1, "delivered")]
    [attempt] = delivered["changes"][0]["attempts"]
    assert (attempt["kind"], attempt["outcome"], attempt["claim"], attempt["attempt"]) == (
        "delivery",
        "delivered",
        1,
        1,
    )
    assert delivered["reconcile"]["verdict"] == "agreed"

    superseded = await history_json(database_url, str(planted.superseded))
    assert states(superseded) == [(1, "superseded"), (2, "superseded"), (3, "delivered")]
    newest = superseded["changes"][2]["event_id"]
    assert [c["superseded_by"] for c in superseded["changes"][:2]] == [newest, newest]
    assert superseded["changes"][0]["attempts"] == []

    queued = await history_json(database_url, str(planted.queued))
    [change] = queued["changes"]
    assert (change["state"], change["queue_entry_id"], change["queue_status"]) == (
        "queued",
        planted.queued_entry,
        "replayed",
    )
    calls = [(a["kind"], a["attempt"], a["outcome"], a["status"]) for a in change["attempts"]]
    assert calls == [
        ("delivery", 1, "transient", 503),
        ("delivery", 2, "transient", 503),
        ("delivery", 3, "transient", 503),
        ("delivery", 4, "transient", 503),
        ("replay", None, "replayed", None),
    ]
    assert change["attempts"][-1]["by"] == OPERATOR
    [entry] = queued["queue_entries"]
    assert (entry["id"], entry["status"], entry["replay_count"], entry["last_replayed_by"]) == (
        planted.queued_entry,
        "replayed",
        1,
        OPERATOR,
    )

    refused = await history_json(database_url, str(planted.refused))
    [change] = refused["changes"]
    assert [(a["outcome"], a["status"]) for a in change["attempts"]] == [("refused", 400)]
    [entry] = refused["queue_entries"]
    assert (entry["status"], entry["discarded_by"], entry["discarded_reason"]) == (
        "discarded",
        OPERATOR,
        "bad data, fixed by hand",
    )
    # Discarded: the portal never got it, and the last reconcile said so.
    assert refused["reconcile"]["verdict"] == "missing"
    assert refused["reconcile"]["database_version"] == 1

    deleted = await history_json(database_url, str(planted.deleted))
    assert deleted["exists"] is False
    assert [(c["operation_type"], c["state"], c["status"]) for c in deleted["changes"]] == [
        ("certification.created", "deleted", "delivered"),
        ("certification.deleted", "deleted", "delivered"),
    ]

    waiting = await history_json(database_url, str(planted.waiting))
    assert states(waiting) == [(1, "waiting")]
    assert waiting["reconcile"]["verdict"] == "never reconciled"

    in_flight = await history_json(database_url, str(planted.in_flight))
    assert states(in_flight) == [(1, "in_flight")]
    assert in_flight["changes"][0]["claims"] == 1


async def test_a_mentor_lists_the_histories_of_their_certifications(
    database_url: str, planted: Planted
) -> None:
    document = await history_json(database_url, "--mentor", str(planted.mentor))
    assert document["peer_mentor_id"] == str(planted.mentor)
    assert {c["certification_id"] for c in document["certifications"]} == {
        str(planted.waiting),
        str(planted.in_flight),
    }


async def test_the_human_history_reads_on_a_pipe(database_url: str, planted: Planted) -> None:
    result = await certsync("history", str(planted.queued), env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"Certification {planted.queued}" in text
    assert f"queued: entry {planted.queued_entry} (replayed)" in text
    assert "claim 1 attempt 4: transient 503" in text
    assert f"replay by {OPERATOR}: replayed" in text
    assert "Last reconcile: agreed" in text


async def test_an_unknown_id_is_exit_2_and_one_line(database_url: str, pool: Pool) -> None:
    unknown = uuid4()
    result = await certsync("history", str(unknown), env=cli_env(database_url))
    assert result.exit_code == 2
    assert_one_line_error(result)
    assert f"no certification {unknown} and no captured change for it" in result.stderr

    for args in (["history", "not-a-uuid"], ["history"], ["history", str(unknown), "--mentor", str(unknown)]):
        result = await certsync(*args, env=cli_env(database_url))
        assert result.exit_code == 2, args
        assert_one_line_error(result)


@pytest.fixture
async def api(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    app = create_console_app(runtime, runtime.settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        yield client


async def test_the_api_route_gives_the_same_history(
    database_url: str, planted: Planted, api: httpx.AsyncClient
) -> None:
    response = await api.get(f"/api/history/{planted.queued}", headers=BEARER)
    assert response.status_code == 200, response.text
    assert response.json() == await history_json(database_url, str(planted.queued))

    by_mentor = await api.get("/api/history", params={"mentor_id": str(planted.mentor)}, headers=BEARER)
    assert by_mentor.status_code == 200, by_mentor.text
    assert len(by_mentor.json()["certifications"]) == 2

    assert (await api.get(f"/api/history/{uuid4()}", headers=BEARER)).status_code == 404
    assert (await api.get(f"/api/history/{planted.queued}")).status_code == 401
    assert (await api.get("/api/history/not-a-uuid", headers=BEARER)).status_code == 422

    reconcile = await api.get("/api/reconcile", headers=BEARER)
    assert reconcile.status_code == 200, reconcile.text
    assert reconcile.json()["mismatches"] == [
        {
            "certification_id": str(planted.refused),
            "kind": "missing",
            "portal_version": None,
            "database_version": 1,
        }
    ]


async def test_a_claim_handed_back_keeps_its_calls_and_a_lost_claim_writes_none(
    database_url: str, pool: Pool, runtime: Runtime
) -> None:
    [certification] = await seed_certifications(pool, 1)
    outbox = runtime.outbox()
    now = runtime.clock.now()
    [first] = (await outbox.claim(now, limit=1, lease_seconds=60)).events
    failed = {"claim": 1, "attempt": 1, "at": now.isoformat(), "outcome": "transient", "status": 503}
    assert await outbox.release(first, available_at=now, detail="circuit open", attempt_log=[failed])
    [second] = (await outbox.claim(now, limit=1, lease_seconds=60)).events
    # The first claim's token is spent: its late close neither closes the event nor adds to its calls.
    late = {**failed, "claim": 1, "attempt": 2}
    assert await outbox.mark_delivered_many([DeliveredClose(first, [late])], now) == set()
    assert await outbox.mark_delivered_many([DeliveredClose(second)], now) == {second.id}

    document = await history_json(database_url, str(certification))
    [change] = document["changes"]
    # A claim handed back does not count (release_claim), so the next claim is number 1 again and its
    # call follows the handed-back claim's: the second call made for it.
    assert (change["state"], change["claims"]) == ("delivered", 1)
    assert [(a["claim"], a["attempt"], a["outcome"], a["status"]) for a in change["attempts"]] == [
        (1, 1, "transient", 503),
        (1, 2, "delivered", None),
    ]


async def test_the_api_repairs_as_the_operator(planted: Planted, api: httpx.AsyncClient) -> None:
    assert (await api.post("/api/reconcile/repair")).status_code == 401
    response = await api.post("/api/reconcile/repair", headers=BEARER)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["counts"]["missing"], body["repaired"]) == (1, 1)
    history = (await api.get(f"/api/history/{planted.refused}", headers=BEARER)).json()
    assert [(c["operation_type"], c["state"]) for c in history["changes"]][-1] == (
        "certification.repaired",
        "waiting",
    )
    last = (await api.get("/api/reconcile", headers=BEARER)).json()
    assert last["run_id"] == body["run_id"]
