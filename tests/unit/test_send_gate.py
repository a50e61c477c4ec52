"""SendGate: a 429 pauses every sender until its Retry-After has passed on the injected clock."""

from __future__ import annotations

from certsync.resilience.gate import SendGate
from certsync.resilience.testing import ManualClock


async def test_an_unpaused_gate_lets_callers_through_without_sleeping() -> None:
    clock = ManualClock()
    gate = SendGate(clock, clock.sleep)
    await gate.wait()
    assert clock.sleeps == []
    assert gate.remaining() == 0.0


async def test_a_paused_gate_holds_callers_until_the_pause_ends() -> None:
    clock = ManualClock()
    gate = SendGate(clock, clock.sleep)
    gate.pause_for(5.0, reason="HTTP 429")
    clock.advance(2.0)
    await gate.wait()
    assert clock.sleeps == [3.0]
    assert gate.remaining() == 0.0


async def test_a_shorter_pause_never_shortens_a_longer_one() -> None:
    clock = ManualClock()
    gate = SendGate(clock, clock.sleep)
    gate.pause_for(10.0, reason="first 429")
    gate.pause_for(1.0, reason="second 429")
    assert gate.remaining() == 10.0


async def test_a_longer_pause_extends_the_current_one() -> None:
    clock = ManualClock()
    gate = SendGate(clock, clock.sleep)
    gate.pause_for(1.0, reason="first 429")
    gate.pause_for(4.0, reason="second 429")
    await gate.wait()
    assert clock.sleeps == [4.0]
