"""Store errors: driver failures wrapped so callers never import psycopg to handle them."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises."""


class DatabaseUnavailable(StoreError):
    """The database could not be reached or started (an operational failure, exit code 1)."""


class SchemaMissing(StoreError):
    """The database has not been migrated (an operational failure: run ``certsync migrate``)."""


class MigrationError(StoreError):
    """A migration file failed to apply; the message names the file."""


class NotFound(StoreError):
    """A row that the caller named does not exist (or is not visible to them)."""


def first_line(exc: BaseException) -> str:
    """The first line of a driver error: enough to say what failed, without a multi-line dump."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
