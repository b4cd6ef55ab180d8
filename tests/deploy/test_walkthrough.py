"""DEPLOY.md followed with real processes, minus systemd: keys, the router as the unit and its
environment file start it, a worker as its unit's command line and environment files start it in
front of a real HTTP server (the bundled mock server), and a credit through both.

Issue 13: the shipped deployment ran plaintext and unauthenticated, and its workers ran the
simulator. Here the files of deploy/systemd are read, not copied: paths under /etc and the
credentials directory are mapped into a temporary directory, nothing else changes. The end
state is the one DEPLOY.md promises: an authenticated router (an unlisted key is refused) and a
worker whose credits reach a real server (``/status`` shows ``openai`` and its endpoint).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.inference import TurnRequest, decode_result, encode_request
from protocol.messages import Credit, Status
from router_service.client import RouterClient
from tests.deploy.support import ROOT
from tests.deploy.test_systemd import (
    ROUTER_UNIT,
    SYSTEMD,
    WORKER_UNIT,
    _expand,
    env_file,
    parse_unit,
)
from tests.ports import free_port

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "credit_router"]


def wait_until(what: str, probe: object, deadline_s: float = 20.0) -> object:
    end = time.monotonic() + deadline_s
    while True:
        try:
            value = probe()  # type: ignore[operator]
        except OSError:
            value = None
        if value:
            return value
        assert time.monotonic() < end, f"{what}: not within {deadline_s:.0f} s"
        time.sleep(0.1)


class Host:
    """A temporary stand-in for the host's /etc and /run, and the processes started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.etc = tmp / "etc" / "credit-router"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    def path(self, text: str) -> str:
        return text.replace("/etc/credit-router", str(self.etc)).replace(
            "/run/", f"{self.tmp}/run/"
        )

    def credentials(self, unit: Path, directory: Path, instance: str = "") -> Path:
        """Copy what the unit's ``LoadCredential=`` lines name into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        for key, value in parse_unit(unit)["Service"]:
            if key == "LoadCredential":
                name, source = value.split(":", 1)
                shutil.copy(self.path(source.replace("%i", instance)), directory / name)
        return directory

    def start(self, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        out = (self.tmp / f"{log}.log").open("wb")
        self.logs.append(out)
        process = subprocess.Popen(
            argv, env={"PATH": os.environ["PATH"], **env}, stdout=out, stderr=out, cwd=ROOT
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for out in self.logs:
            out.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.stop()


def router_environment(host: Host, http_port: int, worker_port: int) -> dict[str, str]:
    """router.env.example plus the unit's Environment= lines, paths mapped to the temp host."""
    env = env_file(SYSTEMD / "router.env.example")
    env["CREDIT_ROUTER_WORKER_ENDPOINT"] = f"tcp://0.0.0.0:{worker_port}"
    env["CREDIT_ROUTER_PRODUCER_ENDPOINT"] = host.path(env["CREDIT_ROUTER_PRODUCER_ENDPOINT"])
    env["CREDIT_ROUTER_HTTP_HOST"] = "127.0.0.1"
    env["CREDIT_ROUTER_HTTP_PORT"] = str(http_port)
    credentials = host.credentials(ROUTER_UNIT, host.tmp / "credentials" / "router")
    for key, value in parse_unit(ROUTER_UNIT)["Service"]:
        if key == "Environment":
            name, _, text = value.partition("=")
            env[name] = host.path(text.replace("%d", str(credentials)))
    return env


def test_deploy_md_ends_with_an_authenticated_router_and_a_worker_on_a_real_server(
    host: Host,
) -> None:
    keys = host.etc / "keys"
    allowed = host.etc / "allowed"
    (host.tmp / "run" / "credit-router").mkdir(parents=True)
    # Keys, as DEPLOY.md makes them: the worker's public key in the allowlist, the intruder's not.
    done = subprocess.run(
        [*CLI, "keys", "generate", str(keys), "router", "gpu0", "intruder"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    allowed.mkdir()
    (keys / "gpu0.key").rename(allowed / "gpu0.key")

    # Secure by default: without its keys the router does not start on a non-loopback port.
    http_port, worker_port, server_port = free_port(), free_port(), free_port()
    plain = {
        k: v
        for k, v in router_environment(host, http_port, worker_port).items()
        if "CURVE" not in k
    }
    refused = subprocess.run(
        [*CLI, "serve"],
        env={"PATH": os.environ["PATH"], **plain},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2, refused.stderr
    assert "CURVE" in refused.stderr

    host.start(
        [*CLI, "mock-server", "--host", "127.0.0.1", "--port", str(server_port)], {}, "server"
    )
    host.start([*CLI, "serve"], router_environment(host, http_port, worker_port), "router")
    status_url = f"http://127.0.0.1:{http_port}/status"

    def status() -> dict[str, object]:
        with urllib.request.urlopen(status_url, timeout=2) as response:
            doc: dict[str, object] = json.load(response)
            return doc

    wait_until("router up", status)
    wait_until(
        "server up", lambda: socket.create_connection(("127.0.0.1", server_port)).close() or True
    )

    # The worker: its unit's command line, from its two environment files and credentials.
    env = {
        **env_file(SYSTEMD / "worker.env.example"),
        **env_file(SYSTEMD / "worker-instance.env.example"),
        "CREDIT_ROUTER_WORKER_ROUTER": f"tcp://127.0.0.1:{worker_port}",
        "CREDIT_ROUTER_WORKER_HTTP_HOST": "127.0.0.1",
        "CREDIT_ROUTER_WORKER_HTTP_PORT": str(free_port()),
        "INFERENCE_ENDPOINT": f"http://127.0.0.1:{server_port}/v1",
        "INFERENCE_MODEL": "mock",
    }
    env["CREDENTIALS_DIRECTORY"] = str(
        host.credentials(WORKER_UNIT, host.tmp / "credentials" / "gpu0", instance="gpu0")
    )
    exec_start = dict(parse_unit(WORKER_UNIT)["Service"])["ExecStart"]
    argv = _expand(exec_start, env)
    host.start(
        [*CLI, *argv[1:]], {k: v for k, v in env.items() if k.startswith("CREDIT_")}, "worker"
    )

    def joined() -> list[dict[str, object]]:
        workers = status()["workers"]
        assert isinstance(workers, list)
        return [w for w in workers if w["name"] == "gpu0" and w["state"] == "active"]

    (worker,) = wait_until("gpu0 joined", joined)  # type: ignore[misc]
    assert worker["executor"] == "openai"
    assert worker["endpoint"] == f"http://127.0.0.1:{server_port}/v1"

    # An unlisted key is refused: the intruder never joins, and the router counts it.
    intruder = [
        *CLI, "worker", "--router", f"tcp://127.0.0.1:{worker_port}", "--name", "intruder",
        "--curve-server-key", str(keys / "router.key"),
        "--curve-key", str(keys / "intruder.key_secret"),
    ]  # fmt: skip
    host.start(intruder, {}, "intruder")

    def auth_failures() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as r:
            text = r.read().decode()
        match = re.search(r"^credit_router_auth_failures_total (\S+)", text, re.M)
        return bool(match and float(match.group(1)) > 0)

    wait_until("intruder refused", auth_failures)
    assert [w["name"] for w in status()["workers"]] == ["gpu0"]  # type: ignore[union-attr]

    # A credit through the router and the worker to the server, and back.
    producer = env_file(SYSTEMD / "router.env.example")["CREDIT_ROUTER_PRODUCER_ENDPOINT"]

    async def one_credit() -> None:
        request = TurnRequest(messages=[{"role": "user", "content": "hello"}], output_tokens=4)
        async with RouterClient(host.path(producer), name="walkthrough") as client:
            outcome = await asyncio.wait_for(
                client.run(Credit(id=1, x_correlation_id="s", payload=encode_request(request))),
                20,
            )
        assert outcome.status is Status.COMPLETED, outcome.reason
        assert outcome.worker == "gpu0"
        result = decode_result(outcome.result)
        assert result is not None
        assert result.http_status == 200
        assert result.endpoint == f"http://127.0.0.1:{server_port}/v1"

    asyncio.run(one_credit())
