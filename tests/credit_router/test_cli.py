"""The ``credit-router`` command line as a user meets it: real processes, real sockets.

Issue 13, "Why" 2 and 7: a user's mistake is one line naming the problem and its fix, exit
status 2, and a traceback only with ``--debug``; ``--version``; no internal note in the help;
``keys generate`` refuses to overwrite; ``top`` quits on ``q``; ``status`` shows each worker's
executor and endpoint; JSON logs carry fields.
"""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from credit_router.__main__ import build_parser, main
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "credit_router"]


def run_cli(*argv: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *argv], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2, no traceback, one line on stderr that names the problem (``words``)."""
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- help, version


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"credit-router {version('credit-router')}"


def test_top_level_help_has_no_internal_note() -> None:
    text = build_parser().format_help()
    assert "configures logging" not in text
    assert "``" not in text  # reST markup of a docstring
    assert "serve" in text
    assert "worker" in text
    assert "--version" in text


def test_log_level_spelled_alike_by_serve_and_worker() -> None:
    """Both take lower-case levels, in any case, with the same help wording."""
    from worker_agent.__main__ import build_parser as worker_parser

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    worker = worker_parser()
    for parser in (serve, worker):
        action = next(a for a in parser._actions if "--log-level" in a.option_strings)
        assert list(action.choices or []) == ["debug", "info", "warning", "error"]
        assert parser.parse_args(["--log-level", "INFO"]).log_level == "info"
    assert worker.prog == "credit-router worker"


# ----------------------------------------------------------------------- the one error path


def test_malformed_toml_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text('log_level = "info\nhttp_port = 1\n')
    line = assert_one_line_error(
        run_cli("config", "show", "--config", str(config)), str(config), "not valid TOML", "line 1"
    )
    assert "TOMLDecodeError" not in line
    worker = run_cli("worker", "--config", str(config))
    assert_one_line_error(worker, str(config), "not valid TOML")


def test_missing_worker_key_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "router.key"
    result = run_cli(
        "worker",
        "--router",
        "tcp://127.0.0.1:1",
        "--curve-server-key",
        str(missing),
        "--curve-key",
        str(tmp_path / "w.key_secret"),
    )
    line = assert_one_line_error(result, str(missing), "no such file", "keys generate")
    assert "KeyError_" not in line
    assert "Invalid certificate" not in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("x = = 1\n")
    result = run_cli("--debug", "config", "show", "--config", str(config))
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_http_port_in_use_is_one_line_and_leaves_nothing_behind(tmp_path: Path) -> None:
    ipc = tmp_path / "producers.ipc"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            "--worker-endpoint",
            "tcp://127.0.0.1:0",
            "--producer-endpoint",
            f"ipc://{ipc}",
            "--http-port",
            str(port),
        )
    assert_one_line_error(result, f"127.0.0.1:{port}", "--http-port")
    assert "router started" not in result.stderr
    assert not ipc.exists()


def test_internal_error_is_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unexpected exception is a bug: one line saying so, exit 1; --debug re-raises it."""
    import credit_router.__main__ as cli

    def broken(args: object) -> int:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "_config_show", broken)
    assert main(["config", "show"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "internal error" in err
    assert "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["config", "show", "--debug"])


# ---------------------------------------------------------------------------------- keys


def test_keys_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = run_cli("keys", "generate", str(tmp_path), "router")
    assert first.returncode == 0, first.stderr
    secret = (tmp_path / "router.key_secret").read_bytes()
    again = run_cli("keys", "generate", str(tmp_path), "router")
    assert_one_line_error(again, "router.key", "exists", "--force")
    assert (tmp_path / "router.key_secret").read_bytes() == secret
    forced = run_cli("keys", "generate", str(tmp_path), "router", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "router.key_secret").read_bytes() != secret


# ------------------------------------------------------------------ status and top, for real


@pytest.fixture
def router_and_worker(tmp_path: Path) -> Iterator[str]:
    """A real ``serve`` and a real ``worker --executor openai`` joined to it; yields the URL.

    The router logs JSON into ``tmp_path / "router.log"``.
    """
    http_port, worker_port = free_port(), free_port()
    log = (tmp_path / "router.log").open("w")
    router = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--worker-endpoint",
            f"tcp://127.0.0.1:{worker_port}",
            "--producer-endpoint",
            f"ipc://{tmp_path / 'p.ipc'}",
            "--http-port",
            str(http_port),
            "--log-format",
            "json",
        ],
        cwd=ROOT,
        stderr=log,
    )
    worker = subprocess.Popen(
        [
            *CLI,
            "worker",
            "--router",
            f"tcp://127.0.0.1:{worker_port}",
            "--name",
            "gpu0",
            "--executor",
            "openai",
            "--endpoint",
            "http://127.0.0.1:9/v1",
            "--model",
            "llama",
        ],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/status", timeout=2) as response:
                    if json.load(response)["workers"]:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "worker did not join"
            time.sleep(0.1)
        yield url
    finally:
        for process in (worker, router):
            process.terminate()
        worker.wait(timeout=20)
        router.wait(timeout=20)
        log.close()


def test_status_shows_each_workers_executor_and_endpoint(router_and_worker: str) -> None:
    result = run_cli("status", "--url", router_and_worker)
    assert result.returncode == 0, result.stderr
    header, row = [
        line for line in result.stdout.splitlines() if "gpu0" in line or "WORKER" in line
    ]
    assert "EXECUTOR" in header
    assert "ENDPOINT" in header
    columns = row.split()
    assert "openai" in columns
    assert "http://127.0.0.1:9/v1" in columns
    with urllib.request.urlopen(f"{router_and_worker}/status", timeout=2) as response:
        (worker,) = json.load(response)["workers"]
    assert worker["labels"]["model"] == "llama"


def test_status_counts_what_each_worker_was_really_dispatched() -> None:
    """A late joiner's tie-break count starts at the fleet mean; the table shows the credits
    it was really dispatched (a newcomer read 500 "sent" on a worker that had run none)."""
    from credit_router.__main__ import _render_status

    worker = {
        "name": "late", "state": "active", "executor": "sim", "endpoint": "", "in_flight": 0,
        "capacity": 8, "sessions": 0, "queued": 0, "sent": 500, "dispatched": 3,
        "silent_s": 0.1, "labels": {},
    }  # fmt: skip
    doc = {
        "router": {"incarnation": "r", "version": "1", "uptime_s": 1, "ready": True,
                   "draining": False},
        "totals": {"workers": 1, "producers": 0, "in_flight": 0, "queued": 0, "sessions": 0,
                   "fork_aliases": 0, "outcomes": {}},
        "workers": [worker],
    }  # fmt: skip
    header, row = _render_status(doc).splitlines()[-2:]
    column = header.split().index("DISPATCHED")
    assert row.split()[column] == "3"


def test_status_of_a_dead_router_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(run_cli("status", "--url", url), url, "credit-router serve")


def test_top_quits_on_q(router_and_worker: str) -> None:
    """``top`` on a terminal (a pty): draws the table, then ``q`` ends it with status 0."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [*CLI, "top", "--url", router_and_worker, "--interval-s", "30"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        cwd=ROOT,
    )
    os.close(secondary)
    screen = b""
    try:
        deadline = time.monotonic() + 20
        while b"gpu0" not in screen and time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                screen += os.read(primary, 65536)
        assert b"gpu0" in screen, screen
        assert b"q quit" in screen, screen
        os.write(primary, b"q")
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(primary)


# ------------------------------------------------------------------------------------ logs


def test_json_logs_are_fields_not_a_text_line(router_and_worker: str, tmp_path: Path) -> None:
    """The router's JSON log: ``msg`` holds words, ``key=value`` pairs are typed fields."""
    logs = (tmp_path / "router.log").read_text()
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    started = [e for e in events if e["msg"] == "router started"]
    assert started, logs
    assert started[0]["workers"].startswith("tcp://127.0.0.1:")
    assert all("=" not in e["msg"].split(":")[0] for e in events), events


def test_latency_buckets_are_configurable(tmp_path: Path) -> None:
    """``--latency-buckets-s`` sets the delay histograms' bounds, on the router and a worker."""
    http_port, worker_port, agent_port = free_port(), free_port(), free_port()
    router = subprocess.Popen(
        [
            *CLI, "serve", "--worker-endpoint", f"tcp://127.0.0.1:{worker_port}",
            "--producer-endpoint", f"ipc://{tmp_path / 'p.ipc'}",
            "--http-port", str(http_port), "--latency-buckets-s", "0,0.5,2",
        ],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    worker = subprocess.Popen(
        [
            *CLI, "worker", "--router", f"tcp://127.0.0.1:{worker_port}", "--name", "w",
            "--http-port", str(agent_port), "--latency-buckets-s", "0.125,4",
        ],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def metrics(port: int) -> str:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
                        text: str = response.read().decode()
                        return text
                except OSError:
                    assert time.monotonic() < deadline, f"no /metrics on {port}"
                    time.sleep(0.1)

        routed = metrics(http_port)
        assert 'credit_router_submit_to_dispatch_seconds_bucket{le="0.5"}' in routed
        assert 'credit_router_dispatch_to_completion_seconds_bucket{le="2.0"}' in routed
        assert 'le="1e-05"' not in routed
        agent = metrics(agent_port)
        assert 'credit_worker_ttft_seconds_bucket{le="0.125"}' in agent
        assert 'le="1e-05"' not in agent
    finally:
        for process in (worker, router):
            process.terminate()
        worker.wait(timeout=20)
        router.wait(timeout=20)


def test_worker_http_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("worker", "--router", "tcp://127.0.0.1:1", "--http-port", str(port))
    assert_one_line_error(result, f"127.0.0.1:{port}", "--http-port")


def test_every_serve_flag_has_help_and_booleans_turn_off() -> None:
    """Each setting's flag says what it is and its default; a true-by-default boolean has a
    ``--no-`` form (``--latency-histograms`` alone could never turn them off)."""
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    for action in serve._actions:
        if action.option_strings and action.dest not in ("help",):
            assert action.help, action.option_strings
    assert serve.parse_args(["--no-latency-histograms"]).latency_histograms is False


def test_json_log_values_are_json_not_python_reprs() -> None:
    """Bytes, dicts, enums and %r arguments reach the JSON as JSON values, not reprs."""
    import logging

    from credit_common.logs import JsonFormatter
    from protocol.messages import Status

    def render(msg: str, *args: object) -> dict[str, object]:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, msg, args, None)
        out: dict[str, object] = json.loads(JsonFormatter().format(record))
        return out

    event = render(
        "worker stopped name=%s stats=%s status=%s", b"gpu0", {"ok": 2}, Status.COMPLETED
    )
    assert event["msg"] == "worker stopped"
    assert event["name"] == "gpu0"
    assert event["stats"] == {"ok": 2}
    assert event["status"] == "completed"
    assert render("invalid message from %r", b"w2")["msg"] == "invalid message from w2"
    assert render("done: %d%% in %.1fs", 50, 1.25)["msg"] == "done: 50% in 1.2s"


def test_missing_router_key_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "router.key_secret"
    result = run_cli(
        "serve",
        "--worker-endpoint",
        "tcp://0.0.0.0:0",
        "--producer-endpoint",
        f"ipc://{tmp_path / 'p.ipc'}",
        "--http-port",
        "0",
        "--curve-secret-key-file",
        str(missing),
        "--curve-allowed-keys",
        str(tmp_path),
    )
    assert_one_line_error(result, str(missing), "no such file", "keys generate")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["serve", "--workers", "tcp://127.0.0.1:99999", "--http-port", "0"], ["worker_endpoint"]),
        (["serve", "--producers", "tcp://127.0.0.1:70000", "--http-port", "0"], ["producer"]),
        (["worker", "--router", "tcp://127.0.0.1:99999", "--executor", "sim"], ["router"]),
        (["run", "--router", "tcp://127.0.0.1:65536", "--duration-s", "1"], ["--router"]),
    ],
)
def test_a_port_above_65535_is_refused_not_wrapped(argv: list[str], words: list[str]) -> None:
    # libzmq would take tcp://host:99999 and use port 34463 (99999 mod 65536), silently.
    line = assert_one_line_error(run_cli(*argv), "out of range", *words)
    assert "65535" in line


def test_a_worker_name_with_a_slash_is_refused_up_front() -> None:
    # The routing id is NAME/INCARNATION: the router would read "a" and refuse the hello.
    result = run_cli(
        "worker", "--router", "tcp://127.0.0.1:5999", "--name", "a/b", "--executor", "sim"
    )
    assert_one_line_error(result, "--name", "must not contain '/'")


def test_mock_server_on_a_taken_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("mock-server", "--port", str(port))
    assert_one_line_error(result, "mock-server", f"127.0.0.1:{port}")
