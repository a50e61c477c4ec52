"""The embedded PostgreSQL (pgserver) a newcomer's laptop uses when no database URL is configured."""

from __future__ import annotations

import warnings
from pathlib import Path

import platformdirs
import structlog

from certsync.store.errors import DatabaseUnavailable

log = structlog.get_logger(__name__)


def default_data_dir() -> Path:
    """``<user data dir>/certsync/pgdata``; reused across runs so data survives."""
    return Path(platformdirs.user_data_dir("certsync", appauthor=False)) / "pgdata"


def embedded_database_url(data_dir: Path | None = None) -> str:
    """Start (or reuse) the embedded server and return its connection URL.

    pgserver leaves the server running after this process exits (``cleanup_mode=None``), so the next
    command reconnects in milliseconds instead of starting PostgreSQL again.
    """
    with warnings.catch_warnings():
        # platformdirs warns about XDG_RUNTIME_DIR on servers without a login session; harmless here.
        warnings.simplefilter("ignore")
        import pgserver  # noqa: PLC0415  (heavy, and needed only without CERTSYNC_DATABASE_URL)

    path = data_dir or default_data_dir()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(str(path), cleanup_mode=None)  # type: ignore[attr-defined]
    except Exception as exc:  # pgserver raises plain exceptions of several kinds
        raise DatabaseUnavailable(f"could not start the embedded PostgreSQL in {path}: {exc}") from exc
    log.info("embedded_postgres_ready", data_dir=str(path))
    return str(server.get_uri())
