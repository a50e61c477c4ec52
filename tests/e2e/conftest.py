"""Browser tests: the console served by uvicorn on a free loopback port, driven in Debian's headless
Chromium by Playwright (``playwright install`` cannot download here; the system browser is used)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from certsync.app import open_runtime
from certsync.console import create_console_app
from certsync.sandbox.server import SandboxServer
from certsync.serving import BackgroundServer
from tests.support.console import console_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
def console_url(database_url: str, sandbox: SandboxServer) -> Iterator[str]:
    # The lifespan opens the runtime on the server's own loop, where its pool must live.
    settings = console_settings(database_url, sandbox)
    app = create_console_app(lambda: open_runtime(settings), settings)
    with BackgroundServer(app, lifespan="on", name="certsync-console") as server:
        yield server.url


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; the browser tests skip, saying why, only when it is not installed."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install -y chromium): browser tests need it"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, java_script_enabled=False)
    opened = await context.new_page()
    opened.set_default_timeout(15_000)
    yield opened
    await context.close()
