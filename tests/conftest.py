"""Shared fixtures: a real PostgreSQL database per test, cloned from a migrated template, and the
sandbox portal on a free loopback port."""

from __future__ import annotations

import json
import logging
import os
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


# An xdist worker starts with ``COLUMNS=80`` in its environment where the run itself had none. Rich reads
# ``COLUMNS`` once, when the CLI's consoles are created (at import), which pins their width at 80: a
# command's ``env={"COLUMNS": ...}`` would no longer apply. So the run (the xdist controller, whose
# environment the workers inherit) records its own values, and each worker takes them back on, here,
# before any test module or conftest below this one imports the CLI.
_TERMINAL_SIZE = ("COLUMNS", "LINES")
_RUN_TERMINAL_SIZE = "CERTSYNC_TEST_RUN_TERMINAL_SIZE"
if "PYTEST_XDIST_WORKER" in os.environ:
    for _name, _value in json.loads(os.environ.get(_RUN_TERMINAL_SIZE, "{}")).items():
        if _value is None:
            os.environ.pop(_name, None)
        else:
            os.environ[_name] = _value
else:
    os.environ[_RUN_TERMINAL_SIZE] = json.dumps({name: os.environ.get(name) for name in _TERMINAL_SIZE})


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the xdist_group marks into groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``): the tests of the fault suite's
    own PostgreSQL (``private_server``) share one worker, so only one such server is started; and the
    ``slow`` tests are handed out first, so that no long test starts last and runs alone at the end:
    those marked ``slow`` one by one (a single long test, such as the 10k-entry replay) before those of
    modules marked ``slow`` as a whole (suites of shorter ones). A run without xdist keeps the
    collection order."""
    if not hasattr(config, "workerinput"):
        return
    for item in items:
        if "private_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("private_server"))

    def order(item: pytest.Item) -> tuple[bool, bool]:
        slow_alone = any(mark.name == "slow" for mark in item.own_markers)
        return (item.get_closest_marker("slow") is None, not slow_alone)

    items.sort(key=order)  # stable: within each rank, the collection order


_UNGROUPED = pytest.StashKey[set[str]]()


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")  # after xdist groups
def pytest_check_xdist_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Find the tests that ``--dist loadgroup`` did not group: they could run at once on two workers (the
    demo tests would drop each other's ``certsync_demo`` database), so each fails at setup instead. xdist
    groups by renaming each marked item's node id to ``…@group``; pytest 9.2's structured node ids
    silently undid that (pytest-dev/pytest-xdist#1386), which is why pyproject.toml holds pytest below
    9.2. (Raising here instead would crash the worker without showing why.)"""
    if getattr(config.option, "loadgroup", False):
        config.stash[_UNGROUPED] = {
            item.nodeid
            for item in items
            if item.get_closest_marker("xdist_group") is not None
            and "@" not in item.nodeid.rpartition("]")[2]
        }


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.nodeid in item.config.stash.get(_UNGROUPED, set()):
        pytest.fail(
            "--dist loadgroup did not put this xdist_group test in its group, so it may run at once with"
            " the others: see pytest-dev/pytest-xdist#1386 and the pytest pin in pyproject.toml",
            pytrace=False,
        )


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
