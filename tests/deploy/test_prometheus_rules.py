"""deploy/prometheus: promtool checks the config and the rules and runs the rules' unit tests."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.support import DEPLOY, debian_tool, exposed_metric_names, metrics_in

PROM = DEPLOY / "prometheus"
RULES = PROM / "rules.yml"
ALERTS = {
    "CreditRouterDown",
    "CreditRouterWorkerLost",
    "CreditRouterCreditsStuck",
    "CreditRouterQueueGrowing",
    "CreditRouterEventLoopLag",
    "CreditRouterInvalidMessages",
    "CreditRouterErrorRate",
    "CreditRouterReplayLate",
}


def promtool(*args: str) -> str:
    done = subprocess.run(
        [debian_tool("promtool"), *args],
        cwd=PROM,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    assert f"SUCCESS: {len(ALERTS)} rules found" in promtool("check", "rules", "rules.yml")


def test_promtool_test_rules() -> None:
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")


def test_promtool_check_config() -> None:
    assert "is valid prometheus config file syntax" in promtool("check", "config", "prometheus.yml")


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    """rules_test.yml has, for each alert, a case expecting it and a case expecting nothing."""
    doc = yaml.safe_load((PROM / "rules_test.yml").read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_alert_shape(rule: dict[str, Any]) -> None:
    assert rule["alert"] in ALERTS
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]
    assert rule.get("for"), "every alert waits before firing"


def test_rules_read_only_metrics_the_router_exposes() -> None:
    read = set().union(*(metrics_in(rule["expr"]) for rule in rules()))
    assert read, "no credit_router_* metric read by the rules"
    assert read <= exposed_metric_names(), read - exposed_metric_names()


def test_alert_names_match() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS


def test_worker_lost_ignores_drains() -> None:
    """A planned drain (workers leaving with a Goodbye) is not a loss (issue 13): the rule
    reads only ``worker_lost`` departures and suspect workers, never a fall in active ones."""
    (rule,) = [r for r in rules() if r["alert"] == "CreditRouterWorkerLost"]
    assert 'reason="worker_lost"' in rule["expr"]
    assert 'state="active"' not in rule["expr"]
    assert "workers_lost_total" not in rule["expr"]
