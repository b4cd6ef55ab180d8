"""deploy/grafana/credit-router.json, statically: what Grafana needs to import it, and PromQL
that reads only the router's real metrics. (tests/integration/test_prometheus.py evaluates every
query against a live router.)"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.deploy.support import DEPLOY, exposed_metric_names, metrics_in

DASHBOARD = DEPLOY / "grafana" / "credit-router.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = re.compile(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_importable(dashboard: dict[str, Any]) -> None:
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] == "credit-router"
    assert dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_queries_read_only_exposed_metrics(dashboard: dict[str, Any]) -> None:
    exposed = exposed_metric_names()
    read: set[str] = set()
    for panel in panels(dashboard):
        for target in panel["targets"]:
            names = metrics_in(target["expr"])
            assert names <= exposed, (panel["title"], names - exposed)
            read |= names
    assert read, "the dashboard reads no credit_router_* metric"


def test_queries_are_scoped_by_job_and_instance(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            selectors = SELECTOR.findall(expr)
            assert selectors, expr
            for metric, matchers in selectors:
                # Worker series come from the workers' scrape job, the rest from the router's.
                job, instance = (
                    ("$worker_job", "$worker_instance")
                    if metric.startswith("credit_worker_")
                    else ("$job", "$instance")
                )
                assert f'job=~"{job}"' in matchers, (panel["title"], metric)
                assert f'instance=~"{instance}"' in matchers, (panel["title"], metric)


@pytest.mark.parametrize(
    ("title", "needle"),
    [
        ("Outcome rate by status", "sum by (status) (rate(credit_router_credit_outcomes_total"),
        ("In flight and queued", "credit_router_credits_queued"),
        (
            "Submit → dispatch delay",
            "histogram_quantile(0.99, sum by (le) (rate("
            "credit_router_submit_to_dispatch_seconds_bucket",
        ),
        ("Submit → dispatch delay", "histogram_quantile(0.5, "),
        (
            "Dispatch → completion",
            "histogram_quantile(0.99, sum by (le) (rate("
            "credit_router_dispatch_to_completion_seconds_bucket",
        ),
        ("Workers by state", "sum by (state) (credit_router_workers"),
        ("Per-worker in flight vs capacity", "credit_router_worker_capacity"),
        ("Sticky entries and fork refcounts", "credit_router_fork_refcounts_held"),
        ("Evictions by reason", "sum by (reason) (rate(credit_router_session_evictions_total"),
        ("Invalid messages by reason", "credit_router_invalid_messages_total"),
        ("Event-loop lag", "credit_router_event_loop_lag_seconds"),
        ("Error rate", 'status=~"failed|lost|rejected"'),
        ("Per-worker dispatch rate", "sum by (worker) (rate(credit_router_worker_dispatched_total"),
        ("Per-worker outcomes", "credit_router_worker_outcomes_total"),
        ("Prefix-cache hit rate", 'credit_worker_prompt_tokens_total{job=~"$worker_job", '),
        ("Tokens / s", "credit_worker_reasoning_tokens_total"),
        ("Process CPU and memory", "process_cpu_seconds_total"),
    ],
)
def test_required_panel(dashboard: dict[str, Any], title: str, needle: str) -> None:
    by_title = {p["title"]: p for p in panels(dashboard)}
    assert title in by_title
    assert any(needle in t["expr"] for t in by_title[title]["targets"]), needle


def test_rate_windows_use_the_rate_interval(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            if "rate(" in expr:
                assert expr.count("[$__rate_interval]") == expr.count("rate("), expr


def test_sticky_hit_rate_leaves_first_turns_out(dashboard: dict[str, Any]) -> None:
    """The report's definition: turns with history on the worker holding it. Counting
    first-turn misses read 76 % where the report said 100 % (issue 13)."""
    (target,) = {p["title"]: p for p in panels(dashboard)}["Sticky hit rate"]["targets"]
    assert "sticky_misses" not in target["expr"]
    assert "session_migrations_total" in target["expr"]
    assert "session_rehomes_total" in target["expr"]


def test_anomaly_panel_shows_no_counter_of_clean_runs(dashboard: dict[str, Any]) -> None:
    """Releases of FORK children already released by their final completion rise on every
    clean run with FORKs: they buried the real anomalies (issue 13)."""
    panel = {p["title"]: p for p in panels(dashboard)}["Dropped and anomalous messages"]
    assert not any("unknown_child_releases" in t["expr"] for t in panel["targets"])
