"""Pure resilience primitives: the clock, the retry schedule, the circuit breaker, the send gate, and the
delivery events they emit. No I/O and nothing of ours but each other.

The seed's names are exported here; the transition helpers the stores share stay in their modules.
"""

from certsync.resilience.breaker import (
    DYNAMICS_BREAKER,
    BreakerSnapshot,
    BreakerStatus,
    BreakerStore,
    CircuitOpenError,
    CircuitState,
    DynamicsCircuitBreaker,
    InMemoryBreakerStore,
    Transition,
)
from certsync.resilience.clock import Clock, Sleep, SystemClock, real_sleep
from certsync.resilience.gate import SendGate
from certsync.resilience.instrumentation import DeliveryEvent, Hook, Instrumentation
from certsync.resilience.retry import GaveUp, RetryLater, RetryLoop, RetryPolicy, parse_retry_after
from certsync.resilience.testing import ManualClock

__all__ = [
    "DYNAMICS_BREAKER",
    "BreakerSnapshot",
    "BreakerStatus",
    "BreakerStore",
    "CircuitOpenError",
    "CircuitState",
    "Clock",
    "DeliveryEvent",
    "DynamicsCircuitBreaker",
    "GaveUp",
    "Hook",
    "InMemoryBreakerStore",
    "Instrumentation",
    "ManualClock",
    "RetryLater",
    "RetryLoop",
    "RetryPolicy",
    "SendGate",
    "Sleep",
    "SystemClock",
    "Transition",
    "parse_retry_after",
    "real_sleep",
]
