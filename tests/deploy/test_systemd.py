"""deploy/systemd: the units parse with the keys this daemon needs, and systemd-analyze verifies
them and scores their sandboxing. The environment example is checked by the router itself."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.support import DEPLOY, ROOT, venv_tool

SYSTEMD = DEPLOY / "systemd"
ROUTER_UNIT = SYSTEMD / "credit-router.service"
WORKER_UNIT = SYSTEMD / "credit-worker@.service"
INSTALLED = "/opt/credit-router/venv/bin/credit-router"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
}


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ``(key, value)`` lists (keys may repeat; ``\\`` continues)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: key outside a section: {line}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def keys(path: Path, section: str) -> dict[str, str]:
    """The last value of each key in ``section``."""
    return dict(parse_unit(path)[section])


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min|ms)?", value)
    assert match, value
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"s": 1.0, "min": 60.0, "ms": 0.001}[unit]


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def test_router_unit_keys() -> None:
    service = keys(ROUTER_UNIT, "Service")
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == f"{INSTALLED} serve"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/credit-router/router.env"
    assert service["Restart"] == "on-failure"
    assert seconds(service["RestartSec"]) > 0
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["RuntimeDirectory"] == "credit-router"
    assert service["User"] == service["Group"] == "credit-router"
    for key, value in HARDENING.items():
        assert service[key] == value, key
    assert keys(ROUTER_UNIT, "Install")["WantedBy"] == "multi-user.target"
    assert "network-online.target" in keys(ROUTER_UNIT, "Unit")["After"]


def test_stop_timeout_outlasts_the_drain() -> None:
    """systemd must not SIGKILL the drain: TimeoutStopSec > the drain deadline (+ margin)."""
    drain = float(env_file(SYSTEMD / "router.env.example")["CREDIT_ROUTER_DRAIN_DEADLINE_S"])
    stop = seconds(keys(ROUTER_UNIT, "Service")["TimeoutStopSec"])
    assert stop >= drain + 10, (stop, drain)
    worker = keys(WORKER_UNIT, "Service")
    worker_args = env_file(SYSTEMD / "worker.env.example")["CREDIT_WORKER_ARGS"]
    match = re.search(r"--drain-deadline-s (\S+)", worker_args)
    assert match, worker_args
    worker_drain = float(match.group(1))
    assert seconds(worker["TimeoutStopSec"]) >= worker_drain + 10


def test_ipc_socket_lives_in_the_runtime_directory() -> None:
    endpoint = env_file(SYSTEMD / "router.env.example")["CREDIT_ROUTER_PRODUCER_ENDPOINT"]
    runtime = keys(ROUTER_UNIT, "Service")["RuntimeDirectory"]
    assert endpoint.startswith(f"ipc:///run/{runtime}/")


def test_worker_template_keys() -> None:
    service = parse_unit(WORKER_UNIT)["Service"]
    values = dict(service)
    exec_start = values["ExecStart"]
    assert exec_start.startswith(f"{INSTALLED} worker ")
    assert "--router ${CREDIT_ROUTER_WORKER_ENDPOINT}" in exec_start
    assert "--name %i" in exec_start
    env_files = [v for k, v in service if k == "EnvironmentFile"]
    assert "/etc/credit-router/worker.env" in env_files
    assert "-/etc/credit-router/worker-%i.env" in env_files
    assert values["Restart"] == "on-failure"
    assert values["KillSignal"] == "SIGTERM"
    assert values["DynamicUser"] == "yes"
    for key, value in HARDENING.items():
        assert values[key] == value, key


def test_router_env_example_is_accepted_by_the_router() -> None:
    """Every CREDIT_ROUTER_* line is a real setting with a valid value: ask ``config show``."""
    env = env_file(SYSTEMD / "router.env.example")
    assert all(k.startswith("CREDIT_ROUTER_") for k in env)
    done = subprocess.run(
        [venv_tool("credit-router"), "config", "show"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    for key, value in env.items():
        name = key.removeprefix("CREDIT_ROUTER_").lower()
        assert name in shown, f"{key} is not a router setting"
        assert str(shown[name]).lower() == value.lower() or float(shown[name]) == float(value), key


@pytest.fixture
def verifiable_units(tmp_path: Path) -> Path:
    """Copies of the units whose ExecStart points at this checkout's credit-router.

    systemd-analyze verify checks that the command exists; /opt/credit-router is where a host
    installs it, not where this test runs.
    """
    binary = venv_tool("credit-router")
    for unit in (ROUTER_UNIT, WORKER_UNIT):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, binary))
    return tmp_path


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd; make deploy-tools)")
    return path


def test_systemd_analyze_verify(verifiable_units: Path) -> None:
    done = subprocess.run(
        [
            systemd_analyze(),
            "verify",
            str(verifiable_units / "credit-router.service"),
            str(verifiable_units / "credit-worker@gpu0.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    assert output == "", output


@pytest.mark.parametrize("unit", ["credit-router.service", "credit-worker@gpu0.service"])
def test_systemd_analyze_security_exposure(verifiable_units: Path, unit: str) -> None:
    """systemd's own sandboxing score (0 best, 10 worst); 'OK' is below 4.5 in its scale."""
    done = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=true",
            "--no-pager",
            str(verifiable_units / unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.5, done.stdout


def test_worker_command_line_is_accepted_by_the_worker() -> None:
    """The template's ExecStart, expanded as systemd would for instance gpu0, parses."""
    from worker_agent.__main__ import build_parser

    env = env_file(SYSTEMD / "worker.env.example")
    exec_start = keys(WORKER_UNIT, "Service")["ExecStart"]
    argv: list[str] = []
    for word in exec_start.split()[2:]:  # past the binary and "worker"
        if word == "$CREDIT_WORKER_ARGS":
            argv += shlex.split(env["CREDIT_WORKER_ARGS"])
        elif word.startswith("${"):
            argv.append(env[word[2:-1]])
        else:
            argv.append(word.replace("%i", "gpu0"))
    args = build_parser().parse_args(argv)
    assert args.router == env["CREDIT_ROUTER_WORKER_ENDPOINT"]
    assert args.name == "gpu0"
