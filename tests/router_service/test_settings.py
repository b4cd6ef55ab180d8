"""Settings: defaults < TOML < environment < flags, and one-line errors (real CLI processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from router_service.settings import RouterSettings, SettingsError


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "credit_router", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
        check=False,
    )


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "router.toml"
    config.write_text(
        'queue_limit = 7\nmax_sessions = 70\nhttp_port = 9000\n[curve]\nallowed_keys = "/k"\n'
    )
    monkeypatch.setenv("CREDIT_ROUTER_QUEUE_LIMIT", "9")
    monkeypatch.setenv("CREDIT_ROUTER_MAX_SESSIONS", "90")
    s = RouterSettings.load(config, max_sessions=5)
    assert s.max_sessions == 5  # flag
    assert s.queue_limit == 9  # environment over the file
    assert s.http_port == 9000  # file over the default
    assert s.worker_queue_limit == 10_000  # default
    assert s.curve.allowed_keys == Path("/k")


def test_nested_environment_with_double_underscore(monkeypatch) -> None:
    monkeypatch.setenv("CREDIT_ROUTER_CURVE__SECRET_KEY", "z85-secret")
    s = RouterSettings.load()
    assert s.curve.secret_key is not None
    assert s.curve.secret_key.get_secret_value() == "z85-secret"
    assert "z85-secret" not in json.dumps(s.redacted())


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"heartbeat_interval_s": -1}, "invalid setting heartbeat_interval_s"),
        ({"http_port": 70000}, "invalid setting http_port"),
        ({"log_format": "xml"}, "invalid setting log_format"),
        ({"lost_after_s": 1.0}, "lost_after_s (1.0) must be at least"),
        ({"no_such_setting": 1}, "invalid setting no_such_setting"),
    ],
)
def test_bad_values_name_the_setting(flags, needle) -> None:
    with pytest.raises(SettingsError) as err:
        RouterSettings.load(**flags)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        RouterSettings.load(tmp_path / "nope.toml")


def test_cli_bad_value_is_one_line_without_traceback() -> None:
    done = cli("serve", "--max-sessions", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "credit-router: invalid setting max_sessions: Input should be greater than 0 (got 0)"
    )


def test_cli_config_show_redacts_and_merges(tmp_path: Path) -> None:
    config = tmp_path / "r.toml"
    config.write_text("session_idle_ttl_s = 42.5\n")
    done = cli(
        "config",
        "show",
        "--config",
        str(config),
        "--workers",
        "tcp://0.0.0.0:7000",
        env={"CREDIT_ROUTER_CURVE__SECRET_KEY": "very-secret"},
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["session_idle_ttl_s"] == 42.5
    assert shown["worker_endpoint"] == "tcp://0.0.0.0:7000"
    assert shown["curve"]["secret_key"] == "**********"
    assert "very-secret" not in done.stdout
