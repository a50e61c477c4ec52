"""The local Dynamics portals with scriptable faults, for integration tests, demo, operators.

Contract v1 (docs/sandbox.md: ``SandboxConfig``, ``create_sandbox_app``) and the Dataverse Web API
emulator (docs/dataverse.md: ``DataverseConfig``, ``create_dataverse_app``). ``SandboxServer`` serves
either in a background thread; ``run_sandbox`` in the foreground.
"""

from __future__ import annotations

from certsync.sandbox.app import create_sandbox_app
from certsync.sandbox.dataverse import create_dataverse_app
from certsync.sandbox.dataverse_limits import ServiceLimits
from certsync.sandbox.dataverse_state import DataverseConfig, DataverseEmulator, TableMetadata
from certsync.sandbox.faults import FaultScript, FaultScriptError, FaultStep, Latency, RateLimit
from certsync.sandbox.server import SandboxServer, run_sandbox
from certsync.sandbox.state import RecordedRequest, Sandbox, SandboxConfig

__all__ = [
    "DataverseConfig",
    "DataverseEmulator",
    "FaultScript",
    "FaultScriptError",
    "FaultStep",
    "Latency",
    "RateLimit",
    "RecordedRequest",
    "Sandbox",
    "SandboxConfig",
    "SandboxServer",
    "ServiceLimits",
    "TableMetadata",
    "create_dataverse_app",
    "create_sandbox_app",
    "run_sandbox",
]
