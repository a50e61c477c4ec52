"""The ``certsync`` command line: thin commands that parse, build through ``app`` and call.

Each command group lives in its own module and registers itself on the root app in ``_common``;
this package only imports them.
"""

from __future__ import annotations

# Imported for their registration on ``cli``.
from certsync.cli import (  # noqa: F401
    backfill,
    breaker,
    console,
    contract,
    demo,
    history,
    migrate,
    queue,
    reconcile,
    renewal_events,
    sandbox,
    sweep,
    worker,
)
from certsync.cli._common import cli

__all__ = ["cli", "main"]


@cli.callback()
def _root() -> None:
    """Keeps HLF peer-mentor certifications true on the Dynamics portal.

    Configuration comes from CERTSYNC_* environment variables (and a .env file); see the README.
    """


def main() -> None:
    cli()
