"""A certification in every state of its history, made for real: the worker delivers to the sandbox
(answering 503s and a 400 where a test needs a queued change), a reconcile runs, an operator replays
and discards — so ``certsync history``, its API route and the console's page all have one to show."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

from certsync.app import Runtime
from certsync.sandbox.faults import FaultScript, FaultStep
from certsync.sandbox.server import SandboxServer
from certsync.store.pool import Pool
from tests.support.cli import certsync, cli_env
from tests.support.runtime import FAST
from tests.support.seed import seed_certifications, set_status

OPERATOR = "oncall"


async def history_json(database_url: str, *args: str) -> dict[str, Any]:
    """What ``certsync history ... --json`` prints, run as a user would."""
    result = await certsync("history", *args, "--json", env=cli_env(database_url))
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


@dataclass(frozen=True, slots=True)
class Planted:
    delivered: UUID  # one change, delivered on the first call; the last reconcile agreed
    superseded: UUID  # three changes: two superseded by the third, delivered
    queued: UUID  # four 503s → pending; then replayed by OPERATOR once the portal recovered
    refused: UUID  # a 400 → requires_investigation; discarded by OPERATOR; reconcile: missing
    deleted: UUID  # delivered, then deleted and the delete delivered
    waiting: UUID  # created after the reconcile, not yet claimed
    in_flight: UUID  # claimed, not yet closed
    mentor: UUID  # the peer mentor of ``waiting`` and ``in_flight``
    queued_entry: int
    refused_entry: int


async def drain(runtime: Runtime) -> None:
    await runtime.worker(FAST, listen=False).run(once=True)


def answer(sandbox: SandboxServer, *steps: FaultStep) -> None:
    sandbox.sandbox.load_faults(FaultScript(steps=steps))


async def entry_of(runtime: Runtime, certification_id: UUID) -> int:
    [entry] = await runtime.queue.list_entries(certification_id=certification_id)
    return entry.id


async def plant_every_state(pool: Pool, runtime: Runtime, sandbox: SandboxServer) -> Planted:
    [delivered] = await seed_certifications(pool, 1)
    await drain(runtime)

    [superseded] = await seed_certifications(pool, 1)
    await set_status(pool, [superseded], "suspended")
    await set_status(pool, [superseded], "active")
    await drain(runtime)

    [queued] = await seed_certifications(pool, 1)
    answer(sandbox, FaultStep(status=503, times=4, scope="put"))
    await drain(runtime)

    [refused] = await seed_certifications(pool, 1)
    answer(sandbox, FaultStep(status=400, times=1, scope="put"))
    await drain(runtime)
    answer(sandbox)

    [deleted] = await seed_certifications(pool, 1)
    await drain(runtime)
    async with pool.connection() as conn:
        await conn.execute("delete from public.certifications where id = %s", (deleted,))
    await drain(runtime)

    queued_entry, refused_entry = await entry_of(runtime, queued), await entry_of(runtime, refused)
    service = runtime.queue_service()
    assert (await service.replay(queued_entry, by=OPERATOR)).status == "replayed"
    assert (await service.discard(refused_entry, reason="bad data, fixed by hand", by=OPERATOR)).discarded

    await runtime.reconciler().reconcile(repair=False, started_by="test")

    [in_flight, waiting] = await seed_certifications(pool, 2)
    async with pool.connection() as conn:
        cur = await conn.execute("select peer_mentor_id from public.certifications where id = %s", (waiting,))
        row = await cur.fetchone()
        assert row is not None
        mentor = cast(UUID, row["peer_mentor_id"])
        await conn.execute(
            "update public.certification_sync_events set available_at = now() + interval '1 hour'"
            " where certification_id = %s",
            (waiting,),
        )
    claim = await runtime.outbox().claim(runtime.clock.now(), limit=10, lease_seconds=600)
    assert [e.certification_id for e in claim.events] == [in_flight]
    return Planted(
        delivered=delivered,
        superseded=superseded,
        queued=queued,
        refused=refused,
        deleted=deleted,
        waiting=waiting,
        in_flight=in_flight,
        mentor=mentor,
        queued_entry=queued_entry,
        refused_entry=refused_entry,
    )
