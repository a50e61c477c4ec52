"""The sandbox's fault script: what goes wrong, for which request, decided without any I/O.

A ``FaultScript`` is a value (parsed from the admin API's JSON or the command line's options); a
``FaultEngine`` plays it against the requests as they arrive and answers each with a
``FaultDecision``. Three kinds of trouble, checked in this order for every portal request:

1. scripted steps, strictly in order: the next N requests answer a status (503, 429, 401, ...) or lose
   their connection; a step whose scope does not match the request lets it pass without using it up;
2. Dataverse-style service-protection limits: at most ``requests`` per sliding ``window_seconds`` and
   at most ``max_concurrent`` in flight, else 429 with ``Retry-After`` (whole seconds, as Dataverse
   sends it); every answer in the limit's scope says how many requests the window has left, in
   Dataverse's ``x-ms-ratelimit-burst-remaining-xrm-requests``;
3. latency, fixed or uniformly random (seeded), added to every request before it is answered.

Time comes from an injected monotonic function so that the window logic is tested without waiting.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config

Scope = Literal["any", "put", "write"]
"""Which portal requests a fault applies to: every one, only ``PUT /api/v1/certifications/{id}``, or
every ``write`` (any method but GET: contract v1's PUT and DELETE, Dataverse's PATCH, POST, DELETE)."""

Action = Literal["pass", "respond", "drop"]

CERTIFICATIONS_PATH = "/api/v1/certifications/"
TOKEN_PATH = "/oauth2/token"  # noqa: S105  (a path, not a secret)
DEFAULT_429_RETRY_AFTER = 1


class FaultScriptError(ValueError):
    """A fault script (JSON or command-line text) that cannot be played; the message says why."""


def is_certification_put(method: str, path: str) -> bool:
    return method == "PUT" and path.startswith(CERTIFICATIONS_PATH)


def in_scope(scope: Scope, method: str, path: str) -> bool:
    if scope == "write":
        return method not in ("GET", "HEAD", "OPTIONS") and not path.endswith(TOKEN_PATH)
    return scope == "any" or is_certification_put(method, path)


_STRICT = ConfigDict(extra="forbid")


@with_config(_STRICT)
@dataclass(frozen=True, slots=True)
class FaultStep:
    """The next ``times`` requests in ``scope`` answer ``status`` (or lose their connection if ``drop``).

    ``times`` of ``None`` repeats until the script is replaced or cleared (a portal that stays down).
    ``retry_after`` (seconds) is sent as ``Retry-After``; a 429 without one says 1 second.
    """

    status: Annotated[int, Field(ge=400, le=599)] | None = None
    drop: bool = False
    times: Annotated[int, Field(ge=1)] | None = 1
    retry_after: Annotated[float, Field(ge=0)] | None = None
    scope: Scope = "any"

    def __post_init__(self) -> None:
        if (self.status is None) == (not self.drop):
            raise ValueError("a step either answers a status or drops the connection, exactly one of them")

    @property
    def label(self) -> str:
        """How the request log names this fault: ``status:503`` or ``drop``."""
        return "drop" if self.drop else f"status:{self.status}"


@with_config(_STRICT)
@dataclass(frozen=True, slots=True)
class Latency:
    """Delay before answering: ``min_ms`` fixed, or uniform in [``min_ms``, ``max_ms``] when given."""

    min_ms: Annotated[float, Field(ge=0)] = 0.0
    max_ms: Annotated[float, Field(ge=0)] | None = None
    scope: Scope = "any"

    def __post_init__(self) -> None:
        if self.max_ms is not None and self.max_ms < self.min_ms:
            raise ValueError("latency max_ms must not be below min_ms")


@with_config(_STRICT)
@dataclass(frozen=True, slots=True)
class RateLimit:
    """Dataverse's service-protection limits, scaled: ``requests`` per sliding window, ``max_concurrent``.

    Only admitted requests count toward the window (a refused one does not extend the wait).
    Dataverse itself allows 6000 requests per 300 s and 52 concurrent requests per user.
    """

    requests: Annotated[int, Field(ge=1)] | None = None
    window_seconds: Annotated[float, Field(gt=0)] = 300.0
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    scope: Scope = "any"

    def __post_init__(self) -> None:
        if self.requests is None and self.max_concurrent is None:
            raise ValueError("a rate limit needs requests per window, max_concurrent, or both")


@with_config(_STRICT)
@dataclass(frozen=True, slots=True)
class FaultScript:
    """Everything that should go wrong; the empty script lets every request through untouched."""

    steps: tuple[FaultStep, ...] = ()
    latency: Latency | None = None
    rate_limit: RateLimit | None = None
    seed: int | None = None

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


_SCRIPT = TypeAdapter(FaultScript)
_STEP = TypeAdapter(FaultStep)
_RATE_LIMIT = TypeAdapter(RateLimit)


def parse_fault_script(data: object) -> FaultScript:
    """The admin API's JSON (see docs/sandbox.md) as a script; unknown or invalid fields are refused."""
    if not isinstance(data, dict):
        raise FaultScriptError("a fault script is a JSON object")
    try:
        return _SCRIPT.validate_python(data)
    except ValidationError as exc:
        raise FaultScriptError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


_STEP_TEXT = re.compile(r"^(?P<what>\d{3}|drop)(?:x(?P<times>\d+|\*))?(?:@(?P<retry_after>\d+(?:\.\d+)?))?$")


def parse_step(text: str, scope: Scope = "any") -> FaultStep:
    """Command-line form of a step: ``503x3``, ``429x1@5`` (Retry-After 5 s), ``dropx2``, ``503x*``."""
    match = _STEP_TEXT.match(text.strip().lower())
    if match is None:
        raise FaultScriptError(f"{text!r}: expected STATUS[xN][@RETRY_AFTER] or drop[xN], e.g. 503x3")
    what, times_text, retry_text = match["what"], match["times"], match["retry_after"]
    times = None if times_text == "*" else int(times_text or 1)
    step: dict[str, object] = {"times": times, "scope": scope}
    if what == "drop":
        step["drop"] = True
    else:
        step["status"] = int(what)
    if retry_text is not None:
        step["retry_after"] = float(retry_text)
    try:
        return _STEP.validate_python(step)
    except ValidationError as exc:
        raise FaultScriptError(f"{text!r}: {_first_error(exc)}") from None


def parse_latency(text: str, scope: Scope = "any") -> Latency:
    """Command-line form of latency in milliseconds: ``50`` (fixed) or ``10-200`` (uniform, seeded)."""
    low, _, high = text.strip().partition("-")
    try:
        return Latency(min_ms=float(low), max_ms=float(high) if high else None, scope=scope)
    except ValueError as exc:
        raise FaultScriptError(f"latency {text!r}: expected MS or MIN-MAX ({exc})") from None


def parse_rate_limit(text: str | None, max_concurrent: int | None, scope: Scope = "any") -> RateLimit | None:
    """Command-line form ``REQUESTS/WINDOW_SECONDS`` (e.g. ``600/30``) with an optional concurrency cap."""
    if text is None and max_concurrent is None:
        return None
    requests: int | None = None
    window = 300.0
    if text is not None:
        count, slash, seconds = text.strip().partition("/")
        try:
            requests, window = int(count), float(seconds) if slash else 300.0
        except ValueError:
            raise FaultScriptError(
                f"rate limit {text!r}: expected REQUESTS/WINDOW_SECONDS, e.g. 600/30"
            ) from None
    try:
        return _RATE_LIMIT.validate_python(
            {"requests": requests, "window_seconds": window, "max_concurrent": max_concurrent, "scope": scope}
        )
    except ValidationError as exc:
        raise FaultScriptError(f"rate limit: {_first_error(exc)}") from None


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to do with one request: let it ``pass``, ``respond`` with ``status``, or ``drop`` it.

    ``fault`` names what was applied for the request log; ``delay`` is seconds to wait first;
    ``holds_slot`` says the request counts as in flight until ``FaultEngine.finish`` is called;
    ``budget`` is how many requests the rate limit's window has left after this one (``None``: no
    request limit applies to it), sent as ``x-ms-ratelimit-burst-remaining-xrm-requests``.
    """

    action: Action
    status: int | None = None
    retry_after: int | None = None
    fault: str | None = None
    delay: float = 0.0
    holds_slot: bool = False
    budget: int | None = None


PASS = FaultDecision(action="pass")


@dataclass(slots=True)
class _PendingStep:
    step: FaultStep
    remaining: int | None


class FaultEngine:
    """Plays one ``FaultScript``; replace the script with ``load`` (which also resets the windows)."""

    def __init__(self, script: FaultScript, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self.load(script)

    def load(self, script: FaultScript) -> None:
        self._script = script
        self._pending: deque[_PendingStep] = deque(_PendingStep(step, step.times) for step in script.steps)
        self._admitted: deque[float] = deque()
        self._in_flight = 0
        # Not for security: a reproducible jitter sequence for a given seed.
        self._random = random.Random(script.seed)  # noqa: S311

    @property
    def script(self) -> FaultScript:
        return self._script

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def remaining_steps(self) -> list[dict[str, Any]]:
        """The steps still to play, with how many requests each will still take (``None``: unbounded)."""
        return [{**asdict(pending.step), "remaining": pending.remaining} for pending in self._pending]

    def decide(self, method: str, path: str) -> FaultDecision:
        """Decide the fate of one portal request (never an admin request) and account for it."""
        decision = self._scripted(method, path) or self._limited(method, path) or PASS
        delay = self._delay(method, path)
        return replace(decision, delay=delay) if delay else decision

    def finish(self, decision: FaultDecision) -> None:
        """The request decided by ``decision`` has been answered: free its concurrency slot."""
        if decision.holds_slot:
            self._in_flight -= 1

    def _scripted(self, method: str, path: str) -> FaultDecision | None:
        if not self._pending:
            return None
        pending = self._pending[0]
        step = pending.step
        if not in_scope(step.scope, method, path):
            return None
        if pending.remaining is not None:
            pending.remaining -= 1
            if pending.remaining == 0:
                self._pending.popleft()
        retry_after = step.retry_after
        if retry_after is None and step.status == 429:
            retry_after = DEFAULT_429_RETRY_AFTER
        return FaultDecision(
            action="drop" if step.drop else "respond",
            status=step.status,
            retry_after=None if retry_after is None else math.ceil(retry_after),
            fault=step.label,
        )

    def _limited(self, method: str, path: str) -> FaultDecision | None:
        limit = self._script.rate_limit
        if limit is None or not in_scope(limit.scope, method, path):
            return None
        now = self._monotonic()
        while self._admitted and self._admitted[0] <= now - limit.window_seconds:
            self._admitted.popleft()
        if limit.requests is not None and len(self._admitted) >= limit.requests:
            frees_in = self._admitted[0] + limit.window_seconds - now
            return FaultDecision(
                action="respond",
                status=429,
                retry_after=max(1, math.ceil(frees_in)),
                fault="rate_limit:window",
                budget=0,
            )
        if limit.max_concurrent is not None and self._in_flight >= limit.max_concurrent:
            return FaultDecision(
                action="respond",
                status=429,
                retry_after=DEFAULT_429_RETRY_AFTER,
                fault="rate_limit:concurrency",
                budget=self._budget(limit),
            )
        self._admitted.append(now)
        self._in_flight += 1
        return FaultDecision(action="pass", holds_slot=True, budget=self._budget(limit))

    def _budget(self, limit: RateLimit) -> int | None:
        return None if limit.requests is None else limit.requests - len(self._admitted)

    def _delay(self, method: str, path: str) -> float:
        latency = self._script.latency
        if latency is None or not in_scope(latency.scope, method, path):
            return 0.0
        if latency.max_ms is None:
            return latency.min_ms / 1000
        return self._random.uniform(latency.min_ms, latency.max_ms) / 1000
