"""``python -m worker_agent``: arguments, exit codes, and real processes under signals."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocol.messages import (
    Ack,
    Completion,
    CompletionBatch,
    Dispatch,
    DispatchBatch,
    Draining,
    Goodbye,
    Hello,
    Refusal,
)
from tests.worker_agent.conftest import FakeRouter, credit
from worker_agent.__main__ import _settle, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------- arguments


def test_defaults() -> None:
    args = build_parser().parse_args(["--router", "tcp://127.0.0.1:5555"])
    _settle(args)
    assert args.capacity == 64
    assert args.executor == "sim"
    assert args.first_token_events is True
    assert args.sim_zero_latency is False
    assert args.drain_deadline_s == 30.0
    assert args.name  # the hostname


@pytest.mark.parametrize(
    "argv",
    [
        [],  # --router is required
        ["--router", "localhost:5555"],  # not an endpoint
        ["--router", "tcp://localhost"],  # no port
        ["--router", "tcp://*:5555"],  # a bind address, not one to connect to
        ["--router", "tcp://h:1", "--capacity", "0"],
        ["--router", "tcp://h:1", "--drain-deadline-s", "-1"],
        ["--router", "tcp://h:1", "--executor", "openai"],
        ["--router", "tcp://h:1", "--name", "x" * 300],
    ],
)
def test_usage_errors_return_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    # One line naming the problem (argparse usage errors too), no traceback.
    assert err.startswith("credit-router worker: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('router = "tcp://file:1"\ncapacity = 3\nname = "from-file"\n')
    monkeypatch.setenv("CREDIT_ROUTER_WORKER_CAPACITY", "5")
    monkeypatch.setenv("CREDIT_ROUTER_WORKER_LABELS", '{"gpu": "h100"}')
    args = build_parser().parse_args(["--config", str(config), "--name", "from-flag"])
    settings = _settle(args)
    assert (args.router, args.capacity, args.name) == ("tcp://file:1", 5, "from-flag")
    assert settings.labels == {"gpu": "h100"}


@pytest.mark.parametrize(
    "endpoint", ["tcp://127.0.0.1:5555", "tcp://router.lan:1", "tcp://[::1]:5555", "ipc:///run/r"]
)
def test_endpoints_accepted(endpoint: str) -> None:
    from worker_agent.__main__ import _ENDPOINT

    assert _ENDPOINT.match(endpoint)


def test_help_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--sim-zero-latency" in capsys.readouterr().out


# ----------------------------------------------------------------------------- real processes


@pytest.fixture
async def spawn(router: FakeRouter) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    processes: list[asyncio.subprocess.Process] = []
    yield processes
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def start_worker(
    router: FakeRouter, processes: list[asyncio.subprocess.Process], *extra: str
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker_agent",
        "--router",
        router.endpoint,
        "--name",
        "proc-worker",
        "--sim-zero-latency",
        *extra,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    processes.append(process)
    return process


async def exit_code(process: asyncio.subprocess.Process) -> tuple[int, str]:
    assert process.stderr is not None
    stderr = await asyncio.wait_for(process.stderr.read(), 10)
    return await asyncio.wait_for(process.wait(), 5), stderr.decode()


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_sigterm_drains_then_says_goodbye_and_exits_0(
    router: FakeRouter, spawn: list[asyncio.subprocess.Process]
) -> None:
    process = await start_worker(router, spawn, "--drain-deadline-s", "7")
    # A long beat: the fake router sends none, and the agent must not take its silence for a
    # lost router (and rejoin instead of draining) on a slow machine.
    await router.welcome(heartbeat_s=5.0, report_s=1.0)
    await router.send(DispatchBatch(producer="p", credits=[credit(1), credit(2)]))
    batch = await router.expect(CompletionBatch)
    await router.send(Ack(seq=batch.completions[-1].seq))
    process.send_signal(signal.SIGTERM)
    draining = await router.expect(Draining, within_s=5)
    assert draining.deadline_s == 7.0
    bye = await router.expect(Goodbye, within_s=5)
    assert bye.reason == "drained"
    code, stderr = await exit_code(process)
    assert code == 0, stderr
    assert "draining" in stderr


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_second_signal_forces_the_exit(
    router: FakeRouter, spawn: list[asyncio.subprocess.Process]
) -> None:
    process = await start_worker(router, spawn)
    # A long beat: the fake router sends none, and the agent must not take its silence for a
    # lost router (and rejoin instead of draining) on a slow machine.
    await router.welcome(heartbeat_s=5.0, report_s=1.0)
    await router.send(Dispatch(producer="p", credit=credit(1, "live", num_turns=3)))
    await router.expect(Completion)  # the session stays live: the drain waits for it
    process.send_signal(signal.SIGTERM)
    await router.expect(Draining, within_s=5)
    process.send_signal(signal.SIGINT)
    bye = await router.expect(Goodbye, within_s=5)
    assert bye.reason == "forced"
    code, stderr = await exit_code(process)
    assert code == 1, stderr


@pytest.mark.integration
@pytest.mark.timeout(30)
async def test_refusal_exits_2_naming_the_reason(
    router: FakeRouter, spawn: list[asyncio.subprocess.Process]
) -> None:
    process = await start_worker(router, spawn)
    await router.expect(Hello)
    await router.send(
        Refusal(reason="version mismatch: router 9", router_version=9, peer_version=1)
    )
    code, stderr = await exit_code(process)
    assert code == 2
    assert "version mismatch: router 9" in stderr
