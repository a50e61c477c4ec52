"""The one gate every request to the portal passes: a shared pause after a 429, and pacing before one.

* **pause** (``pause_for`` / ``wait``): a 429's Retry-After holds every sender of this process.
* **pace** (``acquire`` / ``release``, around each HTTP exchange): sends wait while the window's budget
  the portal reports (``x-ms-ratelimit-burst-remaining-xrm-requests``), or a configured limit, is spent.

Why it counts the way it does (sliding windows, overtaken requests, the lone probe) is in
``docs/architecture.md`` § "The send gate". Time is injected.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from certsync.resilience.clock import Clock, Sleep

log = structlog.get_logger(__name__)

DATAVERSE_WINDOW_SECONDS = 300.0
"""Dataverse evaluates its request-count limit over a five-minute sliding window."""

SLOT_MARGIN_SECONDS = 0.001
"""A slot is taken to free this long after ``window_seconds`` past its answer: the portal's own clock
and rounding decide the exact instant, and a request sent on the boundary itself may still count."""


@dataclass(frozen=True, slots=True)
class SendPermit:
    """One request let through by ``SendGate.acquire``; hand it back to ``release`` when answered."""

    seq: int


@dataclass(frozen=True, slots=True)
class _Report:
    """The latest budget the portal reported, and what is needed to age it."""

    seq: int  # the permit whose answer carried it
    remaining: int
    sent: float  # when the reporting request was let through: the portal counted it after this
    at: float  # when its answer arrived: the portal counted it before this
    logged: int  # own requests logged (ever) when it arrived, the reporting request included


@dataclass(frozen=True, slots=True)
class _Answered:
    sent: float
    answered: float
    budgeted: bool = False  # its answer carried a budget: the portal's limit surely counted it


class SendGate:
    """Holds senders while paused (a 429) or while the portal's remaining budget is spent."""

    def __init__(
        self,
        clock: Clock,
        sleep: Sleep,
        *,
        window_seconds: float = DATAVERSE_WINDOW_SECONDS,
        max_requests_per_window: int | None = None,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if max_requests_per_window is not None and max_requests_per_window < 1:
            raise ValueError("max_requests_per_window must be at least 1 (or None: no configured limit)")
        self._clock = clock
        self._sleep = sleep
        self._window = window_seconds
        self._max_requests = max_requests_per_window
        self._paused_until: datetime | None = None
        self._epoch = clock.now()
        self._seq = 0
        self._in_flight: dict[int, float] = {}  # permit seq -> when it was let through
        self._answered: deque[_Answered] = deque()  # own admitted requests in the window, by answer
        self._pruned = 0  # how many entries have left ``_answered`` (aged out of the window)
        self._report: _Report | None = None
        self._aged = 0  # requests surely counted in the report that have left the window since
        self._maybe_aged = 0  # requests that may have been counted in it and have left the window
        self._since_report = 0  # requests the report may not include: in flight at it, or sent after it
        self._overtaken: set[int] = set()  # in flight at the report but sent before the reporting one
        # Admitted answers while requests are in flight: (permit seq, answered, remaining reported).
        self._recent_answers: deque[tuple[int, float, int | None]] = deque()
        # What the portal's reports tell of its limit, for one process: at least what one had left plus
        # the own requests it surely counted, at most that plus those it may have counted (None: no report).
        self._limit_floor: int | None = None
        self._budgeted_sent: list[float] = []  # heap: sends of logged requests answered with a budget
        self._log_at_send: dict[int, tuple[int, int]] = {}  # permit seq -> (logged, pruned) when it was sent
        self._unlogged_until = 0.0  # until then, requests answered before the log began may be in the window
        self._changed = asyncio.Event()
        self._pacing = False

    # --- pause: a 429 holds everyone ---------------------------------------------------------------

    @property
    def paused_until(self) -> datetime | None:
        return self._paused_until

    def pause_for(self, seconds: float, reason: str) -> None:
        """Extend the pause to ``now + seconds`` (never shortens a longer pause already in force)."""
        until = self._clock.now() + timedelta(seconds=max(0.0, seconds))
        if self._paused_until is None or until > self._paused_until:
            self._paused_until = until
            log.warning("sending_paused", seconds=round(seconds, 3), reason=reason)

    def remaining(self) -> float:
        """Seconds left of the current pause (0.0 when not paused)."""
        if self._paused_until is None:
            return 0.0
        return max(0.0, (self._paused_until - self._clock.now()).total_seconds())

    async def wait(self) -> None:
        """Return at once when not paused; otherwise sleep until the pause (possibly extended) ends."""
        while (left := self.remaining()) > 0:
            await self._sleep(left)

    # --- pacing: spend the portal's budget, never more ---------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def available(self) -> int | None:
        """Requests that may still be sent in the window now; ``None`` when nothing limits them."""
        self._prune(self._seconds())
        return _smallest(self._reported_available(), self._configured_available())

    async def acquire(self) -> SendPermit:
        """Wait out any pause and until the budget allows one more request; then count it as sent."""
        while True:
            await self.wait()
            now = self._seconds()
            self._prune(now)
            go, wake_at, probe = self._decide(now)
            if go:
                break
            if not self._pacing:
                self._pacing = True
                report = self._report
                log.debug(
                    "sending_paced",
                    in_flight=len(self._in_flight),
                    reported=None if report is None else report.remaining,
                    aged=self._aged,
                    since_report=self._since_report,
                    frees_in=None if wake_at is None else round(wake_at - now, 3),
                )
            # Whole microseconds, rounded up: the clock's resolution, so a wake is never just too early.
            await self._until_changed(None if wake_at is None else math.ceil((wake_at - now) * 1e6) / 1e6)
        if self._pacing:
            self._pacing = False
            log.debug("sending_resumed")
        if probe:
            self._maybe_aged -= 1
        self._seq += 1
        self._in_flight[self._seq] = self._seconds()
        self._log_at_send[self._seq] = (self._pruned + len(self._answered), self._pruned)
        self._since_report += 1
        return SendPermit(self._seq)

    def release(self, permit: SendPermit, *, remaining: int | None = None, admitted: bool = True) -> None:
        """The request of ``permit`` is over: answered (``admitted`` unless refused with 429) or failed.

        ``remaining`` is the budget the portal reported with the answer, if it reported one.
        """
        sent = self._in_flight.pop(permit.seq, None)
        if sent is None:
            return
        log_at_send = self._log_at_send.pop(permit.seq)
        now = self._seconds()
        self._prune(now)
        # The log only serves a budget (reported or configured): without one, keeping a window's worth
        # of requests (hundreds of thousands at a high rate) would buy nothing. Requests answered before
        # a first report are then missing from its accounting, which errs towards waiting: the probe
        # finds out.
        if admitted and (self._report is not None or remaining is not None or self._max_requests is not None):
            self._answered.append(_Answered(sent, now, budgeted=remaining is not None))
            if remaining is not None:
                heapq.heappush(self._budgeted_sent, sent)
        elif admitted:
            self._unlogged_until = now + self._window + SLOT_MARGIN_SECONDS
        if remaining is not None and admitted:
            self._learn_limit_floor(max(0, remaining), log_at_send, now)
        report = self._report
        if remaining is not None and (report is None or permit.seq > report.seq):
            self._report = _Report(
                seq=permit.seq,
                remaining=max(0, remaining),
                sent=sent,
                at=now,
                logged=self._pruned + len(self._answered),
            )
            self._aged = self._maybe_aged = 0
            # Requests sent before this one and answered while it was in flight may have reached the
            # portal after it, and then the report does not count them either: unless an answer shows
            # more left than the report (so it was counted before it), each counts against it too.
            after_it = sum(
                1
                for seq, answered, left in self._recent_answers
                if seq < permit.seq and answered > sent and (left is None or left <= remaining)
            )
            self._since_report = len(self._in_flight) + after_it
            self._overtaken = {seq for seq in self._in_flight if seq < permit.seq}
        elif permit.seq in self._overtaken:
            self._overtaken.discard(permit.seq)
            assert report is not None
            # Counted after the report, its answer could show at most the report's budget plus what has
            # left the window since, less itself; more than that, and the portal counted it before.
            counted_before = (
                remaining is not None and remaining >= report.remaining + self._aged + self._maybe_aged
            )
            if not admitted or counted_before:
                self._since_report -= 1  # refused, or the portal counted it before the report
        if admitted and self._in_flight and self._report is not None:  # only a reported budget needs them
            self._recent_answers.append((permit.seq, now, remaining))
        if self._recent_answers:
            self._forget_answers()
        self._changed.set()
        self._changed = asyncio.Event()

    def _forget_answers(self) -> None:
        """Drop the answers that arrived before every request now in flight was sent: no report still to
        come can have been overtaken by them."""
        recent = self._recent_answers
        oldest_send = min(self._in_flight.values(), default=math.inf)
        while recent and recent[0][1] <= oldest_send:
            recent.popleft()

    def _reported_available(self) -> int | None:
        report = self._report
        if report is None:
            return None
        return report.remaining + self._aged - self._since_report

    def _learn_limit_floor(self, remaining: int, log_at_send: tuple[int, int], at: float) -> None:
        """What an admitted answer (``remaining`` left, arriving at ``at``; the newest entry of the log)
        tells of the limit, were this process the portal's only client.

        At least ``remaining`` plus the own requests the portal surely counted when it admitted this one:
        itself, and those answered before it was sent (so admitted before it) and sent less than a window
        before its answer (so still in the window then), counting only answers that carried a budget
        (surely within the limit's scope). At most ``remaining`` plus every own request it may have
        counted: those still logged or in flight, and those that left the window after it was sent.
        The upper bound is kept too: when other clients share the limit, the floor falls to what this
        process may use, rather than outlasting the evidence.
        """
        logged_at_send, pruned_at_send = log_at_send
        # Sent after ``since``: surely still in the window when this one was admitted (the margin keeps
        # clock rounding on the boundary from counting one the portal had already let go).
        heap, since = self._budgeted_sent, at - self._window + SLOT_MARGIN_SECONDS
        while heap and heap[0] <= since:
            heapq.heappop(heap)
        # In the heap but answered after this one was sent, this one included: not surely before it.
        later = min(self._pruned + len(self._answered) - logged_at_send, len(self._answered))
        concurrent = sum(
            1
            for index in range(len(self._answered) - later, len(self._answered))
            if self._answered[index].budgeted and self._answered[index].sent > since
        )
        surely = remaining + len(heap) - concurrent + 1
        maybe = remaining + len(self._answered) + len(self._in_flight) + self._pruned - pruned_at_send
        self._limit_floor = min(max(self._limit_floor or 0, surely), maybe)

    def _floor_available(self, now: float) -> int:
        """Slots the learned floor of the limit proves free now: every own request that may still be in
        the window is logged (or in flight), so the portal can count no more of ours than that."""
        if self._limit_floor is None or now < self._unlogged_until:
            return 0
        return self._limit_floor - len(self._answered) - len(self._in_flight)

    def _configured_available(self) -> int | None:
        if self._max_requests is None:
            return None
        return self._max_requests - len(self._answered) - len(self._in_flight)

    def _decide(self, now: float) -> tuple[bool, float | None, bool]:
        """Whether one more request may go now; if not, when a slot frees (``None``: at an answer);
        and whether it goes as a probe on a slot that may have freed."""
        blocked: list[float | None] = []
        probe = False
        reported = self._reported_available()
        if reported is not None and reported <= 0:
            report = self._report
            assert report is not None
            # Only own requests that were in the window when the budget was reported free a slot of it.
            frees_at = self._oldest_expiry() if self._pruned < report.logged else None
            if not self._in_flight and self._floor_available(now) > 0:
                # The report counted a request of ours that has left the window since (one that left
                # while the reporting request was in flight, or one it cannot tell it counted): the
                # limit's floor proves a slot free. One goes, and its answer reports afresh.
                pass
            elif not self._in_flight and (self._maybe_aged > 0 or frees_at is None):
                # A request that may have been counted has left the window, or nothing else can tell:
                # one request goes alone, and its answer brings a fresh budget.
                probe = self._maybe_aged > 0
            else:
                blocked.append(frees_at)
        configured = self._configured_available()
        if configured is not None and configured <= 0:
            blocked.append(self._oldest_expiry())
        if not blocked:
            return True, None, probe
        known = [moment for moment in blocked if moment is not None]
        return False, min(known) if known else None, False

    def _oldest_expiry(self) -> float | None:
        return self._answered[0].answered + self._window + SLOT_MARGIN_SECONDS if self._answered else None

    def _prune(self, now: float) -> None:
        answered, window, report = self._answered, self._window, self._report
        while answered and answered[0].answered + window + SLOT_MARGIN_SECONDS <= now:
            entry = answered.popleft()
            if report is not None and self._pruned < report.logged:
                # Sent within the margin of a window before the report counts as neither: on the
                # boundary the portal's clock and rounding decide, and one that had let it go reported
                # without it, so freeing its slot (or probing for it) drew a 429 (found by hypothesis,
                # test_send_gate_pacing). Leaving it out only waits for the next slot that frees.
                if entry.sent > report.at - window + SLOT_MARGIN_SECONDS:
                    self._aged += 1  # it reached the portal less than a window before the report
                elif entry.sent > report.sent - window + SLOT_MARGIN_SECONDS:
                    self._maybe_aged += 1  # it may have, depending on when each reached the portal
            self._pruned += 1

    def _seconds(self) -> float:
        return (self._clock.now() - self._epoch).total_seconds()

    async def _until_changed(self, delay: float | None) -> None:
        """Until an answer changes the accounting, or ``delay`` seconds (on the injected sleep) pass."""
        changed = self._changed.wait()
        if delay is None:
            await changed
            return
        waiters = {asyncio.ensure_future(changed), asyncio.ensure_future(self._sleep(max(0.0, delay)))}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


def _smallest(*values: int | None) -> int | None:
    known = [value for value in values if value is not None]
    return min(known) if known else None
