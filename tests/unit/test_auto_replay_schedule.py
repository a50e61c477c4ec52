"""The automatic-replay schedule and its counter: pure, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from certsync.delivery.auto_replay import AutoReplaySchedule
from certsync.metrics import ProcessMetrics
from certsync.resilience.instrumentation import AutoReplayFinished, Instrumentation

NOW = datetime(2026, 12, 2, 1, 0, tzinfo=UTC)


def test_a_failed_replay_is_followed_after_1_5_15_and_60_minutes_then_a_person_decides() -> None:
    schedule = AutoReplaySchedule()
    due = [schedule.after_failure(made, NOW) for made in range(1, 6)]
    assert due == [NOW + timedelta(minutes=m) for m in (1, 5, 15, 60)] + [None]
    assert schedule.max_replays == 5
    # The whole schedule, without cool-downs: what the pending-entry alert must allow for.
    assert sum(schedule.delays) / 60 == 81


def test_a_schedule_must_give_exactly_five_replays() -> None:
    with pytest.raises(ValueError, match="5 automatic replays"):
        AutoReplaySchedule(delays=(60.0, 300.0))


def test_automatic_replays_are_counted_by_outcome() -> None:
    metrics = ProcessMetrics()
    instrumentation = Instrumentation((metrics.observe,))
    for outcome in ("replayed", "failed", "failed", "refused"):
        instrumentation.emit(AutoReplayFinished(outcome))

    def count(outcome: str) -> float | None:
        return metrics.registry.get_sample_value("certsync_auto_replays_total", {"outcome": outcome})

    assert (count("replayed"), count("failed"), count("refused")) == (1.0, 2.0, 1.0)
    assert count("exhausted") is None
