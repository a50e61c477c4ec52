"""What the database pays for certsync's guarantees: capture, the expiry sweep, and row-level security.

* capture cost — ``UPDATE`` of 10k certifications with the statement-level outbox trigger, against a
  copy of the same database whose ``certifications_capture_updates`` trigger is disabled;
* expiry sweep — the sweep's own statement (``expire_due_certifications``, trigger on) over 1M
  certifications of which 10 % are due, against a bare ``UPDATE … WHERE valid_until < now()`` without the
  capture trigger (and, for reference, the same bare statement with it);
* coordinator read — 100k certifications read as a coordinator under RLS (PostgREST's way: role
  ``authenticated``, JWT claims, read-only transaction) against the same query as ``service_role``.

Every timed statement runs in a transaction that is rolled back, followed by a VACUUM, so each
repetition starts from the same table; contenders alternate, and medians and bests are reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from tests.support.databases import create_database, drop_database, unique_name

from bench import Options, best, fresh_database, median
from bench._report import Report
from certsync.store.queries import query

Timed = Callable[[psycopg.Connection[Any]], None]


def alternate(
    conns: dict[str, tuple[psycopg.Connection[Any], Timed]], repeats: int
) -> dict[str, list[float]]:
    """Seconds per run of each statement, alternating; each run in a rolled-back transaction, then VACUUM."""
    samples: dict[str, list[float]] = {name: [] for name in conns}
    for _ in range(repeats):
        for name, (conn, statement) in conns.items():
            with conn.transaction(force_rollback=True):
                started = time.perf_counter()
                statement(conn)
                samples[name].append(time.perf_counter() - started)
            conn.execute("vacuum public.certifications")
    return samples


def seed_certifications(
    conn: psycopg.Connection[Any], mentors: int, per_mentor: int, due_every: int = 0
) -> None:
    """``mentors × per_mentor`` certifications, every ``due_every``-th already past its end date; the
    insert-capture trigger is off while seeding (these rows are the starting state, not changes)."""
    conn.execute("alter table public.certifications disable trigger certifications_capture_inserts")
    conn.execute(
        """
        with u as (insert into auth.users (id)
                   select gen_random_uuid() from generate_series(1, %(mentors)s) returning id),
             m as (insert into public.peer_mentors (user_id, display_name)
                   select id, 'Mentor' from u returning id)
        insert into public.certifications (peer_mentor_id, valid_from, valid_until)
        select m.id, date '2020-01-01',
               case when %(due_every)s > 0 and g %% %(due_every)s = 0 then date '2020-06-01'
                    else date '2099-01-01' end
        from m, generate_series(1, %(per)s) as g
        """,
        {"mentors": mentors, "per": per_mentor, "due_every": due_every},
    )
    conn.execute("alter table public.certifications enable trigger certifications_capture_inserts")
    conn.execute("vacuum analyze")


def capture_cost(options: Options, report: Report) -> tuple[float, float]:
    rows, repeats = (2_000, 5) if options.quick else (10_000, 9)
    with fresh_database(options, "certsync_bench_capture") as with_trigger:
        with psycopg.connect(with_trigger, autocommit=True) as conn:
            seed_certifications(conn, rows // 10, 10)
        admin = options.admin_url()
        copy = unique_name("certsync_bench_capture_off")
        source = psycopg.conninfo.conninfo_to_dict(with_trigger)["dbname"]
        without_trigger = create_database(admin, copy, template=str(source))
        try:
            with (
                psycopg.connect(with_trigger, autocommit=True) as on,
                psycopg.connect(without_trigger, autocommit=True) as off,
            ):
                off.execute(
                    "alter table public.certifications disable trigger certifications_capture_updates"
                )

                def update(conn: psycopg.Connection[Any]) -> None:
                    conn.execute("update public.certifications set status = 'suspended'")

                samples = alternate(
                    {"with capture trigger": (on, update), "without (copy)": (off, update)}, repeats
                )
                on.execute("truncate public.certification_sync_events cascade")
                update(on)
                written = on.execute("select count(*) from public.certification_sync_events").fetchone()
        finally:
            drop_database(admin, copy)
    on_s, off_s = median(samples["with capture trigger"]), median(samples["without (copy)"])
    report.table(
        f"Capture cost: UPDATE of {rows:,} certifications (status change), {repeats} alternating runs",
        ("variant", "median ms", "best ms", "vs without"),
        [
            (
                "with the outbox capture trigger",
                f"{on_s * 1000:.1f}",
                f"{best(samples['with capture trigger']) * 1000:.1f}",
                f"{on_s / off_s:.2f}×",
            ),
            (
                "trigger disabled (a copy)",
                f"{off_s * 1000:.1f}",
                f"{best(samples['without (copy)']) * 1000:.1f}",
                "1.00×",
            ),
        ],
    )
    report.notes.append(
        f"Capture check: one committed UPDATE of the {rows:,} rows wrote "
        f"{written[0] if written else 0:,} outbox "
        "events in the same transaction (one per row, one pg_notify)."
    )
    return on_s, off_s


def expiry_sweep(options: Options, report: Report) -> tuple[float, float]:
    mentors, repeats = (10_000, 3) if options.quick else (100_000, 3)
    total = mentors * 10
    today = datetime.now(UTC).date()
    sweep = query("expire_due_certifications")
    with (
        fresh_database(options, "certsync_bench_sweep") as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        seed_certifications(conn, mentors, 10, due_every=10)

        def certsync_sweep(c: psycopg.Connection[Any]) -> None:
            c.execute(sweep, {"today": today}).fetchone()

        def bare_without_capture(c: psycopg.Connection[Any]) -> None:
            c.execute("alter table public.certifications disable trigger certifications_capture_updates")
            started = time.perf_counter()
            c.execute("update public.certifications set status = 'expired' where valid_until < now()")
            bare_without_capture.seconds.append(time.perf_counter() - started)  # type: ignore[attr-defined]

        def bare_with_capture(c: psycopg.Connection[Any]) -> None:
            c.execute("update public.certifications set status = 'expired' where valid_until < now()")

        bare_without_capture.seconds = []  # type: ignore[attr-defined]
        samples = alternate(
            {
                "certsync sweep": (conn, certsync_sweep),
                "bare, no capture": (conn, bare_without_capture),
                "bare, capture on": (conn, bare_with_capture),
            },
            repeats,
        )
        samples["bare, no capture"] = bare_without_capture.seconds  # type: ignore[attr-defined]
    ours, bare = median(samples["certsync sweep"]), median(samples["bare, no capture"])
    report.table(
        f"Expiry sweep: {total:,} certifications, 10 % due ({total // 10:,} expire), "
        f"{repeats} alternating runs",
        ("statement", "median s", "best s", "vs bare UPDATE"),
        [
            (
                "certsync sweep (expire_due_certifications, capture on)",
                f"{ours:.3f}",
                f"{best(samples['certsync sweep']):.3f}",
                f"{ours / bare:.2f}×",
            ),
            (
                "bare UPDATE … WHERE valid_until < now(), capture trigger disabled",
                f"{bare:.3f}",
                f"{best(samples['bare, no capture']):.3f}",
                "1.00×",
            ),
            (
                "bare UPDATE … WHERE valid_until < now(), capture on",
                f"{median(samples['bare, capture on']):.3f}",
                f"{best(samples['bare, capture on']):.3f}",
                f"{median(samples['bare, capture on']) / bare:.2f}×",
            ),
        ],
    )
    report.notes.append(
        "The sweep's bare comparison disables the capture trigger inside its own (rolled-back) "
        "transaction rather than in a copy of a 1M-row database; only the UPDATE itself is timed."
    )
    return ours, bare


def coordinator_read(options: Options, report: Report) -> tuple[float, float]:
    mentors, per, repeats = (200, 100, 5) if options.quick else (1_000, 100, 9)
    with fresh_database(options, "certsync_bench_rls") as url, psycopg.connect(url, autocommit=True) as conn:
        seed_certifications(conn, mentors, per)
        row = conn.execute(
            """
            with o as (insert into public.organisations (name) values ('Org') returning id),
                 c as (insert into public.chapters (organisation_id, name)
                       select id, 'Chapter' from o returning id),
                 u as (insert into auth.users (id) values (gen_random_uuid()) returning id),
                 coordinator as (insert into public.chapter_memberships (user_id, chapter_id, role)
                                 select u.id, c.id, 'coordinator' from u, c returning user_id),
                 mentors as (insert into public.chapter_memberships (user_id, chapter_id, role)
                             select pm.user_id, c.id, 'peer_mentor'
                             from public.peer_mentors pm, c returning 1)
            select (select user_id from coordinator) as coordinator, (select count(*) from mentors) as mentors
            """
        ).fetchone()
        assert row is not None
        claims = json.dumps({"sub": str(row[0]), "role": "authenticated"})
        conn.execute("vacuum analyze")

        def as_role(role: str, statement: str) -> Timed:
            def read(c: psycopg.Connection[Any]) -> None:
                c.execute("set transaction read only")
                c.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
                if role == "authenticated":
                    c.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
                read.rows = c.execute(statement).fetchall()  # type: ignore[attr-defined]

            return read

        select = (
            "select id, peer_mentor_id, status, valid_from, valid_until, version from public.certifications"
        )
        count = "select count(*) from public.certifications"
        readers = {
            "coordinator (RLS), fetch all": as_role("authenticated", select),
            "service_role, fetch all": as_role("service_role", select),
            "coordinator (RLS), count(*)": as_role("authenticated", count),
            "service_role, count(*)": as_role("service_role", count),
        }
        samples = alternate({name: (conn, reader) for name, reader in readers.items()}, repeats)
        seen = len(readers["coordinator (RLS), fetch all"].rows)  # type: ignore[attr-defined]
        assert seen == mentors * per, f"the coordinator sees {seen} rows, not {mentors * per}"
    fetch_rls, fetch_service = (
        median(samples["coordinator (RLS), fetch all"]),
        median(samples["service_role, fetch all"]),
    )
    count_rls, count_service = (
        median(samples["coordinator (RLS), count(*)"]),
        median(samples["service_role, count(*)"]),
    )
    report.table(
        f"Coordinator read: {mentors * per:,} certifications of {mentors:,} mentors "
        "in one coordinated chapter, "
        f"{repeats} alternating runs",
        ("query", "median ms", "best ms", "RLS vs service_role"),
        [
            (
                "coordinator under RLS: select 6 columns, fetch all",
                f"{fetch_rls * 1000:.1f}",
                f"{best(samples['coordinator (RLS), fetch all']) * 1000:.1f}",
                f"{fetch_rls / fetch_service:.2f}×",
            ),
            (
                "service_role: same query",
                f"{fetch_service * 1000:.1f}",
                f"{best(samples['service_role, fetch all']) * 1000:.1f}",
                "1.00×",
            ),
            (
                "coordinator under RLS: count(*) (no transfer)",
                f"{count_rls * 1000:.1f}",
                f"{best(samples['coordinator (RLS), count(*)']) * 1000:.1f}",
                f"{count_rls / count_service:.2f}×",
            ),
            (
                "service_role: count(*)",
                f"{count_service * 1000:.1f}",
                f"{best(samples['service_role, count(*)']) * 1000:.1f}",
                "1.00×",
            ),
        ],
    )
    return fetch_rls, fetch_service


def run(options: Options) -> Report:
    report = Report(
        name="database",
        title="Database costs: capture trigger, expiry sweep, coordinator read under RLS",
        method=(
            "Fresh migrated databases on the server given by --database-url / CERTSYNC_TEST_DATABASE_URL. "
            "Each timed statement runs in a transaction that is rolled back, then the table is vacuumed, so "
            "every repetition starts from the same state; contenders alternate. Times are client-side wall "
            "clock (psycopg, same host)."
        ),
    )
    on_s, off_s = capture_cost(options, report)
    report.target(
        "capture cost: UPDATE 10k with trigger", "≤ 1.5× without", f"{on_s / off_s:.2f}×", on_s / off_s <= 1.5
    )
    ours, bare = expiry_sweep(options, report)
    report.target(
        "expiry sweep of 1M (10 % due)", "≤ 1.3× bare UPDATE", f"{ours / bare:.2f}×", ours / bare <= 1.3
    )
    rls, service = coordinator_read(options, report)
    report.target(
        "coordinator read under RLS, 100k rows",
        "≤ 2× service_role",
        f"{rls / service:.2f}×",
        rls / service <= 2,
    )
    report.notes.append(
        "PostgreSQL shares the 2-core machine with the benchmark client and other engineers' tests; "
        "medians of alternating runs are the reported figures."
    )
    return report
