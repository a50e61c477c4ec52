"""Delivery events and the hooks that consume them: what the metrics count, whatever the log level.

Modelled on stamina's instrumentation hooks, without its process-global registry: the composition root
builds one ``Instrumentation`` per process and passes it to the parts that emit (the HTTP exchange,
the retry loop, the breaker, the sync service); Prometheus (``certsync.metrics.ProcessMetrics``) adds
itself as a hook. Log lines stay with the code that writes them; what is counted no longer depends on
whether a line passed ``CERTSYNC_LOG_LEVEL``.

A hook is called synchronously and must not raise; one that does is logged and the delivery goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

__all__ = [
    "AttemptFailed",
    "AutoReplayFinished",
    "CircuitTransitioned",
    "DeliveryEvent",
    "DeliveryFinished",
    "Hook",
    "Instrumentation",
    "RequestFinished",
    "RetryScheduled",
]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """One HTTP exchange with the portal or its token endpoint: its status, or no answer at all."""

    method: str
    status: int | None
    seconds: float


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """A call to the portal failed; ``error`` is the error class (``TransientDynamicsError``, …)."""

    error: str


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    retry: int
    delay: float


@dataclass(frozen=True, slots=True)
class DeliveryFinished:
    """An operation ended: delivered (after ``attempts`` calls), or kept in the retry queue."""

    outcome: Literal["delivered", "pending", "requires_investigation"]
    attempts: int


@dataclass(frozen=True, slots=True)
class CircuitTransitioned:
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class AutoReplayFinished:
    """The worker replayed a pending retry-queue entry by itself (``delivery/auto_replay.py``).

    ``outcome``: replayed, failed (due again later), exhausted (waits for a person now),
    requires_investigation, refused (the open circuit refused it before any call), skipped."""

    outcome: str


DeliveryEvent = (
    RequestFinished
    | AttemptFailed
    | RetryScheduled
    | DeliveryFinished
    | CircuitTransitioned
    | AutoReplayFinished
)
Hook = Callable[[DeliveryEvent], None]


class Instrumentation:
    """The hooks of one process. ``emit`` calls each in turn; with none, it does nothing."""

    __slots__ = ("_hooks",)

    def __init__(self, hooks: tuple[Hook, ...] = ()) -> None:
        self._hooks: tuple[Hook, ...] = hooks

    def add(self, hook: Hook) -> None:
        if hook not in self._hooks:
            self._hooks = (*self._hooks, hook)

    def remove(self, hook: Hook) -> None:
        self._hooks = tuple(h for h in self._hooks if h != hook)

    def emit(self, event: DeliveryEvent) -> None:
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:  # a counting bug must never cost a delivery
                log.exception("instrumentation_hook_failed", event=type(event).__name__)
