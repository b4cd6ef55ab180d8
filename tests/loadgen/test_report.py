"""The run report: percentiles, aggregation, rendering, comparison, the progress line."""

from __future__ import annotations

import io
import json

import pytest

from loadgen.replay import CreditRecord, ReplayProgress
from loadgen.report import Collector, Progress, Report, percentile, render_comparison
from loadgen.run import deal


def record(i: int, **kw: object) -> CreditRecord:
    fields: dict[str, object] = {
        "credit_id": i,
        "session": f"s{i % 3}",
        "conversation": "c",
        "root": "r",
        "submitted_at_s": i * 0.1,
        "status": "completed",
        "worker": f"w{i % 2}",
        "ttft_s": 0.01 * (i + 1),
        "e2e_s": 0.1,
        "itl_s": 0.005,
        "input_tokens": 100,
        "cached_tokens": 50,
        "output_tokens": 10,
        "submit_to_dispatch_s": 0.0,
    }
    fields.update(kw)
    return CreditRecord(**fields)  # type: ignore[arg-type]


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 90) == 90.0


def test_collector_and_report() -> None:
    out = io.BytesIO()
    c = Collector(out)
    for i in range(10):
        c.add(record(i, affinity=i % 5 != 0, turn_index=1))
    c.add(record(10, status="failed", reason="http_503", ttft_s=None, turn_index=0))
    c.add(record(11, status="completed", rebuilt=True, cached_tokens=None, turn_index=0))
    assert len(out.getvalue().splitlines()) == 12
    assert json.loads(out.getvalue().splitlines()[10])["reason"] == "http_503"
    report = Report("sticky", "test", "w", 2.0, c, trees_started=3)
    d = report.as_dict()
    assert d["outcomes"] == {"completed": 11, "failed": 1}
    assert d["throughput_per_s"] == 5.5
    assert d["sticky_hit_rate"] == 0.8
    assert d["prefix_cache_hit_rate"] == 0.5  # the credit without a cached count is left out
    assert d["rebuilt_turns"] == 1
    assert d["latency"]["ttft_s"]["count"] == 11
    assert d["latency"]["ttft_s"]["p50"] == pytest.approx(0.06)
    assert d["workers"]["w0"]["credits"] == 6
    text = report.render()
    assert "failed 1 (http_503 1)" in text
    assert "80.0% of 10 turns" in text
    table = render_comparison([report, Report("least_loaded", "test", "w", 2.0, c)])
    assert next(line.split() for line in table.splitlines() if line.strip()) == [
        "sticky",
        "least_loaded",
    ]
    assert "prefix-cache hits" in table


def test_progress_prints_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    snapshot = ReplayProgress(
        elapsed_s=5.0, submitted=60, done=50, errors=2, in_flight=10, trees_started=4,
        trees_live=2, expected_credits=None, stopping=False,
    )  # fmt: skip
    progress = Progress(lambda: snapshot, duration_s=10.0, out=out)
    assert not progress.tty
    assert progress.interval_s == 10.0  # not a terminal: a line every 10 s at most
    progress.draw(5.0)
    line = out.getvalue()
    assert line.endswith("\n")
    assert "\r" not in line
    assert "[############------------]" in line
    assert "errors 2" in line


def test_endpoints_are_dealt_to_workers() -> None:
    assert deal(["a", "b", "c"], 3) == [["a"], ["b"], ["c"]]
    assert deal(["a", "b", "c", "d"], 2) == [["a", "c"], ["b", "d"]]
    assert deal(["a", "b"], 3) == [["a", "b"]] * 3
