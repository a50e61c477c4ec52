"""``certsync contract check``: does the configured portal accept what certsync sends?"""

from __future__ import annotations

from rich.markup import escape

from certsync import app as composition
from certsync.cli._common import cli, err, fail, load_settings, out, run
from certsync.cli._help import CertsyncTyper

contract_cli = CertsyncTyper(
    name="contract", help="The wire contract with the Dynamics portal.", no_args_is_help=True
)
cli.add_typer(contract_cli)


@contract_cli.command()
def check() -> None:
    """Ask the portal whether it accepts what certsync sends; exit 1 naming each problem if not.

    Contract v1: GET /api/v1/contract lists the versions it accepts. Dataverse
    (CERTSYNC_DYNAMICS_API=dataverse): the table's metadata (EntityDefinitions) must hold every column
    certsync writes, with its type, and an active alternate key on hlf_certsyncid.
    """
    settings = load_settings()
    result = run(lambda: composition.check_portal_contract(settings))
    if not result.accepted:
        for problem in (p for p in result.problems if p not in result.summary):
            err.print(f"  - {escape(problem)}", highlight=False)
        fail(1, f"{result.endpoint}: {result.summary}")
    out.print(f"[bold green]OK[/]: {result.endpoint} {result.summary}.")
