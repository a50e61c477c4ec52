"""Shared fixtures: a real PostgreSQL database per test, cloned from a migrated template, and the
sandbox portal on a free loopback port."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from certsync.sandbox.server import SandboxServer
from certsync.sandbox.state import SandboxConfig
from certsync.store.pool import Pool, open_pool
from tests.support.databases import (
    admin_url,
    create_database,
    create_migrated_template,
    drop_database,
    unique_name,
)

# The RLS fixtures (superuser, api, hierarchy, world) for every module that needs them; a module's own
# fixture of the same name (the console tests' `api`) still takes precedence.
pytest_plugins = ["tests.support.rls", "tests.support.entra"]


@pytest.fixture(autouse=True)
def _isolated_logging() -> Iterator[None]:
    """Each test starts from structlog's defaults; a command that configured it cannot leak out.

    Debug lines (the sandbox's one per request) are dropped, so a failing test's captured output shows
    what the code under test said rather than hundreds of request lines.
    """
    structlog.reset_defaults()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    return admin_url()


@pytest.fixture(scope="session")
def template_database(pg_admin_url: str) -> Iterator[str]:
    name = create_migrated_template(pg_admin_url)
    yield name
    drop_database(pg_admin_url, name)


@pytest.fixture
def database_url(pg_admin_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test; dropped afterwards."""
    name = unique_name("certsync_test")
    url = create_database(pg_admin_url, name, template=template_database)
    yield url
    drop_database(pg_admin_url, name)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    p = await open_pool(database_url, max_size=4)
    yield p
    await p.close()


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    """The sandbox portal (certsync.sandbox) on a free loopback port, with no faults loaded."""
    with SandboxServer(SandboxConfig()) as server:
        yield server
