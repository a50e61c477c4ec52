"""RetryPolicy: the 2/4/8 s schedule, Retry-After honoured and capped, jitter only when asked for."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from certsync.resilience.retry import GaveUp, RetryLater, RetryLoop, RetryPolicy, parse_retry_after
from certsync.resilience.testing import ManualClock
from certsync.settings import Settings

NOW = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)


class FixedRandom:
    """A ``random.random`` stand-in that always draws ``value`` and counts its draws."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.draws = 0

    def __call__(self) -> float:
        self.draws += 1
        return self.value


def test_default_schedule_is_2_4_8_seconds() -> None:
    assert RetryPolicy().delays() == (2.0, 4.0, 8.0)


def test_default_policy_makes_at_most_four_calls() -> None:
    assert RetryPolicy().max_attempts == 4


def test_defaults_match_the_documented_environment_defaults() -> None:
    fields = Settings.model_fields
    policy = RetryPolicy()
    assert policy.max_retries == fields["retry_max_retries"].default
    assert policy.base_delay == fields["retry_base_delay"].default
    assert policy.max_retry_after == fields["retry_max_retry_after"].default


def test_schedule_follows_base_delay_and_multiplier() -> None:
    policy = RetryPolicy(max_retries=4, base_delay=0.5, multiplier=3.0)
    assert policy.delays() == (0.5, 1.5, 4.5, 13.5)


def test_zero_retries_means_one_call_and_no_delays() -> None:
    policy = RetryPolicy(max_retries=0)
    assert policy.max_attempts == 1
    assert policy.delays() == ()


@pytest.mark.parametrize(("retry_number", "expected"), [(1, 2.0), (2, 4.0), (3, 8.0)])
def test_delay_before_retry_follows_the_schedule(retry_number: int, expected: float) -> None:
    assert RetryPolicy().delay_before_retry(retry_number, None) == expected


async def test_a_for_loop_over_the_policy_sleeps_2_4_8_on_the_injected_clock() -> None:
    clock = ManualClock()
    policy = RetryPolicy()
    for retry_number in range(1, policy.max_attempts):
        delay = policy.delay_before_retry(retry_number)
        assert delay is not None
        await clock.sleep(delay)
    assert clock.sleeps == [2.0, 4.0, 8.0]
    assert clock.now() == ManualClock().now() + timedelta(seconds=14)


def test_retry_after_replaces_the_scheduled_delay() -> None:
    assert RetryPolicy().delay_before_retry(1, retry_after=17.0) == 17.0


def test_retry_after_at_the_cap_is_honoured() -> None:
    assert RetryPolicy(max_retry_after=60.0).delay_before_retry(2, retry_after=60.0) == 60.0


def test_retry_after_beyond_the_cap_means_stop_waiting() -> None:
    assert RetryPolicy(max_retry_after=60.0).delay_before_retry(1, retry_after=60.5) is None


def test_retry_after_of_zero_means_retry_at_once() -> None:
    assert RetryPolicy().delay_before_retry(3, retry_after=0.0) == 0.0


@pytest.mark.parametrize("retry_number", [0, -1, 4])
def test_retry_number_outside_the_schedule_is_refused(retry_number: int) -> None:
    with pytest.raises(ValueError, match="retry_number"):
        RetryPolicy().delay_before_retry(retry_number)


@pytest.mark.parametrize("retry_after", [-1.0, float("nan"), float("inf")])
def test_retry_after_must_be_finite_and_not_negative(retry_after: float) -> None:
    with pytest.raises(ValueError, match="retry_after"):
        RetryPolicy().delay_before_retry(1, retry_after)


@pytest.mark.parametrize(
    ("arguments", "names"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"base_delay": -0.1}, "base_delay"),
        ({"base_delay": float("nan")}, "base_delay"),
        ({"max_retry_after": -5.0}, "max_retry_after"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": float("inf")}, "multiplier"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_invalid_arguments_are_refused_naming_the_argument(arguments: dict[str, float], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        RetryPolicy(**arguments)  # type: ignore[arg-type]


def test_policy_is_an_immutable_value() -> None:
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_retries = 5  # type: ignore[misc]
    assert policy == RetryPolicy()


def test_jitter_is_off_by_default_and_draws_nothing() -> None:
    draw = FixedRandom(0.0)
    policy = RetryPolicy(random=draw)
    assert policy.delay_before_retry(1) == 2.0
    assert draw.draws == 0


@pytest.mark.parametrize(("drawn", "expected"), [(0.0, 3.0), (0.5, 4.0), (0.75, 4.5)])
def test_jitter_spreads_the_delay_with_the_injected_random(drawn: float, expected: float) -> None:
    policy = RetryPolicy(jitter=0.25, random=FixedRandom(drawn))
    assert policy.delay_before_retry(2) == pytest.approx(expected)


def test_jitter_does_not_change_the_nominal_schedule() -> None:
    assert RetryPolicy(jitter=0.5, random=FixedRandom(0.0)).delays() == (2.0, 4.0, 8.0)


def test_jitter_is_not_applied_to_a_servers_retry_after() -> None:
    policy = RetryPolicy(jitter=1.0, random=FixedRandom(0.0))
    assert policy.delay_before_retry(1, retry_after=10.0) == 10.0


@given(
    jitter=st.floats(min_value=0.0, max_value=1.0),
    drawn=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    retry_number=st.integers(min_value=1, max_value=3),
)
def test_jittered_delay_stays_within_the_jitter_band(jitter: float, drawn: float, retry_number: int) -> None:
    policy = RetryPolicy(jitter=jitter, random=lambda: drawn)
    nominal = policy.delays()[retry_number - 1]
    delay = policy.delay_before_retry(retry_number)
    assert delay is not None
    assert nominal * (1 - jitter) - 1e-9 <= delay <= nominal * (1 + jitter) + 1e-9


# --- Retry-After header parsing -------------------------------------------------------------------


@pytest.mark.parametrize(("header", "seconds"), [("120", 120.0), (" 5 ", 5.0), ("0", 0.0), ("1.5", 1.5)])
def test_retry_after_in_seconds_is_read_as_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_retry_after_as_http_date_is_seconds_from_now() -> None:
    header = format_datetime(NOW + timedelta(seconds=45), usegmt=True)
    assert parse_retry_after(header, NOW) == 45.0


def test_retry_after_as_http_date_in_the_past_means_now() -> None:
    header = format_datetime(NOW - timedelta(minutes=5), usegmt=True)
    assert parse_retry_after(header, NOW) == 0.0


def test_retry_after_date_without_zone_is_read_as_gmt() -> None:
    assert parse_retry_after("Sun, 29 Nov 2026 10:00:30 -0000", NOW) == 30.0


def test_missing_retry_after_is_none() -> None:
    assert parse_retry_after(None, NOW) is None


@pytest.mark.parametrize("header", ["", "soon", "-5", "1e3", "Mon, 99 Foo 2026", "9" * 400])
def test_unreadable_retry_after_is_none(header: str) -> None:
    assert parse_retry_after(header, NOW) is None


def test_parse_retry_after_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_retry_after("5", datetime(2026, 11, 29, 10, 0))


class Script:
    """An attempt that answers from a script and records what it was given."""

    def __init__(self, *answers: str | RetryLater) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[int, RetryLater | None]] = []

    async def __call__(self, number: int, last: RetryLater | None) -> str | RetryLater:
        self.calls.append((number, last))
        return self.answers.pop(0)


async def test_the_loop_returns_a_first_success_without_sleeping_logging_or_asking_for_context() -> None:
    clock = ManualClock()
    attempt = Script("ok")

    def context() -> dict[str, object]:
        raise AssertionError("no line to log, so no context to build")

    with capture_logs() as logs:
        assert await RetryLoop(RetryPolicy(), clock.sleep).run(attempt, context=context) == "ok"
    assert (attempt.calls, clock.sleeps, logs) == ([(1, None)], [], [])


async def test_the_loop_waits_the_schedule_between_attempts_and_passes_the_last_answer_on() -> None:
    clock = ManualClock()
    first, second = RetryLater("HTTP 503"), RetryLater("timeout")
    attempt = Script(first, second, "ok")
    with capture_logs() as logs:
        result = await RetryLoop(RetryPolicy(), clock.sleep).run(attempt, context=lambda: {"event_id": "e1"})
    assert result == "ok"
    assert attempt.calls == [(1, None), (2, first), (3, second)]
    assert clock.sleeps == [2.0, 4.0]
    assert [(e["event"], e["retry"], e["delay"], e["after"], e["event_id"]) for e in logs] == [
        ("retry_scheduled", 1, 2.0, "HTTP 503", "e1"),
        ("retry_scheduled", 2, 4.0, "timeout", "e1"),
    ]


async def test_the_loop_gives_up_after_max_attempts() -> None:
    clock = ManualClock()
    attempt = Script(*[RetryLater(f"HTTP 503 #{n}") for n in range(1, 5)])
    result = await RetryLoop(RetryPolicy(), clock.sleep).run(attempt)
    assert result == GaveUp(
        4, RetryLater("HTTP 503 #4"), "retries exhausted after 4 attempt(s); last: HTTP 503 #4"
    )
    assert clock.sleeps == [2.0, 4.0, 8.0]


async def test_the_loop_honours_retry_after_and_gives_up_when_it_exceeds_the_cap() -> None:
    clock = ManualClock()
    too_long = RetryLater("HTTP 503", retry_after=600.0)
    attempt = Script(RetryLater("HTTP 429", retry_after=7.0), too_long)
    with capture_logs() as logs:
        result = await RetryLoop(RetryPolicy(max_retry_after=60.0), clock.sleep).run(attempt)
    assert result == GaveUp(2, too_long, "HTTP 503; Retry-After 600s exceeds the 60s cap")
    assert clock.sleeps == [7.0]
    assert logs[-1] == {
        "event": "retry_abandoned_retry_after_too_long",
        "retry_after": 600.0,
        "log_level": "warning",
    }


async def test_zero_retries_means_the_first_failure_gives_up() -> None:
    clock = ManualClock()
    result = await RetryLoop(RetryPolicy(max_retries=0), clock.sleep).run(Script(RetryLater("HTTP 503")))
    assert isinstance(result, GaveUp)
    assert (result.attempts, result.reason) == (1, "retries exhausted after 1 attempt(s); last: HTTP 503")
    assert clock.sleeps == []
