"""The local Dynamics portal (contract v1) with scriptable faults, for integration tests, demo, operators.

See docs/sandbox.md. ``SandboxServer`` serves it in a background thread; ``run_sandbox`` in the
foreground; ``create_sandbox_app`` is the bare ASGI app.
"""

from __future__ import annotations

from certsync.sandbox.app import create_sandbox_app
from certsync.sandbox.faults import FaultScript, FaultScriptError, FaultStep, Latency, RateLimit
from certsync.sandbox.server import SandboxServer, run_sandbox
from certsync.sandbox.state import RecordedRequest, Sandbox, SandboxConfig

__all__ = [
    "FaultScript",
    "FaultScriptError",
    "FaultStep",
    "Latency",
    "RateLimit",
    "RecordedRequest",
    "Sandbox",
    "SandboxConfig",
    "SandboxServer",
    "create_sandbox_app",
    "run_sandbox",
]
