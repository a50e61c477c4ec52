"""Serving the sandbox: in a background thread for tests and the demo, or in the foreground for the CLI."""

from __future__ import annotations

from collections.abc import Callable

from certsync.sandbox.app import create_sandbox_app
from certsync.sandbox.state import Sandbox, SandboxConfig
from certsync.serving import BackgroundServer, serve


class SandboxServer(BackgroundServer):
    """The sandbox on ``host`` and a free port (``port=0``), served by uvicorn in a daemon thread.

    ::

        with SandboxServer(SandboxConfig()) as server:
            httpx.get(f"{server.url}/api/v1/contract")

    ``url`` is the base URL (the token URL is ``{url}/oauth2/token``).
    """

    def __init__(
        self, config: SandboxConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self._sandbox_app = create_sandbox_app(self.config)
        super().__init__(self._sandbox_app, host=host, port=port, lifespan="off", name="certsync-sandbox")

    @property
    def sandbox(self) -> Sandbox:
        """The live state, for direct inspection; the admin API (``/_sandbox/…``) offers the same."""
        return self._sandbox_app.sandbox


def run_sandbox(
    host: str, port: int, config: SandboxConfig, on_listening: Callable[[str], None] | None = None
) -> None:
    """Serve the sandbox in the foreground until SIGINT/SIGTERM (``certsync sandbox``).

    ``on_listening`` receives the base URL once the port is bound (``port=0`` picks a free one).
    """
    serve(create_sandbox_app(config), host, port, lifespan="off", on_listening=on_listening)
