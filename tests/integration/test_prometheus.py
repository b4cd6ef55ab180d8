"""A real Prometheus scraping a live router and its workers: the metrics, the alert rules and
the dashboard.

One router under steady traffic (``harness.TrafficHarness``: two DEALER worker stand-ins, one
real worker agent with its HTTP endpoints, and a ``RouterClient`` producer) and one
``prometheus`` process (Debian's package; ``make
deploy-tools`` installs it) scraping it every second, with deploy/prometheus/rules.yml loaded,
are shared by the module. Every query polls Prometheus' HTTP API with a deadline: Prometheus'
first scrape comes about 5 s after it starts (its service-discovery throttle), so the first test
to run waits for it and the others find the data there.

Without the binaries (a developer machine without the apt step) these tests skip, naming
``make deploy-tools``; under CI (``CI`` set) they fail instead, since CI installs them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import TrafficHarness
from tests.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "credit-router.json"
JOB = "credit-router"
WORKER_JOB = "credit-worker"
SCRAPE_S = 1
DEADLINE_S = 25.0
"""Longest wait for one condition: first scrape (~5.5 s) plus a rate window, with slack."""
TEMPLATE = {
    "$__rate_interval": "15s",
    "$__interval": "1s",
    "${datasource}": "prometheus",
    "$worker_job": WORKER_JOB,
    "$worker_instance": ".+",
    "$job": JOB,
    "$instance": ".+",
}


def tool(name: str) -> str:
    """The path of a Debian-packaged tool; skip (or, under CI, fail) when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: run `make deploy-tools` (Debian's prometheus package)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def http_get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body: bytes = response.read()
        return body


def wait_for(what: str, probe: Callable[[], Any], deadline_s: float = DEADLINE_S) -> Any:
    """Call ``probe`` until it returns something truthy; fail with ``what`` at the deadline."""
    end = time.monotonic() + deadline_s
    last: Any = None
    while True:
        try:
            last = probe()
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline_s:.0f} s (last: {last!r})")
        time.sleep(0.25)


class PrometheusAPI:
    """The few calls of Prometheus' HTTP API the tests need."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = http_get(url)
        except urllib.error.HTTPError as exc:  # 400/422: bad PromQL, with the reason in JSON
            body = exc.read()
        doc: dict[str, Any] = json.loads(body)
        return doc

    def label_values(self, label: str, selector: str) -> list[str]:
        """The values ``label`` takes on the series ``selector`` matches."""
        values: list[str] = self.get(f"/api/v1/label/{label}/values", **{"match[]": selector})[
            "data"
        ]
        return values

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def vector(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query, which must succeed."""
        doc = self.query(expr)
        assert doc["status"] == "success", (expr, doc)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result


@pytest.fixture(scope="module")
def harness() -> Iterator[TrafficHarness]:
    traffic = TrafficHarness(agents=("agent1",))
    traffic.start()
    yield traffic
    traffic.stop()


@pytest.fixture(scope="module")
def prometheus(
    harness: TrafficHarness, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusAPI]:
    binary = tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_S}s",
            "scrape_timeout": f"{SCRAPE_S}s",
            "evaluation_interval": "1s",
        },
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [{"targets": [f"127.0.0.1:{harness.http_port}"]}],
            },
            {
                "job_name": WORKER_JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{port}" for port in harness.agent_http_ports]}
                ],
            },
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = PrometheusAPI(f"http://127.0.0.1:{port}")
    try:
        wait_for(
            "prometheus ready",
            lambda: process.poll() is None and http_get(f"{api.base_url}/-/ready"),
            deadline_s=10,
        )
        assert process.poll() is None, (workdir / "prometheus.log").read_text()
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
        harness.check()


def test_router_exposition_passes_promtool_check_metrics(harness: TrafficHarness) -> None:
    """The real /metrics text, after traffic, is clean by promtool's naming lint."""
    promtool = tool("promtool")

    def exposition() -> str | None:
        text = http_get(f"{harness.base_url}/metrics").decode()
        done = re.search(
            r'^credit_router_credit_outcomes_total\{reason="none",status="completed"\} (\S+)',
            text,
            re.M,
        )
        return text if done and float(done.group(1)) > 0 else None

    text = wait_for("completed credits in /metrics", exposition, deadline_s=10)
    check = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    report = (check.stdout + check.stderr).decode()
    assert check.returncode == 0, report
    assert report.strip() == "", report


def test_prometheus_scrapes_the_router(prometheus: PrometheusAPI) -> None:
    checks = [
        f'up{{job="{JOB}"}} == 1',
        'credit_router_workers{state="active"} == 3',
        'sum(rate(credit_router_credit_outcomes_total{status="completed"}[15s])) > 0',
        'sum(rate(credit_router_credit_outcomes_total{status="failed"}[15s])) > 0',
        "sum(credit_router_worker_capacity) == 24",
        'credit_router_invalid_messages_total{reason="malformed"} >= 1',
        # Issue 13: the process collector, per-worker series and reasons, and the workers.
        f'process_cpu_seconds_total{{job="{JOB}"}} > 0',
        'credit_router_worker_dispatched_total{worker="agent1"} > 0',
        'credit_router_worker_info{worker="agent1", executor="sim", state="active"} == 1',
        'sum(credit_router_credit_outcomes_total{status="failed", reason="worker_error"}) > 0',
        f'up{{job="{WORKER_JOB}"}} == 1',
        f'process_cpu_seconds_total{{job="{WORKER_JOB}"}} > 0',
        'sum(credit_worker_prompt_tokens_total{cache_reported="true"}) > 0',
        "sum(credit_worker_cached_prompt_tokens_total) > 0",
        'credit_worker_info{name="agent1", executor="sim"} == 1',
    ]
    for expr in checks:
        wait_for(expr, functools.partial(prometheus.vector, expr))
    (up,) = prometheus.vector(f'up{{job="{JOB}"}}')
    assert up["metric"]["job"] == JOB


def test_alert_rules_load_and_evaluate_on_live_series(
    prometheus: PrometheusAPI, harness: TrafficHarness
) -> None:
    """rules.yml evaluates cleanly against the real series; a healthy router fires nothing.

    An invalid frame sent once Prometheus scrapes the counter makes CreditRouterInvalidMessages
    *pending* (its ``for: 1m`` has not passed): the rule matches the router's real series.
    (The frame sent before the first scrape cannot: ``increase()`` sees no change in samples
    that all read 1.)
    """
    expected = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }

    def rules() -> list[dict[str, Any]] | None:
        doc = prometheus.get("/api/v1/rules")
        found = [r for g in doc["data"]["groups"] for r in g["rules"]]
        evaluated = all(r.get("lastEvaluation", "").startswith("20") for r in found)
        return found if found and evaluated else None

    found = wait_for("rules loaded and evaluated", rules, deadline_s=10)
    assert {r["name"] for r in found} == expected
    for rule in found:
        assert rule["health"] == "ok", rule
        assert not rule.get("lastError"), rule
    wait_for(
        "invalid-message counter scraped",
        lambda: prometheus.vector("count_over_time(credit_router_invalid_messages_total[1m]) >= 2"),
    )
    harness.send_invalid()
    pending = wait_for(
        "CreditRouterInvalidMessages pending",
        lambda: [
            a
            for a in prometheus.get("/api/v1/alerts")["data"]["alerts"]
            if a["labels"]["alertname"] == "CreditRouterInvalidMessages"
        ],
    )
    assert pending[0]["state"] == "pending"
    assert pending[0]["labels"]["reason"] == "malformed"
    firing = [
        a for a in prometheus.get("/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"
    ]
    assert firing == []


def dashboard_queries() -> list[tuple[str, str]]:
    """Every (panel title, PromQL) of the dashboard, template variables substituted."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], substitute(target["expr"])))
    return out


def substitute(expr: str) -> str:
    for name, value in TEMPLATE.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted template variable in {expr}"
    return expr


def test_every_dashboard_query_evaluates_with_data(prometheus: PrometheusAPI) -> None:
    """Each panel's PromQL is valid on this Prometheus and returns series from the live router."""
    wait_for(
        "two scrapes with traffic",
        lambda: prometheus.vector("sum(rate(credit_router_credits_dispatched_total[15s])) > 0"),
    )
    queries = dashboard_queries()
    assert len(queries) >= 30
    for title, expr in queries:
        doc = prometheus.query(expr)
        assert doc["status"] == "success", f"{title}: {expr}: {doc.get('error')}"
        wait_for(f"{title}: {expr} returns series", functools.partial(prometheus.vector, expr), 5)


def test_dashboard_variables_resolve(prometheus: PrometheusAPI) -> None:
    """The job and instance variables' label_values() queries find the router."""
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for name in ("job", "instance", "worker_job", "worker_instance"):
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variables[name]["definition"])
        assert match, variables[name]["definition"]
        selector, label = substitute(match.group(1)), match.group(2)
        values = wait_for(
            f"${name} values",
            functools.partial(prometheus.label_values, label, selector),
        )
        assert values, name
    assert JOB in prometheus.label_values("job", "credit_router_info")


def test_submit_to_dispatch_reads_zero_for_immediate_dispatches(prometheus: PrometheusAPI) -> None:
    """Credits dispatched in the event batch that submitted them waited 0 s by the router's
    clock: the median reads 0, not the 5 us that interpolating inside a 10 us first bucket
    made up (issue 13)."""
    expr = (
        "histogram_quantile(0.5, sum by (le) "
        "(rate(credit_router_submit_to_dispatch_seconds_bucket[15s])))"
    )
    (sample,) = wait_for(expr, functools.partial(prometheus.vector, f"{expr} >= 0"))
    assert float(sample["value"][1]) == 0.0


def test_sticky_hit_rate_panel_reads_what_the_report_reads(prometheus: PrometheusAPI) -> None:
    """Every session's turns 2 and 3 run on the worker holding it: the report says 100 %, and
    so must the panel (its old definition, counting first turns as misses, read 67 % here)."""
    panel = next(q for t, q in dashboard_queries() if t == "Sticky hit rate")
    (sample,) = wait_for(panel, functools.partial(prometheus.vector, f"({panel}) > 0"))
    assert float(sample["value"][1]) == 1.0


def test_worker_exposition_passes_promtool_check_metrics(harness: TrafficHarness) -> None:
    """The worker agent's real /metrics text, with tokens counted, is clean by promtool."""
    promtool = tool("promtool")
    (port,) = harness.agent_http_ports

    def exposition() -> str | None:
        text = http_get(f"http://127.0.0.1:{port}/metrics").decode()
        done = re.search(r"^credit_worker_cached_prompt_tokens_total (\S+)", text, re.M)
        return text if done and float(done.group(1)) > 0 else None

    text = wait_for("cached tokens in the worker's /metrics", exposition, deadline_s=10)
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    report = (check.stdout + check.stderr).decode()
    assert check.returncode == 0, report
    assert report.strip() == "", report


def test_every_metric_an_alert_reads_is_scraped(prometheus: PrometheusAPI) -> None:
    """An alert on a metric nobody exports evaluates "ok" and never fires: each name a rule
    reads has series in this Prometheus, scraped from the real router."""
    wait_for("router scraped", lambda: prometheus.vector(f'up{{job="{JOB}"}} == 1'))
    names = {
        name
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        for name in re.findall(r"\b((?:credit_router|credit_worker)_[a-z0-9_]+)\b", rule["expr"])
    }
    assert names
    for name in sorted(names):
        wait_for(f"series of {name}", functools.partial(prometheus.vector, f"count({name}) > 0"))
