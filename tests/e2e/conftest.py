"""Browser tests: the console served by uvicorn on a free loopback port, driven in Debian's headless
Chromium by Playwright (``playwright install`` cannot download here; the system browser is used)."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.async_api import Browser, Page, async_playwright

from certsync.app import open_runtime
from certsync.console import create_console_app
from certsync.sandbox.server import SandboxServer, _bind, _url
from certsync.settings import Settings
from tests.integration.test_console_api import console_settings
from tests.integration.test_worker import sandbox

__all__ = ["sandbox"]

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


class ConsoleServer:
    """The console in a daemon thread with its own event loop, its runtime opened by the lifespan.

    Like ``SandboxServer``, but with the lifespan on: the console's pool must live on the server's loop.
    """

    def __init__(self, settings: Settings) -> None:
        self._app = create_console_app(lambda: open_runtime(settings), settings)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> None:
        sock = _bind("127.0.0.1", 0)
        self.url = _url("127.0.0.1", sock.getsockname()[1])
        config = uvicorn.Config(
            self._app, lifespan="on", access_log=False, log_config=None, log_level="warning"
        )
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="certsync-console", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the console did not start serving")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(15.0)


@pytest.fixture
def console_url(database_url: str, sandbox: SandboxServer) -> Iterator[str]:
    server = ConsoleServer(console_settings(database_url, sandbox))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


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
