"""Peak memory of the operator's bulk commands over a retry queue of 100k entries.

``certsync queue list --json --limit 0`` and ``certsync queue replay --all`` run as the operator runs
them: child processes of the installed console script, configured by environment variables. The
peak resident set size comes from the kernel (``wait4``'s ``ru_maxrss`` for that child); psutil samples
the RSS while it runs to show whether it grows with the number of entries handled.

The peak is measured on the command alone: ``/usr/bin/time -f %M`` forks it from a small process. (A
``wait4`` on a child forked straight from this benchmark reports this process's own size, inherited at
fork, before the command's ``exec``.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
import psycopg

from bench import Options, fresh_database, sandbox_process
from bench._report import Report
from bench.bench_database import seed_certifications
from certsync.sandbox.state import DEFAULT_TOKEN

TARGET_MB = 150.0
CERTSYNC = Path(sys.executable).with_name("certsync")
GNU_TIME = "/usr/bin/time"


@dataclass(slots=True)
class Measured:
    peak_mb: float
    seconds: float
    exit_code: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, RSS MB)


def measure(argv: list[str], env: dict[str, str], *, stdout: int | IO[str], time_limit: float) -> Measured:
    """Run ``argv``, sample its RSS, stop it (SIGINT, as an operator's Ctrl+C) after ``time_limit``.

    The peak is the kernel's high-water mark of the command itself: ``/usr/bin/time``'s ``%M`` when it
    exists (its small process is what forks the command, so the figure is not inflated by a fork of
    this large benchmark process), else the last ``VmHWM`` sampled from /proc.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as cwd:  # no stray .env is read
        peak_file = Path(cwd) / "peak-kib"
        wrapped = [GNU_TIME, "-f", "%M", "-o", str(peak_file), *argv] if Path(GNU_TIME).exists() else argv
        child = subprocess.Popen(wrapped, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.DEVNULL)
        samples: list[tuple[float, float]] = []
        high_water = [0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    process = psutil.Process(child.pid)
                    target = (process.children() or [process])[0] if wrapped is not argv else process
                    samples.append((time.monotonic() - started, target.memory_info().rss / 2**20))
                    status = Path(f"/proc/{target.pid}/status").read_text()
                    hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
                    high_water[0] = max(high_water[0], int(hwm.split()[1]) / 1024)
                except (psutil.Error, OSError, StopIteration):
                    pass
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def interrupt() -> None:
            # SIGINT to the command itself (time's child), as Ctrl+C in a terminal would reach it.
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(child.pid)
                for target in process.children() or [process]:
                    target.send_signal(signal.SIGINT)

        timer = threading.Timer(time_limit, interrupt)
        timer.start()
        exit_code = child.wait()
        timer.cancel()
        done.set()
        sampler.join()
        peak = high_water[0]
        if peak_file.exists():
            text = peak_file.read_text().strip().splitlines()
            # GNU time writes "Command terminated by signal 2" / "exited with non-zero status" first.
            peak = int(text[-1]) / 1024 if text and text[-1].isdigit() else peak
            if text and "status" in text[0]:
                exit_code = int(text[0].rsplit(" ", 1)[-1])
            elif text and "signal" in text[0]:
                exit_code = 128 + int(text[0].rsplit(" ", 1)[-1])
    return Measured(peak, time.monotonic() - started, exit_code, samples)


def seed_queue(url: str, entries: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        seed_certifications(conn, entries // 10, 10)
        conn.execute(
            """
            insert into public.dynamics_sync_retry_queue
              (operation_type, certification_id, payload_json, failure_reason, attempt_count, status,
               failure_history)
            select 'certification.status_changed', c.id,
                   jsonb_build_object('contract_version', 1, 'event_id', gen_random_uuid(),
                                      'occurred_at', '2026-11-29T10:00:00Z',
                                      'certification', private.certification_sync_state(c),
                                      'publicly_listed', false),
                   'retries exhausted after 4 attempt(s); last: HTTP 503 Service Unavailable', 4, 'pending',
                   jsonb_build_array(jsonb_build_object('at', now(), 'reason', 'HTTP 503 Service Unavailable',
                                                        'attempts', 4, 'status', 'pending'))
            from public.certifications c
            """
        )
        conn.execute("vacuum analyze public.dynamics_sync_retry_queue")


def run(options: Options) -> Report:
    entries = 10_000 if options.quick else 100_000
    replay_limit = 15.0 if options.quick else 45.0
    results: dict[str, Measured] = {}
    with fresh_database(options, "certsync_bench_memory") as url, sandbox_process() as portal:
        seed_queue(url, entries)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CERTSYNC_")},
            "CERTSYNC_DATABASE_URL": url,
            "CERTSYNC_LOG_FORMAT": "json",
            "CERTSYNC_DYNAMICS_BASE_URL": portal,
            "CERTSYNC_DYNAMICS_TOKEN": DEFAULT_TOKEN,
        }
        results["certsync --help (imports only)"] = measure(
            [str(CERTSYNC), "--help"], env, stdout=subprocess.DEVNULL, time_limit=60
        )
        with tempfile.TemporaryFile("w+") as listing:
            results["certsync queue list --json --limit 0"] = measure(
                [str(CERTSYNC), "queue", "list", "--json", "--limit", "0"],
                env,
                stdout=listing,
                time_limit=300,
            )
            listing.seek(0)
            listed = sum(1 for line in listing if line.startswith("{"))
        results["certsync queue replay --all"] = measure(
            [str(CERTSYNC), "queue", "replay", "--all", "--by", "bench"],
            env,
            stdout=subprocess.DEVNULL,
            time_limit=replay_limit,
        )
        with psycopg.connect(url) as conn:
            replayed = conn.execute(
                "select count(*) from public.dynamics_sync_retry_queue where status = 'replayed'"
            ).fetchone()
    replayed_count = int(replayed[0]) if replayed else 0
    replay = results["certsync queue replay --all"]
    listing_run = results["certsync queue list --json --limit 0"]
    report = Report(
        name="memory",
        title=f"Peak RSS of bulk queue commands over {entries:,} retry-queue entries",
        method=(
            f"{entries:,} pending retry-queue entries (each with its full request body and one failure "
            "history item). Each command runs as a child process of the installed `certsync` script, "
            "configured by environment; peak RSS is the kernel's high-water mark of the command "
            "(`/usr/bin/time -f %M`), and psutil samples RSS every 0.25 s. The replay sends to the "
            "sandbox (own process, no faults); it "
            f"is sequential, so it is stopped with SIGINT (an operator's Ctrl+C) after {replay_limit:.0f} s "
            "and the RSS samples show whether memory grows with the entries handled."
        ),
    )
    rows = []
    for name, measured in results.items():
        samples = measured.samples
        quarter = measured.seconds / 4
        early = next((rss for at, rss in samples if at >= quarter), samples[0][1] if samples else 0.0)
        late = samples[-1][1] if samples else 0.0
        rows.append(
            (
                name,
                f"{measured.peak_mb:.1f}",
                f"{early:.1f} → {late:.1f}",
                f"{measured.seconds:.1f}",
                str(measured.exit_code),
            )
        )
    report.table(
        "Child processes",
        ("command", "peak RSS MB", "RSS at ¼ of the run → last sample", "seconds", "exit"),
        rows,
    )
    report.table(
        "Entries handled",
        ("command", "entries"),
        [
            ("queue list --json: JSON objects written", f"{listed:,} of {entries:,}"),
            (
                f"queue replay --all: replayed within {replay_limit:.0f} s",
                f"{replayed_count:,} of {entries:,}",
            ),
        ],
    )
    report.target(
        f"queue list --json of {entries:,} entries",
        "peak RSS ≤ 150 MB",
        f"{listing_run.peak_mb:.1f} MB",
        listing_run.peak_mb <= TARGET_MB and listed == entries,
    )
    report.target(
        f"bulk replay of {entries:,} entries",
        "peak RSS ≤ 150 MB",
        f"{replay.peak_mb:.1f} MB over the first {replayed_count:,} entries",
        replay.peak_mb <= TARGET_MB,
    )
    report.notes += [
        "The replay is bounded in time, not run to the end: it is sequential (one entry's read, delivery "
        "through the breaker and outcome record at a time), so 100k entries would take many minutes; "
        "it pages through the queue 500 entries at a time, and the RSS samples above show whether memory "
        "grows with the entries handled.",
        "Exit code 130 for the replay is the SIGINT that ended it; `certsync --help` is the floor: "
        "what importing the CLI and its dependencies costs before any work.",
    ]
    return report
