"""One error root: every kind says once what the CLI exits with and what the console answers."""

from __future__ import annotations

import httpx
import pytest
import typer

import certsync.resilience as resilience
from certsync.app import portal_from
from certsync.cli._common import run
from certsync.domain.certification import InvalidRenewalEntry
from certsync.dynamics.dataverse import DataverseClient
from certsync.dynamics.errors import ContractMismatchError, TransientDynamicsError
from certsync.errors import BadInput, CertsyncError, ConfigurationError, NotFound
from certsync.resilience.testing import ManualClock
from certsync.settings import Settings
from certsync.store.errors import DatabaseUnavailable, MigrationError, SchemaMissing

TABLE = [
    (ConfigurationError("CERTSYNC_X is not set"), 2, 503),
    (BadInput("limit: too large"), 2, 422),
    (NotFound("no retry queue entry with id 7"), 2, 404),
    (InvalidRenewalEntry("schema_version missing"), 2, 422),
    (DatabaseUnavailable("database unavailable"), 1, 503),
    (SchemaMissing("run certsync migrate"), 1, 503),
    (MigrationError("0001_x.sql failed"), 1, 503),
    (TransientDynamicsError("HTTP 503 Service Unavailable", status=503), 1, 502),
    (ContractMismatchError("contract v1 not accepted", status=400), 1, 502),
]


@pytest.mark.parametrize(("error", "exit_code", "http_status"), TABLE, ids=lambda v: type(v).__name__)
def test_each_error_kind_carries_its_exit_code_and_http_status(
    error: CertsyncError, exit_code: int, http_status: int
) -> None:
    assert isinstance(error, CertsyncError)
    assert (error.exit_code, error.http_status) == (exit_code, http_status)


@pytest.mark.parametrize(("error", "exit_code", "http_status"), TABLE, ids=lambda v: type(v).__name__)
def test_the_cli_exits_with_the_code_the_error_carries(
    error: CertsyncError, exit_code: int, http_status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fails() -> None:
        raise error

    with pytest.raises(typer.Exit) as exited:
        run(fails)
    assert exited.value.exit_code == exit_code
    assert error.for_operator() in capsys.readouterr().err.replace("\n", " ")


def test_a_portal_error_reads_as_the_portals_to_an_operator() -> None:
    assert (
        TransientDynamicsError("timeout: ReadTimeout").for_operator()
        == "Dynamics portal: timeout: ReadTimeout"
    )


async def test_the_dataverse_wire_builds_the_dataverse_adapter() -> None:
    settings = Settings(
        _env_file=None,
        dynamics_base_url="https://hlf.crm4.dynamics.com",
        dynamics_token="t",
        dynamics_api="dataverse",
    )
    async with httpx.AsyncClient() as http:
        assert isinstance(portal_from(settings, http, ManualClock()), DataverseClient)


def test_resilience_exports_the_seeds_names() -> None:
    for name in ("RetryPolicy", "DynamicsCircuitBreaker", "CircuitState", "SendGate", "ManualClock"):
        assert name in resilience.__all__
        assert getattr(resilience, name).__module__.startswith("certsync.resilience.")
