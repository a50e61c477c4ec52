"""Serving an ASGI app with uvicorn: in a background thread (tests, the demo) or in the foreground (CLI).

One implementation for the sandbox and the console. We bind the socket ourselves so that port 0
hands back the port it picked, with ``IPPROTO_TCP`` spelled out: asyncio only disables Nagle on
sockets that say so, and without it every keep-alive response waits ~40 ms for a delayed ACK.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import uvicorn

Lifespan = Literal["on", "off"]


@dataclass(frozen=True, slots=True)
class Tls:
    """Serve HTTPS with this PEM certificate (chain) and key (``None``: the key is in ``certfile``)."""

    certfile: str
    keyfile: str | None = None


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def base_url(host: str, port: int, *, secure: bool = False) -> str:
    scheme = "https" if secure else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _config(app: Any, host: str, port: int, lifespan: Lifespan, tls: Tls | None = None) -> uvicorn.Config:
    # Our own structlog lines replace uvicorn's access log; uvicorn keeps its warnings and errors.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan=lifespan,
        access_log=False,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=2,
        ssl_certfile=None if tls is None else tls.certfile,
        ssl_keyfile=None if tls is None else tls.keyfile,
    )


def serve(
    app: Any,
    host: str,
    port: int,
    *,
    lifespan: Lifespan = "on",
    on_listening: Callable[[str], None] | None = None,
    tls: Tls | None = None,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; ``on_listening`` gets the URL once bound."""
    sock = bind(host, port)
    port = sock.getsockname()[1]
    if on_listening is not None:
        on_listening(base_url(host, port, secure=tls is not None))
    uvicorn.Server(_config(app, host, port, lifespan, tls)).run(sockets=[sock])


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread with its own event loop.

    ::

        with BackgroundServer(app) as server:
            httpx.get(f"{server.url}/…")
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lifespan: Lifespan = "off",
        name: str = "certsync-server",
        tls: Tls | None = None,
    ) -> None:
        self.app = app
        self._tls = tls
        self._host = host
        self._requested_port = port
        self._lifespan = lifespan
        self._name = name
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``."""
        if self._port is None:
            raise RuntimeError(f"{self._name} is not started")
        return base_url(self._host, self._port, secure=self._tls is not None)

    def start(self, timeout: float = 15.0) -> None:
        """Bind, serve in the background, and return once uvicorn accepts connections."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name} is already started")
        sock = bind(self._host, self._requested_port)
        self._port = sock.getsockname()[1]
        server = uvicorn.Server(_config(self.app, self._host, self._port, self._lifespan, self._tls))
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=self._name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"{self._name} did not start serving")
            time.sleep(0.005)

    def stop(self, timeout: float = 15.0) -> None:
        """Ask uvicorn to shut down and wait for its thread; safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
