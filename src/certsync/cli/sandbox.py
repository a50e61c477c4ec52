"""``certsync sandbox``: a local Dynamics portal in the foreground, with a fault script from the options.

``--api contract-v1`` (the default) is the contract-v1 portal (docs/sandbox.md); ``--api dataverse``
the Dataverse Web API emulator (docs/dataverse.md), optionally over TLS for HTTPS-only clients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from certsync.cli._common import cli, fail, load_settings, out
from certsync.sandbox.dataverse import API_PREFIX
from certsync.sandbox.dataverse_limits import ServiceLimits
from certsync.sandbox.dataverse_state import DataverseConfig, KeyStatus, TableMetadata
from certsync.sandbox.faults import (
    FaultScript,
    FaultScriptError,
    Scope,
    parse_latency,
    parse_rate_limit,
    parse_step,
)
from certsync.sandbox.server import run_sandbox
from certsync.sandbox.state import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TOKEN, SandboxConfig

_KEY_STATUSES: tuple[KeyStatus, ...] = ("Active", "Pending", "InProgress", "Failed")


def _fault_script(
    fail_steps: list[str],
    scope: Scope,
    latency_ms: str | None,
    seed: int | None,
    rate_limit: str | None,
    max_concurrent: int | None,
) -> FaultScript:
    latency = parse_latency(latency_ms) if latency_ms is not None else None
    limit = parse_rate_limit(rate_limit, max_concurrent)
    return FaultScript(
        steps=tuple(parse_step(text, scope) for text in fail_steps),
        latency=None if latency is None else type(latency)(latency.min_ms, latency.max_ms, scope),
        rate_limit=None
        if limit is None
        else type(limit)(limit.requests, limit.window_seconds, limit.max_concurrent, scope),
        seed=seed,
    )


def _contract_versions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FaultScriptError(
            f"--contract-versions {text!r}: expected numbers separated by commas"
        ) from None


@cli.command()
def sandbox(
    host: Annotated[str, typer.Option(metavar="HOST", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on; 0 picks a free one.")] = 8765,
    fail_steps: Annotated[
        list[str] | None,
        typer.Option(
            "--fail",
            help="Scripted fault, repeatable, played in order: STATUSxN@RETRY_AFTER or dropxN, where xN "
            "(N requests, x* until changed) and @RETRY_AFTER (seconds) are optional: 503x3, 429x1@5, drop.",
        ),
    ] = None,
    scope: Annotated[
        str,
        typer.Option(
            help="Which requests the faults hit: 'any', only the 'put', or every 'write' (not GET)."
        ),
    ] = "any",
    latency_ms: Annotated[
        str | None, typer.Option(help="Added latency in ms: fixed (50) or uniform random (10-200).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for random latency (reproducible runs).")] = None,
    rate_limit: Annotated[
        str | None,
        typer.Option(help="Service-protection limit REQUESTS/WINDOW_SECONDS, e.g. 600/30 (429 beyond it)."),
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(help="At most this many requests in flight (429 beyond it).")
    ] = None,
    token: Annotated[
        list[str] | None,
        typer.Option(help=f"Accepted static bearer token, repeatable (default: {DEFAULT_TOKEN})."),
    ] = None,
    client_id: Annotated[
        str, typer.Option(help="OAuth2 client id accepted by /oauth2/token.")
    ] = DEFAULT_CLIENT_ID,
    client_secret: Annotated[
        str, typer.Option(help="OAuth2 client secret accepted by /oauth2/token.")
    ] = DEFAULT_CLIENT_SECRET,
    token_ttl: Annotated[int, typer.Option(help="Seconds an issued token stays valid.")] = 3599,
    signing_secret: Annotated[
        str | None,
        typer.Option(help="Standard Webhooks secret (whsec_…): when set, every PUT must be signed."),
    ] = None,
    contract_versions: Annotated[
        str, typer.Option(help="Contract versions accepted, comma-separated (switchable at run time).")
    ] = "1",
    api: Annotated[
        str, typer.Option(help="Which portal: 'contract-v1' or the Dataverse Web API emulator, 'dataverse'.")
    ] = "contract-v1",
    tls_cert: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this PEM certificate (chain); needs --tls-key.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="The PEM private key of --tls-cert.")] = None,
    execution_limit: Annotated[
        float | None,
        typer.Option(help="Dataverse only: combined execution seconds per window (default 1200; 0: off)."),
    ] = None,
    refuse: Annotated[
        list[str] | None,
        typer.Option(
            help="Dataverse only: an hlf_certsyncid a plug-in refuses (400 0x80040265), repeatable."
        ),
    ] = None,
    key_status: Annotated[
        str,
        typer.Option(help="Dataverse only: the alternate key's EntityKeyIndexStatus (Active, Pending, …)."),
    ] = "Active",
) -> None:
    """Run a local Dynamics portal (contract v1, or --api dataverse) with an optional fault script."""
    load_settings()
    if api not in ("contract-v1", "dataverse"):
        fail(2, f"--api {api!r}: expected 'contract-v1' or 'dataverse'")
    if (tls_cert is None) != (tls_key is None):
        fail(2, "--tls-cert and --tls-key go together")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            fail(2, f"--tls-cert/--tls-key: {path} is not a readable file")
    if api == "dataverse":
        _run_dataverse(
            host=host,
            port=port,
            fail_steps=fail_steps or [],
            scope=scope,
            latency_ms=latency_ms,
            seed=seed,
            rate_limit=rate_limit,
            max_concurrent=max_concurrent,
            execution_limit=execution_limit,
            tokens=tuple(token) if token else (DEFAULT_TOKEN,),
            client_id=client_id,
            client_secret=client_secret,
            token_ttl=token_ttl,
            signing_secret=signing_secret,
            refuse=tuple(refuse or ()),
            key_status=key_status,
            tls=(tls_cert, tls_key),
        )
        return
    if execution_limit is not None or refuse or key_status != "Active":
        fail(2, "--execution-limit, --refuse and --key-status are for --api dataverse")
    if scope not in ("any", "put", "write"):
        fail(2, f"--scope {scope!r}: expected 'any', 'put' or 'write'")
    fault_scope: Scope = "put" if scope == "put" else "write" if scope == "write" else "any"
    try:
        config = SandboxConfig(
            static_tokens=tuple(token) if token else (DEFAULT_TOKEN,),
            client_id=client_id,
            client_secret=client_secret,
            token_ttl_seconds=token_ttl,
            signing_secret=signing_secret,
            contract_versions=_contract_versions(contract_versions),
            faults=_fault_script(fail_steps or [], fault_scope, latency_ms, seed, rate_limit, max_concurrent),
        )
    except ValueError as exc:
        fail(2, str(exc))

    def announce(url: str) -> None:
        out.print(f"Dynamics sandbox listening on [bold]{url}[/]  (Ctrl+C to stop)")
        out.print(f"  CERTSYNC_DYNAMICS_BASE_URL={url}")
        out.print(f"  CERTSYNC_DYNAMICS_TOKEN_URL={url}/oauth2/token")
        _print_credentials(config.client_id, config.client_secret, config.static_tokens)
        out.print(
            f"  admin API: {url}/_sandbox/requests, /_sandbox/faults, /_sandbox/state (docs/sandbox.md)"
        )
        if config.faults != FaultScript():
            out.print(f"  fault script: {json.dumps(config.faults.to_json_dict())}", soft_wrap=True)

    try:
        run_sandbox(host, port, config, on_listening=announce, certfile=tls_cert, keyfile=tls_key)
    except OSError as exc:
        fail(1, f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _service_limits(
    rate_limit: str | None, max_concurrent: int | None, execution_limit: float | None
) -> ServiceLimits:
    defaults = ServiceLimits()
    requests, window = defaults.requests, defaults.window_seconds
    if rate_limit is not None:
        parsed = parse_rate_limit(rate_limit, None)
        assert parsed is not None
        requests, window = parsed.requests, parsed.window_seconds
    if max_concurrent is not None and max_concurrent < 1:
        raise FaultScriptError("--max-concurrent: at least 1")
    if execution_limit is not None and execution_limit < 0:
        raise FaultScriptError("--execution-limit: seconds, 0 or more (0: off)")
    return ServiceLimits(
        requests=requests,
        window_seconds=window,
        execution_seconds=defaults.execution_seconds
        if execution_limit is None
        else (execution_limit or None),
        max_concurrent=defaults.max_concurrent if max_concurrent is None else max_concurrent,
    )


def _run_dataverse(
    *,
    host: str,
    port: int,
    fail_steps: list[str],
    scope: str,
    latency_ms: str | None,
    seed: int | None,
    rate_limit: str | None,
    max_concurrent: int | None,
    execution_limit: float | None,
    tokens: tuple[str, ...],
    client_id: str,
    client_secret: str,
    token_ttl: int,
    signing_secret: str | None,
    refuse: tuple[str, ...],
    key_status: str,
    tls: tuple[Path | None, Path | None],
) -> None:
    """``certsync sandbox --api dataverse``: the Dataverse Web API emulator in the foreground."""
    if signing_secret is not None:
        fail(2, "--signing-secret is for contract v1: Dataverse requests are not signed")
    if scope not in ("any", "write"):
        fail(2, f"--scope {scope!r}: with --api dataverse, expected 'any' or 'write'")
    status = next((known for known in _KEY_STATUSES if known == key_status), None)
    if status is None:
        fail(2, f"--key-status {key_status!r}: expected one of {', '.join(_KEY_STATUSES)}")
    fault_scope: Scope = "write" if scope == "write" else "any"
    try:
        latency = parse_latency(latency_ms, fault_scope) if latency_ms is not None else None
        config = DataverseConfig(
            static_tokens=tokens,
            client_id=client_id,
            client_secret=client_secret,
            token_ttl_seconds=token_ttl,
            metadata=TableMetadata(key_status=status),
            limits=_service_limits(rate_limit, max_concurrent, execution_limit),
            faults=FaultScript(
                steps=tuple(parse_step(text, fault_scope) for text in fail_steps), latency=latency, seed=seed
            ),
            refused=refuse,
        )
    except ValueError as exc:
        fail(2, str(exc))
    certfile, keyfile = tls

    def announce(url: str) -> None:
        out.print(f"Dataverse emulator listening on [bold]{url}[/]  (Ctrl+C to stop)")
        out.print("  CERTSYNC_DYNAMICS_API=dataverse")
        out.print(f"  CERTSYNC_DYNAMICS_BASE_URL={url}   (the Web API: {url}{API_PREFIX}/)")
        out.print(f"  CERTSYNC_DYNAMICS_TOKEN_URL={url}/oauth2/token")
        _print_credentials(client_id, client_secret, tokens)
        limits = config.limits
        out.print(
            f"  service protection: {limits.requests} requests / {limits.window_seconds:g} s, "
            f"{limits.execution_seconds} s execution, {limits.max_concurrent} concurrent"
        )
        out.print(
            f"  admin API: {url}/_sandbox/requests, /_sandbox/state, /_sandbox/faults, /_sandbox/limits,"
        )
        out.print("    /_sandbox/refuse, /_sandbox/metadata (docs/dataverse.md)")
        if config.faults != FaultScript():
            out.print(f"  fault script: {json.dumps(config.faults.to_json_dict())}", soft_wrap=True)

    try:
        run_sandbox(host, port, config, on_listening=announce, certfile=certfile, keyfile=keyfile)
    except OSError as exc:
        fail(1, f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _print_credentials(client_id: str, client_secret: str, tokens: tuple[str, ...]) -> None:
    """What the token endpoint accepts, so the next ``certsync`` command can be configured as printed:
    the client id, and the secret only when it is the sandbox's documented default (a chosen one is
    never echoed)."""
    out.print(f"  CERTSYNC_DYNAMICS_CLIENT_ID={client_id}")
    if client_secret == DEFAULT_CLIENT_SECRET:
        out.print(f"  CERTSYNC_DYNAMICS_CLIENT_SECRET={client_secret}   (the sandbox's well-known default)")
    else:
        out.print("  CERTSYNC_DYNAMICS_CLIENT_SECRET=<the one given with --client-secret>")
    if tokens == (DEFAULT_TOKEN,):
        out.print(f"  or a static CERTSYNC_DYNAMICS_TOKEN={DEFAULT_TOKEN}")
