"""Fixtures for the client's unit tests: respx routes behind an httpx transport, and a manual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from certsync.resilience.testing import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def http(router: respx.Router) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client whose every request is answered by the test module's ``router`` fixture."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(router.async_handler)) as client:
        yield client
