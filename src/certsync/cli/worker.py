"""``certsync worker``: runs the delivery loop in the foreground until SIGTERM/SIGINT, or once.

A stop signal only sets the worker's stop event: in-flight deliveries finish (or, past the grace
period — 30 s, or the lease if shorter — are handed back to the outbox), so no change is lost when a
supervisor restarts the process. A side task that dies (the LISTEN connection's loop, the lease
heartbeat, the access-audit recorder) stops the worker the same way, then exits 1 naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from certsync import app as composition
from certsync.cli._common import cli, fail, load_settings, out, progress_bar, run, sync_off_reason
from certsync.delivery.status import OutboxDepth
from certsync.metrics import start_worker_metrics
from certsync.worker import WorkerOptions, WorkerStats

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop`` instead of killing the loop mid-delivery.

    Signal handlers can only be installed from the main thread (a test harness may run the command
    in another one); there the command still runs, it just cannot be stopped by a signal.
    """
    loop = asyncio.get_running_loop()
    installed = []
    for signum in _STOP_SIGNALS:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def _waiting(depth: OutboxDepth) -> str:
    """``3 events wait`` / ``1 event waits``."""
    events = depth.waiting + depth.in_flight
    return f"{events} event waits" if events == 1 else f"{events} events wait"


def _print_summary(stats: WorkerStats) -> None:
    figures = [
        ("delivered", stats.delivered),
        ("queued for replay (pending)", stats.queued_pending),
        ("requires investigation", stats.queued_investigation),
        ("superseded by a newer state", stats.superseded),
        ("held while the circuit was open", stats.held),
        ("not sent (outside the portal's organisation)", stats.out_of_scope),
        ("replayed from the queue by itself", stats.auto_replayed),
        ("automatic replays that failed", stats.auto_replay_failed),
        ("old finished rows deleted", stats.pruned),
        ("expired by the sweep", stats.expired_by_sweep),
        ("rescued from a dead worker", stats.rescued),
    ]
    shown = [f"{label}: [bold]{value}[/]" for label, value in figures if value or label == "delivered"]
    out.print("  ".join(shown))


@cli.command()
def worker(
    once: Annotated[
        bool, typer.Option("--once", help="Deliver everything due now (with its retries), then exit.")
    ] = False,
    concurrency: Annotated[
        int,
        typer.Option(
            metavar="N", help="Certifications delivered at the same time (Dynamics allows 52 per user)."
        ),
    ] = WorkerOptions().concurrency,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", help="Serve Prometheus metrics on this port (0.0.0.0) while the worker runs."
        ),
    ] = None,
) -> None:
    """Deliver certification status changes to Dynamics until SIGTERM/SIGINT (graceful)."""
    if concurrency < 1:
        fail(2, f"--concurrency must be at least 1, not {concurrency}")
    if metrics_port is not None and not 0 < metrics_port < 65536:
        fail(2, f"--metrics-port must be a TCP port (1-65535), not {metrics_port}")
    settings = load_settings()
    lease = settings.worker_lease_seconds
    options = WorkerOptions(
        concurrency=concurrency,
        lease_seconds=lease,
        heartbeat_seconds=max(0.5, lease / 4),
        # The drain at shutdown must end before the claims it waits for could be rescued.
        shutdown_grace_seconds=min(WorkerOptions().shutdown_grace_seconds, lease),
    )

    async def work() -> None:
        async with composition.open_runtime(settings, max_pool_size=concurrency + 4) as rt:
            outbox = rt.outbox()
            with progress_bar() as progress:
                backlog = await outbox.depth() if once and settings.sync_enabled and out.is_terminal else None
                task = (
                    progress.add_task("delivering", total=backlog.waiting + backlog.in_flight)
                    if backlog is not None
                    else None
                )

                def on_progress(stats: WorkerStats) -> None:
                    if task is not None:
                        progress.update(task, completed=_settled(stats))

                stats = await _run_worker(rt, options, once=once, on_progress=on_progress)
            if stats is None:
                return
            _print_summary(stats)
            breaker = await rt.breaker.status()
            if not breaker.closed:
                depth = await outbox.depth()
                probe_at = breaker.next_call_at
                when = f" (next probe at {probe_at.isoformat(timespec='seconds')})" if probe_at else ""
                out.print(
                    f"[yellow]The circuit is {breaker.state}[/]{when}: {_waiting(depth)} in the"
                    " outbox for it to close; run the worker again, or see `certsync breaker status`."
                )

    async def _run_worker(
        rt: composition.Runtime,
        options: WorkerOptions,
        *,
        once: bool,
        on_progress: Callable[[WorkerStats], None],
    ) -> WorkerStats | None:
        """Run the worker; its stats, or None with the flag off (nothing was sent)."""
        outbox = rt.outbox()
        sync_worker = rt.worker(options, reconcile=not once, on_progress=on_progress)
        if not settings.sync_enabled:
            depth = await outbox.depth()
            out.print(
                f"Dynamics sync is off ({sync_off_reason(settings)}): nothing is sent;"
                f" {_waiting(depth)} in the outbox until it is turned on."
            )
        elif not once:
            out.print(
                f"Delivering to {settings.dynamics_base_url} (concurrency {concurrency}); Ctrl+C stops."
            )
        stop = asyncio.Event()
        metrics = start_worker_metrics(metrics_port, rt, sync_worker) if metrics_port else None
        try:
            with stop_on_signals(stop):
                stats = await sync_worker.run(stop, once=once)
        finally:
            if metrics is not None:
                metrics.stop()
        return stats if settings.sync_enabled else None

    run(work)


def _settled(stats: WorkerStats) -> int:
    """Events the run has finished with, one way or another (the progress of ``--once``)."""
    return (
        stats.delivered
        + stats.queued_pending
        + stats.queued_investigation
        + stats.superseded
        + stats.out_of_scope
    )
