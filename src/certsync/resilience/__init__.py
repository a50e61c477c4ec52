"""Pure resilience primitives: the Clock protocol, RetryPolicy, DynamicsCircuitBreaker."""
