"""The ``certsync`` command line: thin commands that parse, build through ``app`` and call.

Each command group lives in its own module and registers itself on the root app in ``_common``;
this package only imports them, in the order ``--help`` lists them.
"""

from __future__ import annotations

from certsync.cli import migrate as _migrate  # noqa: F401  (registers `certsync migrate`)
from certsync.cli._common import cli


@cli.callback()
def _root() -> None:
    """Keeps HLF peer-mentor certifications true on the Dynamics portal.

    Configuration comes from CERTSYNC_* environment variables (and a .env file); see the README.
    """


def main() -> None:
    cli()
