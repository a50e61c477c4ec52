"""``certsync sandbox``: the local Dynamics portal in the foreground, with a fault script from the options."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from certsync.cli._common import cli, fail, load_settings, out
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
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 8765,
    fail_steps: Annotated[
        list[str] | None,
        typer.Option(
            "--fail",
            help="Scripted fault, repeatable, played in order: STATUSxN@RETRY_AFTER or dropxN, where xN "
            "(N requests, x* until changed) and @RETRY_AFTER (seconds) are optional: 503x3, 429x1@5, drop.",
        ),
    ] = None,
    scope: Annotated[
        str, typer.Option(help="Which requests the faults hit: 'any' portal request or only the 'put'.")
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
) -> None:
    """Run the local Dynamics sandbox portal (contract v1) with an optional fault script."""
    load_settings()
    if scope not in ("any", "put"):
        fail(2, f"--scope {scope!r}: expected 'any' or 'put'")
    fault_scope: Scope = "put" if scope == "put" else "any"
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
        out.print(
            f"  admin API: {url}/_sandbox/requests, /_sandbox/faults, /_sandbox/state (docs/sandbox.md)"
        )
        if config.faults != FaultScript():
            out.print(f"  fault script: {json.dumps(config.faults.to_json_dict())}", soft_wrap=True)

    try:
        run_sandbox(host, port, config, on_listening=announce)
    except OSError as exc:
        fail(1, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
