"""The sandbox's fault script as pure logic: scripted steps, service-protection limits, latency, parsing."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import certsync.cli.sandbox as sandbox_cli
from certsync.cli._common import cli
from certsync.resilience.testing import ManualClock
from certsync.sandbox.dataverse_limits import Admission, Refusal, ServiceLimits, ServiceProtection
from certsync.sandbox.dataverse_state import DataverseConfig
from certsync.sandbox.faults import (
    FaultEngine,
    FaultScript,
    FaultScriptError,
    FaultStep,
    Latency,
    RateLimit,
    parse_fault_script,
    parse_latency,
    parse_rate_limit,
    parse_step,
)
from certsync.sandbox.state import SandboxConfig

PUT = ("PUT", "/api/v1/certifications/6f1c0000-0000-0000-0000-000000000001")
CONTRACT = ("GET", "/api/v1/contract")


def engine(script: FaultScript, clock: ManualClock | None = None) -> FaultEngine:
    clock = clock or ManualClock()
    return FaultEngine(script, monotonic=lambda: clock.now().timestamp())


def statuses(faults: FaultEngine, count: int, request: tuple[str, str] = PUT) -> list[int | None]:
    answers = []
    for _ in range(count):
        decision = faults.decide(*request)
        faults.finish(decision)
        answers.append(decision.status if decision.action == "respond" else None)
    return answers


# scripted steps ------------------------------------------------------------------------------------


def test_the_next_n_requests_answer_the_scripted_status_then_requests_pass() -> None:
    faults = engine(FaultScript(steps=(FaultStep(status=503, times=3),)))

    assert statuses(faults, 5) == [503, 503, 503, None, None]


def test_steps_play_strictly_in_order() -> None:
    faults = engine(FaultScript(steps=(FaultStep(status=500, times=1), FaultStep(status=408, times=2))))

    assert statuses(faults, 4) == [500, 408, 408, None]


def test_a_put_scoped_step_lets_other_requests_pass_without_using_it_up() -> None:
    faults = engine(FaultScript(steps=(FaultStep(status=503, times=1, scope="put"),)))

    assert statuses(faults, 2, CONTRACT) == [None, None]
    assert statuses(faults, 2, PUT) == [503, None]


def test_an_unbounded_step_repeats_until_the_script_is_replaced() -> None:
    faults = engine(FaultScript(steps=(FaultStep(status=503, times=None),)))
    assert statuses(faults, 50) == [503] * 50

    faults.load(FaultScript())

    assert statuses(faults, 1) == [None]


def test_a_scripted_429_without_retry_after_says_one_second() -> None:
    faults = engine(FaultScript(steps=(FaultStep(status=429),)))

    decision = faults.decide(*PUT)

    assert (decision.status, decision.retry_after, decision.fault) == (429, 1, "status:429")


def test_a_fractional_retry_after_is_rounded_up_to_whole_seconds() -> None:
    faults = engine(FaultScript(steps=(FaultStep(status=503, retry_after=2.2),)))

    assert faults.decide(*PUT).retry_after == 3


def test_a_drop_step_decides_to_drop_the_connection() -> None:
    faults = engine(FaultScript(steps=(FaultStep(drop=True),)))

    decision = faults.decide(*PUT)

    assert (decision.action, decision.status, decision.fault) == ("drop", None, "drop")


def test_remaining_steps_count_down() -> None:
    faults = engine(FaultScript(steps=(FaultStep(status=503, times=3), FaultStep(drop=True))))
    statuses(faults, 2)

    assert [(step["status"], step["remaining"]) for step in faults.remaining_steps()] == [(503, 1), (None, 1)]


# service-protection limits ------------------------------------------------------------------------


def test_the_window_refuses_beyond_n_requests_until_the_oldest_leaves_it() -> None:
    clock = ManualClock()
    faults = engine(FaultScript(rate_limit=RateLimit(requests=3, window_seconds=10)), clock)
    for _ in range(3):
        faults.finish(faults.decide(*PUT))
        clock.advance(2)

    refused = faults.decide(*PUT)  # 6 s after the first: it leaves the window in 4 s
    clock.advance(4)
    admitted = faults.decide(*PUT)

    assert (refused.status, refused.retry_after, refused.fault) == (429, 4, "rate_limit:window")
    assert admitted.action == "pass"


def test_refused_requests_do_not_extend_the_window() -> None:
    clock = ManualClock()
    faults = engine(FaultScript(rate_limit=RateLimit(requests=1, window_seconds=10)), clock)
    faults.finish(faults.decide(*PUT))
    for _ in range(5):
        clock.advance(1)
        assert faults.decide(*PUT).status == 429

    clock.advance(5)

    assert faults.decide(*PUT).action == "pass"


def test_the_concurrency_cap_refuses_while_slots_are_held_and_admits_once_one_finishes() -> None:
    faults = engine(FaultScript(rate_limit=RateLimit(max_concurrent=2)))
    first, second = faults.decide(*PUT), faults.decide(*PUT)

    refused = faults.decide(*PUT)
    faults.finish(first)
    admitted = faults.decide(*PUT)

    assert second.action == "pass"
    assert (refused.status, refused.retry_after, refused.fault) == (429, 1, "rate_limit:concurrency")
    assert admitted.action == "pass"
    assert faults.in_flight == 2


def test_every_decision_under_the_window_says_how_many_requests_it_has_left() -> None:
    clock = ManualClock()
    faults = engine(FaultScript(rate_limit=RateLimit(requests=2, window_seconds=10, max_concurrent=5)), clock)

    first = faults.decide(*PUT)
    second = faults.decide(*PUT)
    refused = faults.decide(*PUT)
    clock.advance(10)
    admitted = faults.decide(*PUT)

    assert [first.budget, second.budget, refused.budget, admitted.budget] == [1, 0, 0, 1]
    assert faults.decide("GET", "/api/v1/contract").budget == 0  # scope "any": every request counts


def test_a_concurrency_refusal_still_reports_the_windows_budget_and_no_request_limit_reports_none() -> None:
    faults = engine(FaultScript(rate_limit=RateLimit(requests=10, window_seconds=10, max_concurrent=1)))
    faults.decide(*PUT)
    refused = faults.decide(*PUT)
    assert (refused.fault, refused.budget) == ("rate_limit:concurrency", 9)

    only_concurrency = engine(FaultScript(rate_limit=RateLimit(max_concurrent=1)))
    assert only_concurrency.decide(*PUT).budget is None
    assert engine(FaultScript()).decide(*PUT).budget is None


def test_put_scoped_limits_report_nothing_for_other_requests() -> None:
    faults = engine(FaultScript(rate_limit=RateLimit(requests=5, window_seconds=10, scope="put")))
    assert faults.decide("GET", "/api/v1/contract").budget is None
    assert faults.decide(*PUT).budget == 4


def test_a_scripted_fault_takes_precedence_and_does_not_count_toward_the_window() -> None:
    faults = engine(
        FaultScript(steps=(FaultStep(status=503),), rate_limit=RateLimit(requests=1, window_seconds=60))
    )

    assert statuses(faults, 3) == [503, None, 429]


def test_replacing_the_script_resets_the_window() -> None:
    script = FaultScript(rate_limit=RateLimit(requests=1, window_seconds=60))
    faults = engine(script)
    statuses(faults, 1)

    faults.load(script)

    assert statuses(faults, 1) == [None]


# latency ------------------------------------------------------------------------------------------


def test_fixed_latency_delays_every_request_in_scope() -> None:
    faults = engine(FaultScript(latency=Latency(min_ms=250, scope="put")))

    assert faults.decide(*PUT).delay == 0.25
    assert faults.decide(*CONTRACT).delay == 0.0


def test_random_latency_stays_in_bounds_and_repeats_for_the_same_seed() -> None:
    script = FaultScript(latency=Latency(min_ms=10, max_ms=200), seed=7)

    one, two = engine(script), engine(script)
    run_one = [one.decide(*PUT).delay for _ in range(20)]
    run_two = [two.decide(*PUT).delay for _ in range(20)]

    assert run_one == run_two
    assert all(0.010 <= delay <= 0.200 for delay in run_one)
    assert len(set(run_one)) > 1


def test_latency_applies_to_scripted_faults_too() -> None:
    faults = engine(FaultScript(steps=(FaultStep(status=503),), latency=Latency(min_ms=100)))

    decision = faults.decide(*PUT)

    assert (decision.status, decision.delay) == (503, 0.1)


# the JSON script ----------------------------------------------------------------------------------


def test_a_json_script_parses_into_the_same_values() -> None:
    script = parse_fault_script(
        {
            "steps": [
                {"status": 503, "times": 3},
                {"drop": True},
                {"status": 429, "retry_after": 2, "scope": "put"},
            ],
            "latency": {"min_ms": 5, "max_ms": 50},
            "rate_limit": {"requests": 600, "window_seconds": 30, "max_concurrent": 52},
            "seed": 1,
        }
    )

    assert script == FaultScript(
        steps=(
            FaultStep(status=503, times=3),
            FaultStep(drop=True),
            FaultStep(status=429, retry_after=2, scope="put"),
        ),
        latency=Latency(min_ms=5, max_ms=50),
        rate_limit=RateLimit(requests=600, window_seconds=30, max_concurrent=52),
        seed=1,
    )
    assert parse_fault_script(script.to_json_dict()) == script


def test_an_empty_json_object_clears_every_fault() -> None:
    assert parse_fault_script({}) == FaultScript()


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        ({"steps": [{"status": 503, "drop": True}]}, "exactly one"),
        ({"steps": [{}]}, "exactly one"),
        ({"steps": [{"status": 200}]}, "greater than or equal to 400"),
        ({"steps": [{"status": 503, "times": 0}]}, "greater than or equal to 1"),
        ({"steps": [{"status": 503, "scope": "get"}]}, "steps.0.scope"),
        ({"steps": [{"status": 503, "time": 3}]}, "steps.0.time"),
        ({"rate_limit": {"window_seconds": 5}}, "requests per window"),
        ({"latency": {"min_ms": 50, "max_ms": 10}}, "max_ms"),
        ({"faults": []}, "faults"),
        ([{"status": 503}], "JSON object"),
    ],
)
def test_an_invalid_json_script_is_refused_saying_why(data: Any, complaint: str) -> None:
    with pytest.raises(FaultScriptError, match=complaint):
        parse_fault_script(data)


# the command-line forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "step"),
    [
        ("503", FaultStep(status=503, times=1)),
        ("503x3", FaultStep(status=503, times=3)),
        ("429x2@5", FaultStep(status=429, times=2, retry_after=5)),
        ("503x*", FaultStep(status=503, times=None)),
        ("drop", FaultStep(drop=True)),
        ("DROPx2", FaultStep(drop=True, times=2)),
    ],
)
def test_command_line_steps(text: str, step: FaultStep) -> None:
    assert parse_step(text) == step


@pytest.mark.parametrize("text", ["", "503x", "x3", "5033", "200x1", "503x0", "teapot"])
def test_a_malformed_command_line_step_is_refused(text: str) -> None:
    with pytest.raises(FaultScriptError):
        parse_step(text)


def test_command_line_latency_and_rate_limit() -> None:
    assert parse_latency("50") == Latency(min_ms=50)
    assert parse_latency("10-200", "put") == Latency(min_ms=10, max_ms=200, scope="put")
    assert parse_rate_limit("600/30", 52) == RateLimit(requests=600, window_seconds=30, max_concurrent=52)
    assert parse_rate_limit(None, 52) == RateLimit(max_concurrent=52)
    assert parse_rate_limit(None, None) is None
    with pytest.raises(FaultScriptError):
        parse_rate_limit("600 per 30", None)


# `certsync sandbox` -------------------------------------------------------------------------------


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, SandboxConfig]]:
    """Captures what the command would serve instead of blocking on a real server."""
    calls: list[tuple[str, int, SandboxConfig]] = []

    def fake_run(host: str, port: int, config: SandboxConfig, on_listening: Any = None, **tls: Any) -> None:
        calls.append((host, port, config))
        on_listening(f"http://{host}:{port}")

    monkeypatch.setattr(sandbox_cli, "run_sandbox", fake_run)
    return calls


def test_the_command_builds_its_fault_script_and_credentials_from_the_options(
    started: list[tuple[str, int, SandboxConfig]],
) -> None:
    args = ["sandbox", "--port", "9001", "--fail", "503x3", "--fail", "429x1@5", "--scope", "put"]
    args += ["--rate-limit", "600/30", "--max-concurrent", "52", "--latency-ms", "10-20", "--seed", "3"]
    args += ["--token", "t1", "--client-id", "me", "--client-secret", "s3cret", "--contract-versions", "1,2"]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:9001" in result.output
    [(host, port, config)] = started
    assert (host, port) == ("127.0.0.1", 9001)
    assert config.faults == FaultScript(
        steps=(
            FaultStep(status=503, times=3, scope="put"),
            FaultStep(status=429, retry_after=5, scope="put"),
        ),
        latency=Latency(min_ms=10, max_ms=20, scope="put"),
        rate_limit=RateLimit(requests=600, window_seconds=30, max_concurrent=52, scope="put"),
        seed=3,
    )
    assert (config.static_tokens, config.client_id, config.client_secret) == (("t1",), "me", "s3cret")
    assert config.contract_versions == (1, 2)


def test_the_command_prints_the_credentials_the_next_command_needs(
    started: list[tuple[str, int, SandboxConfig]],
) -> None:
    """A first use: what `certsync sandbox` prints is enough for `certsync contract check` to pass."""
    result = CliRunner().invoke(cli, ["sandbox"])

    assert result.exit_code == 0, result.output
    for line in (
        "CERTSYNC_DYNAMICS_TOKEN_URL=http://127.0.0.1:8765/oauth2/token",
        "CERTSYNC_DYNAMICS_CLIENT_ID=certsync",
        "CERTSYNC_DYNAMICS_CLIENT_SECRET=sandbox-secret",
        "CERTSYNC_DYNAMICS_TOKEN=sandbox-token",
    ):
        assert line in result.output


def test_the_command_never_prints_the_secrets_it_was_given(
    started: list[tuple[str, int, SandboxConfig]],
) -> None:
    secret = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LXRoYXQtaXMtbG9uZw=="

    result = CliRunner().invoke(cli, ["sandbox", "--client-secret", "hush-hush", "--signing-secret", secret])

    assert result.exit_code == 0, result.output
    assert "hush-hush" not in result.output
    assert secret not in result.output


@pytest.mark.parametrize(
    "bad",
    [
        ["--fail", "299x1"],
        ["--rate-limit", "lots"],
        ["--scope", "get"],
        ["--signing-secret", "not base64!"],
        ["--contract-versions", "one"],
    ],
)
def test_the_command_refuses_bad_options_with_exit_code_2(
    started: list[tuple[str, int, SandboxConfig]], bad: list[str]
) -> None:
    result = CliRunner().invoke(cli, ["sandbox", *bad])

    assert result.exit_code == 2
    assert started == []


# `certsync sandbox --api dataverse` -----------------------------------------------------------------


@pytest.fixture
def started_dataverse(monkeypatch: pytest.MonkeyPatch) -> list[tuple[DataverseConfig, dict[str, Any]]]:
    calls: list[tuple[DataverseConfig, dict[str, Any]]] = []

    def fake_run(host: str, port: int, config: DataverseConfig, on_listening: Any = None, **tls: Any) -> None:
        calls.append((config, tls))
        on_listening(f"http://{host}:{port}")

    monkeypatch.setattr(sandbox_cli, "run_sandbox", fake_run)
    return calls


def test_the_dataverse_command_builds_limits_faults_and_refusals_and_says_what_to_set(
    started_dataverse: list[tuple[DataverseConfig, dict[str, Any]]],
) -> None:
    args = [
        "sandbox",
        "--api",
        "dataverse",
        "--port",
        "9002",
        "--rate-limit",
        "120/6",
        "--max-concurrent",
        "4",
    ]
    args += [
        "--execution-limit",
        "0",
        "--fail",
        "503x2",
        "--scope",
        "write",
        "--refuse",
        "abc",
        "--key-status",
        "Pending",
    ]

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 0, result.output
    [(config, tls)] = started_dataverse
    assert config.limits == ServiceLimits(
        requests=120, window_seconds=6, execution_seconds=None, max_concurrent=4
    )
    assert config.faults.steps == (FaultStep(status=503, times=2, scope="write"),)
    assert (config.refused, config.metadata.key_status) == (("abc",), "Pending")
    assert tls == {"certfile": None, "keyfile": None}
    for line in (
        "CERTSYNC_DYNAMICS_API=dataverse",
        "CERTSYNC_DYNAMICS_BASE_URL=http://127.0.0.1:9002",
        "CERTSYNC_DYNAMICS_TOKEN_URL=http://127.0.0.1:9002/oauth2/token",
        "CERTSYNC_DYNAMICS_CLIENT_ID=certsync",
        "CERTSYNC_DYNAMICS_CLIENT_SECRET=sandbox-secret",
    ):
        assert line in result.output


def test_the_dataverse_command_keeps_dataverse_s_own_limits_and_hides_a_chosen_secret(
    started_dataverse: list[tuple[DataverseConfig, dict[str, Any]]],
) -> None:
    result = CliRunner().invoke(cli, ["sandbox", "--api", "dataverse", "--client-secret", "hush-hush"])

    assert result.exit_code == 0, result.output
    [(config, _)] = started_dataverse
    assert config.limits == ServiceLimits()
    assert "hush-hush" not in result.output


@pytest.mark.parametrize(
    "bad",
    [
        ["--api", "soap"],
        ["--api", "dataverse", "--scope", "put"],
        ["--api", "dataverse", "--key-status", "Sleeping"],
        ["--api", "dataverse", "--signing-secret", "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LXRoYXQtaXMtbG9uZw=="],
        ["--api", "dataverse", "--rate-limit", "lots"],
        ["--api", "dataverse", "--tls-cert", "/no/such/cert.pem", "--tls-key", "/no/such/key.pem"],
        ["--api", "dataverse", "--tls-cert", "/no/such/cert.pem"],
        ["--refuse", "abc"],
    ],
)
def test_the_dataverse_command_refuses_bad_options_with_exit_code_2(
    started_dataverse: list[tuple[DataverseConfig, dict[str, Any]]], bad: list[str]
) -> None:
    result = CliRunner().invoke(cli, ["sandbox", *bad])

    assert result.exit_code == 2, result.output
    assert started_dataverse == []


# Dataverse's service-protection limits, without any HTTP ------------------------------------------


def test_the_request_window_slides_and_refusals_are_not_counted() -> None:
    clock = ManualClock()
    protection = ServiceProtection(
        ServiceLimits(requests=2, window_seconds=10, execution_seconds=None, max_concurrent=None),
        lambda: clock.now().timestamp(),
    )
    for _ in range(2):
        admitted = protection.admit()
        assert isinstance(admitted, Admission)
        protection.finish(admitted)
        clock.advance(4)
    refused = protection.admit()
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.retry_after) == ("0x80072322", 2)
    assert protection.remaining() == {"x-ms-ratelimit-burst-remaining-xrm-requests": "0"}
    clock.advance(2)
    assert isinstance(protection.admit(), Admission)
    assert protection.remaining() == {"x-ms-ratelimit-burst-remaining-xrm-requests": "0"}


def test_execution_time_and_concurrency_are_refused_with_their_own_codes() -> None:
    clock = ManualClock()
    protection = ServiceProtection(
        ServiceLimits(requests=None, window_seconds=60, execution_seconds=5, max_concurrent=1),
        lambda: clock.now().timestamp(),
    )
    first = protection.admit()
    assert isinstance(first, Admission)
    concurrent = protection.admit()
    assert isinstance(concurrent, Refusal)
    assert (concurrent.code, concurrent.retry_after) == ("0x80072326", 1)
    clock.advance(5)
    protection.finish(first)
    assert protection.remaining() == {"x-ms-ratelimit-time-remaining-xrm-requests": "0.00"}
    slow = protection.admit()
    assert isinstance(slow, Refusal)
    assert (slow.code, slow.retry_after) == ("0x80072321", 60)
    clock.advance(60)
    assert isinstance(protection.admit(), Admission)
