"""Store errors: driver failures wrapped so callers never import psycopg to handle them."""

from __future__ import annotations

from certsync.errors import CertsyncError, NotFound

__all__ = ["DatabaseUnavailable", "MigrationError", "NotFound", "SchemaMissing", "StoreError", "first_line"]


class StoreError(CertsyncError):
    """Base of every operational error the store raises (exit 1, HTTP 503)."""

    http_status = 503


class DatabaseUnavailable(StoreError):
    """The database could not be reached or started (an operational failure, exit code 1)."""


class SchemaMissing(StoreError):
    """The database has not been migrated (an operational failure: run ``certsync migrate``)."""


class MigrationError(StoreError):
    """A migration file failed to apply; the message names the file."""


def first_line(exc: BaseException) -> str:
    """The first line of a driver error: enough to say what failed, without a multi-line dump."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
