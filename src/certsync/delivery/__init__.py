"""Application services the worker, the CLI and the console share (cosmicpython's service layer).

``sync_service``  HLFDynamicsSyncService: one change through RetryPolicy × DynamicsCircuitBreaker
``requests``      what is sent for a stored certification state
``sinks``         where a delivery that could not be made is kept (the retry queue)
``replay``        replaying retry-queue entries with the certification's current state
``queue``         the retry queue as operators use it: read, replay, discard
``status``        what every process reads the same: the breaker, the outbox, the queue

They reach the portal only through the port (``certsync.dynamics.port``) and the database through
``certsync.store``; the composition root (``certsync.app``) builds them.
"""
