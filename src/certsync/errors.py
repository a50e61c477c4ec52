"""The root of every error certsync raises on purpose, and what each kind means to a person.

Each subclass says once how the faces answer it: ``exit_code`` for the CLI (1 an operational
failure, 2 bad input or configuration) and ``http_status`` for the console. The CLI and the console
map errors from these two attributes alone, so a new error kind is answered the same way by both.

::

    CertsyncError
    ├── ConfigurationError          settings that cannot work together          exit 2 · 503
    ├── BadInput                    input a person can correct                   exit 2 · 422
    ├── NotFound                    a named row does not exist                   exit 2 · 404
    ├── DomainError (domain)        a change the certification rules forbid      exit 2 · 422
    ├── StoreError (store)          the database failed or lacks the schema     exit 1 · 503
    └── DynamicsError (dynamics)    the portal failed or refused                 exit 1 · 502

Pure: imports nothing of ours, so every layer may raise these.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["BadInput", "CertsyncError", "ConfigurationError", "NotFound"]


class CertsyncError(Exception):
    """Base of certsync's errors. Subclasses set ``exit_code`` and ``http_status``."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500

    def for_operator(self) -> str:
        """The one line a person reads (stderr, a console message)."""
        return str(self)


class ConfigurationError(CertsyncError):
    """Settings that cannot work together; the message names the variable."""

    exit_code = 2
    http_status = 503


class BadInput(CertsyncError, ValueError):
    """Input a person can correct; the message says what is wrong with it."""

    exit_code = 2
    http_status = 422


class NotFound(CertsyncError):
    """A row that the caller named does not exist (or is not visible to them)."""

    exit_code = 2
    http_status = 404
