"""deploy/systemd: the units parse with the keys this daemon needs, and systemd-analyze verifies
them and scores their sandboxing. The environment example is checked by the router itself."""

from __future__ import annotations

import json
import os
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
    worker_env = env_file(SYSTEMD / "worker.env.example")
    worker_drain = float(worker_env["CREDIT_ROUTER_WORKER_DRAIN_DEADLINE_S"])
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
    assert "--name %i" in exec_start
    env_files = [v for k, v in service if k == "EnvironmentFile"]
    assert "/etc/credit-router/worker.env" in env_files
    # Required (no "-"): it names this instance's inference server.
    assert "/etc/credit-router/worker-%i.env" in env_files
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


def _expand(exec_start: str, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd splits and expands it: ${VAR} one word (empty if unset), $VAR
    split on whitespace, %i the instance."""
    words = []
    for word in shlex.split(exec_start.replace("%i", "gpu0")):
        if re.fullmatch(r"\$\w+", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


def _worker_env() -> dict[str, str]:
    return {
        **env_file(SYSTEMD / "worker.env.example"),
        **env_file(SYSTEMD / "worker-instance.env.example"),
        "CREDENTIALS_DIRECTORY": "/run/credentials/credit-worker@gpu0.service",
    }


def test_worker_unit_runs_a_real_server_with_its_keys() -> None:
    """Issue 13: the worker unit ran the simulator and had no way to get its key. Now the
    executor is openai, endpoint and model come from the instance's file, and the keys are
    systemd credentials; the expanded command line parses with the worker's own parser and
    the environment files are valid worker settings."""
    from worker_agent.__main__ import _settle, build_parser

    service = parse_unit(WORKER_UNIT)["Service"]
    values = dict(service)
    credentials = dict(v.split(":", 1) for k, v in service if k == "LoadCredential")
    assert credentials == {
        "router.key": "/etc/credit-router/keys/router.key",
        "worker.key_secret": "/etc/credit-router/keys/%i.key_secret",
    }
    argv = _expand(values["ExecStart"], _worker_env())
    assert argv[:2] == [INSTALLED, "worker"]
    env = {k: v for k, v in _worker_env().items() if k.startswith("CREDIT_ROUTER_WORKER_")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        args = build_parser().parse_args(argv[2:])
        _settle(args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert args.executor == "openai"
    assert args.endpoint == ["http://127.0.0.1:8000/v1"]
    assert args.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert str(args.curve_key).endswith("/worker.key_secret")
    assert args.router == "tcp://loadgen-01:5557"
    assert args.http_port == 9465


def test_worker_unit_without_its_server_stops_in_one_line() -> None:
    """An instance file without INFERENCE_ENDPOINT: ${INFERENCE_ENDPOINT} expands to an empty
    word, which the worker refuses in one line naming --endpoint."""
    env = {k: v for k, v in _worker_env().items() if k != "INFERENCE_ENDPOINT"}
    argv = _expand(dict(parse_unit(WORKER_UNIT)["Service"])["ExecStart"], env)
    done = subprocess.run(
        [venv_tool("credit-router"), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "--endpoint" in done.stderr


def test_router_unit_runs_curve_with_a_credential() -> None:
    """Issue 13: the example ran the router plaintext on 0.0.0.0 (CREDIT_ROUTER_INSECURE). The
    unit turns CurveZMQ on with the secret key as a systemd credential (root-only on disk)."""
    service = parse_unit(ROUTER_UNIT)["Service"]
    environment = dict(v.split("=", 1) for k, v in service if k == "Environment")
    credentials = dict(v.split(":", 1) for k, v in service if k == "LoadCredential")
    assert credentials == {"router.key_secret": "/etc/credit-router/keys/router.key_secret"}
    assert environment["CREDIT_ROUTER_CURVE__SECRET_KEY_FILE"] == "%d/router.key_secret"
    assert environment["CREDIT_ROUTER_CURVE__ALLOWED_KEYS"] == "/etc/credit-router/allowed"
    assert "CREDIT_ROUTER_INSECURE" not in env_file(SYSTEMD / "router.env.example")
