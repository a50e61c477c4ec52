"""The operator web console: what is stuck and what to do about it, without SQL (docs/console.md)."""

from __future__ import annotations

from certsync.console.app import RuntimeFactory, create_console_app
from certsync.console.auth import ConsoleConfigurationError

__all__ = ["ConsoleConfigurationError", "RuntimeFactory", "create_console_app"]
