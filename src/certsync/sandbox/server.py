"""Serving the sandbox: in a background thread for tests and the demo, or in the foreground for the CLI."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

import uvicorn

from certsync.sandbox.app import SandboxApp, create_sandbox_app
from certsync.sandbox.state import Sandbox, SandboxConfig


def _uvicorn_config(app: SandboxApp, host: str, port: int) -> uvicorn.Config:
    # Our own structlog lines replace uvicorn's access log; uvicorn keeps its warnings and errors.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )


def _bind(host: str, port: int) -> socket.socket:
    # Binding here, not in uvicorn, is what lets port 0 hand back the port it picked. IPPROTO_TCP is
    # spelled out because asyncio only disables Nagle on accepted sockets that say so (else every
    # keep-alive response waits ~40 ms for a delayed ACK).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SandboxServer:
    """The sandbox on ``host`` and a free port (``port=0``), served by uvicorn in a daemon thread.

    ::

        with SandboxServer(SandboxConfig()) as server:
            httpx.get(f"{server.url}/api/v1/contract")
    """

    def __init__(
        self, config: SandboxConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self._app = create_sandbox_app(self.config)
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def sandbox(self) -> Sandbox:
        """The live state, for direct inspection; the admin API (``/_sandbox/…``) offers the same."""
        return self._app.sandbox

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321`` (the token URL is ``{url}/oauth2/token``)."""
        if self._port is None:
            raise RuntimeError("the sandbox is not started")
        return _url(self._host, self._port)

    def start(self, timeout: float = 10.0) -> None:
        """Bind, serve in the background, and return once uvicorn accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the sandbox is already started")
        sock = _bind(self._host, self._requested_port)
        self._port = sock.getsockname()[1]
        server = uvicorn.Server(_uvicorn_config(self._app, self._host, self._port))
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="certsync-sandbox", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("the sandbox did not start serving")
            time.sleep(0.005)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to shut down and wait for its thread; safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_sandbox(
    host: str, port: int, config: SandboxConfig, on_listening: Callable[[str], None] | None = None
) -> None:
    """Serve the sandbox in the foreground until SIGINT/SIGTERM (``certsync sandbox``).

    ``on_listening`` receives the base URL once the port is bound (``port=0`` picks a free one).
    """
    app = create_sandbox_app(config)
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    if on_listening is not None:
        on_listening(_url(host, port))
    uvicorn.Server(_uvicorn_config(app, host, port)).run(sockets=[sock])
