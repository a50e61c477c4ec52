"""Serving a sandbox: in a background thread for tests and the demo, or in the foreground for the CLI.

One server for both portals: a ``SandboxConfig`` serves contract v1 (``sandbox/app.py``), a
``DataverseConfig`` the Dataverse emulator (``sandbox/dataverse.py``). Optional TLS (a certificate and
key in PEM files) lets an HTTPS-only client such as Microsoft's Dataverse SDK talk to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from certsync.sandbox.app import create_sandbox_app
from certsync.sandbox.dataverse import create_dataverse_app
from certsync.sandbox.dataverse_state import DataverseConfig, DataverseEmulator
from certsync.sandbox.state import Sandbox, SandboxConfig
from certsync.serving import BackgroundServer, Tls, serve


def _app(config: SandboxConfig | DataverseConfig) -> Any:
    if isinstance(config, DataverseConfig):
        return create_dataverse_app(config)
    return create_sandbox_app(config)


def _tls(certfile: Path | str | None, keyfile: Path | str | None) -> Tls | None:
    if certfile is None:
        if keyfile is not None:
            raise ValueError("a TLS key needs its certificate")
        return None
    return Tls(certfile=str(certfile), keyfile=None if keyfile is None else str(keyfile))


class SandboxServer(BackgroundServer):
    """A sandbox on ``host`` and a free port (``port=0``), served by uvicorn in a daemon thread.

    ::

        with SandboxServer(SandboxConfig()) as server:
            httpx.get(f"{server.url}/api/v1/contract", headers={"Authorization": "Bearer sandbox-token"})

        with SandboxServer(DataverseConfig(), certfile=pem, keyfile=key) as server:
            server.url  # https://127.0.0.1:…; the Web API is {url}/api/data/v9.2/

    ``url`` is the base URL (the token URL is ``{url}/oauth2/token``).
    """

    def __init__(
        self,
        config: SandboxConfig | DataverseConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        certfile: Path | str | None = None,
        keyfile: Path | str | None = None,
    ) -> None:
        self.config = config if config is not None else SandboxConfig()
        self._sandbox_app = _app(self.config)
        super().__init__(
            self._sandbox_app,
            host=host,
            port=port,
            lifespan="off",
            name="certsync-sandbox",
            tls=_tls(certfile, keyfile),
        )

    @property
    def sandbox(self) -> Sandbox:
        """The contract-v1 sandbox's live state; the admin API (``/_sandbox/…``) offers the same."""
        sandbox = getattr(self._sandbox_app, "sandbox", None)
        if not isinstance(sandbox, Sandbox):
            raise TypeError("this server runs the Dataverse emulator: use .dataverse")
        return sandbox

    @property
    def dataverse(self) -> DataverseEmulator:
        """The Dataverse emulator's live state; the admin API (``/_sandbox/…``) offers the same."""
        emulator = getattr(self._sandbox_app, "emulator", None)
        if not isinstance(emulator, DataverseEmulator):
            raise TypeError("this server runs the contract-v1 sandbox: use .sandbox")
        return emulator


def run_sandbox(
    host: str,
    port: int,
    config: SandboxConfig | DataverseConfig,
    on_listening: Callable[[str], None] | None = None,
    *,
    certfile: Path | str | None = None,
    keyfile: Path | str | None = None,
) -> None:
    """Serve a sandbox in the foreground until SIGINT/SIGTERM (``certsync sandbox``).

    ``on_listening`` receives the base URL once the port is bound (``port=0`` picks a free one).
    """
    serve(_app(config), host, port, lifespan="off", on_listening=on_listening, tls=_tls(certfile, keyfile))
