"""The run report: percentiles, aggregation, rendering, comparison, the progress line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pty
import re
import select

import pytest

from loadgen.replay import NO_OUTCOME, CreditRecord, ReplayProgress
from loadgen.report import Collector, Progress, Report, Slo, percentile, render_comparison
from loadgen.run import (
    EXIT_BAD_INPUT,
    EXIT_ERRORS,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_SLO,
    deal,
    exit_status,
)


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
    assert "TTFT content" not in text  # no credit told content from other tokens: no empty row
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


# ---------------------------------------------------------------------- issue 11 and 13


def late(i: int, producer_s: float, queue_s: float, **kw: object) -> CreditRecord:
    """A completed credit intended at i/10 s that left ``producer_s`` + ``queue_s`` late."""
    intended = i * 0.1
    return record(
        i,
        intended_at_s=intended,
        submitted_at_s=intended + producer_s,
        submit_to_dispatch_s=queue_s,
        lateness_s=producer_s + queue_s,
        ttft_from_intended_s=producer_s + queue_s + 0.01 * (i + 1),
        e2e_from_intended_s=producer_s + queue_s + 0.1,
        **kw,
    )


def test_lateness_is_reported_by_stage_and_warned_about_in_one_line_naming_where() -> None:
    # Why 2: credits waiting in the router for capacity looked on time: TTFT measured from the
    # worker's send, no intended time, no warning.
    c = Collector()
    for i in range(100):
        c.add(late(i, producer_s=0.001, queue_s=1.2 if i % 4 else 0.0))
    report = Report("sticky", "t", "w", 10.0, c)
    stages = report.lateness()
    assert stages["submitted_to_dispatched_s"]["p99"] == pytest.approx(1.2)
    assert stages["intended_to_submitted_s"]["p99"] == pytest.approx(0.001)
    assert stages["intended_to_dispatched_s"]["p50"] == pytest.approx(1.201)
    latency = report.latency()
    assert latency["ttft_from_intended_s"]["p50"] > 1.0 > latency["ttft_s"]["p50"]
    warning = report.lateness_warning()
    assert warning is not None
    assert "\n" not in warning
    assert "router queue" in warning
    assert "75% of credits late" in warning
    text = report.render(200)
    assert warning in text.replace("\n", " ") or warning.split(":")[0] in text
    assert "TTFT from intended" in text
    assert "intended→dispatched" in text
    # The producer falling behind is named as such; on time, no warning.
    c = Collector()
    for i in range(100):
        c.add(late(i, producer_s=0.2, queue_s=0.0))
    warning = Report("sticky", "t", "w", 10.0, c).lateness_warning()
    assert warning is not None
    assert "producer" in warning.split("mostly")[1][:20]
    c = Collector()
    for i in range(100):
        c.add(late(i, producer_s=0.001, queue_s=0.002))
    assert Report("sticky", "t", "w", 10.0, c).lateness_warning() is None
    assert Report("sticky", "t", "w", 10.0, c, lateness_threshold_s=0.001).lateness_warning()


def test_outcomes_never_hide_counts_and_the_stop_is_not_an_error() -> None:
    # Why 4: the outcome line listed the top reasons and dropped the rest; --compare counted
    # the run's own stop cancellations as errors.
    c = Collector()
    for i in range(6):
        c.add(record(i))
    for i, reason in enumerate(["a", "a", "b", "c", "d", "e", "e"]):
        c.add(record(10 + i, status="failed", reason=reason, ttft_s=None))
    for i in range(4):
        c.add(record(20 + i, status="cancelled", reason="cancelled", stopped=True))
    c.add(record(30, status="cancelled", reason="client_disconnect"))
    not_sent = {"failure": {"turns": 2, "children": 3, "credits": 7, "joins": 1}, "stop": {}}
    report = Report("sticky", "t", "w", 2.0, c, not_sent=not_sent)
    text = report.render(200)
    assert "failed 7 (a 2, e 2, b 1, +2 other in 2 reasons)" in text
    assert "cancelled 1 (client_disconnect 1)" in text
    assert "stopped 4 (cancelled by the run's end: not errors)" in text
    assert "7 credits after failed turns (2 later turns, 3 child sessions" in text
    assert "1 joins suppressed" in text
    d = report.as_dict()
    assert (d["errors"], d["stopped"], d["not_sent"]["failure"]["credits"]) == (8, 4, 7)
    table = render_comparison([report, report], 200)
    cells = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[2:]]
    rows = {row[0]: row[-1] for row in cells if row}
    assert rows["errors"] == "8"
    assert rows["stopped at the end"] == "4"
    assert rows["not sent (failures)"] == "7"


def test_slo_goodput_and_the_exit_status() -> None:
    # Why 5: any completed credit gave exit 0 (26 lost and 11 rejected did too).
    slo = Slo.parse("ttft_ms=50,e2e_ms=500,attainment=0.5")
    assert (slo.ttft_s, slo.e2e_s, slo.attainment) == (0.05, 0.5, 0.5)
    for bad in ("ttft=5", "ttft_ms=abc", "attainment=2", "ttft_ms=-1", "attainment=0.5"):
        with pytest.raises(ValueError, match="--slo"):
            Slo.parse(bad)
    c = Collector()
    for i in range(10):  # TTFT from intended 10..100 ms: 5 of 10 within 50 ms
        c.add(late(i, producer_s=0.0, queue_s=0.0))
    report = Report("sticky", "t", "w", 2.0, c, slo=slo)
    goodput = report.goodput()
    assert goodput is not None
    assert (goodput["met"], goodput["goodput_per_s"], goodput["breached"]) == (5, 2.5, False)
    assert "goodput" in report.render(200)
    assert exit_status([report]) == EXIT_OK
    report.slo = Slo(ttft_s=0.05, attainment=0.9)
    assert exit_status([report]) == EXIT_SLO
    c.add(record(99, status="lost", reason="worker_lost", ttft_s=None))
    report.slo = None
    assert exit_status([report]) == EXIT_ERRORS  # strict default: no failure allowed
    assert exit_status([report], max_error_rate=0.1) == EXIT_OK
    report.unfinished = 1  # a credit never got an outcome
    assert exit_status([report], max_error_rate=0.1) == EXIT_INCOMPLETE
    report.unfinished = 0
    report.problems = ["worker-1 exited with status 1"]
    assert exit_status([report], max_error_rate=0.1) == EXIT_INCOMPLETE
    assert exit_status([], interrupted=True) == EXIT_INCOMPLETE
    assert EXIT_BAD_INPUT == 2
    assert len({EXIT_OK, EXIT_ERRORS, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_SLO}) == 5


def test_a_run_without_a_completed_credit_is_incomplete_and_no_outcome_is_kept_apart() -> None:
    # Every credit stopped by the run's end: no error, but nothing measured (was exit 0).
    c = Collector()
    for i in range(4):
        c.add(record(i, status="cancelled", reason="cancelled", stopped=True, ttft_s=None))
    report = Report("sticky", "t", "w", 2.0, c)
    assert report.error_rate() == 0.0
    assert exit_status([report]) == EXIT_INCOMPLETE
    # A credit that never got an outcome has its record, written, not among those with one.
    out = io.BytesIO()
    c = Collector(out)
    c.add(record(1))
    c.add(record(2, status=NO_OUTCOME, reason="gave_up_waiting", ttft_s=None, worker=""))
    assert [json.loads(line)["status"] for line in out.getvalue().splitlines()] == [
        "completed",
        "no_outcome",
    ]
    report = Report("sticky", "t", "w", 2.0, c, unfinished=1)
    assert (c.credits, c.errors, c.no_outcome, len(c.records)) == (1, 0, 1, 2)
    assert report.as_dict()["outcomes"] == {"completed": 1}
    assert "1 with an outcome, 1 without (gave up waiting)" in report.render(200)
    rebuilt = Report.from_summary(report.as_dict(), c.records)
    assert (rebuilt.collector.credits, rebuilt.collector.no_outcome) == (1, 1)
    assert exit_status([report]) == EXIT_INCOMPLETE


def test_report_and_progress_fit_a_60_column_terminal() -> None:
    # Issue 13 Why 7: the progress line wrapped and scrolled on a 60-column terminal.
    c = Collector()
    for i in range(20):
        c.add(late(i, producer_s=0.001, queue_s=0.3))
    text = Report("least_loaded", "local router + 3 workers", "w", 2.0, c).render(60)
    table = [line for line in text.splitlines() if not line.startswith("WARNING")]
    assert len(table) < len(text.splitlines())  # the warning: one line, the terminal folds it
    assert max(len(line) for line in table) <= 60
    snapshot = ReplayProgress(
        elapsed_s=125.0, submitted=1_234_567, done=1_234_000, errors=12_345, in_flight=567,
        trees_started=4, trees_live=2, expected_credits=9_999_999, stopping=True,
    )  # fmt: skip
    progress = Progress(lambda: snapshot, duration_s=300.0, out=io.StringIO(), label="sticky ")
    for width in (40, 60, 80, 200):
        line = progress.line(snapshot, 1234.5, width)
        assert len(line) <= width
        assert "credits 1,234,000/9,999,999" in line
    assert "errors 12,345" in progress.line(snapshot, 1.0, 100)


def test_log_lines_print_above_the_live_progress_line_not_into_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")  # a terminal that can redraw a line
    master, slave = pty.openpty()
    out = os.fdopen(slave, "w", buffering=1)
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    snapshot = ReplayProgress(
        elapsed_s=1.0, submitted=5, done=4, errors=0, in_flight=1, trees_started=1,
        trees_live=1, expected_credits=10, stopping=False,
    )  # fmt: skip

    async def scenario() -> None:
        progress = Progress(lambda: snapshot, duration_s=None, out=out, interval_s=0.01)
        assert progress.tty
        progress.start()
        await asyncio.sleep(0.05)
        logging.getLogger("test").warning("a log line while the bar is up")
        await asyncio.sleep(0.05)
        await progress.stop()

    try:
        asyncio.run(scenario())
        out.flush()
        seen = b""
        while select.select([master], [], [], 0.2)[0]:
            seen += os.read(master, 65536)
    finally:
        root.removeHandler(handler)
        out.close()
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode())
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    assert "a log line while the bar is up" in lines  # a line of its own
    assert any(line.startswith("[") and "credits 4/10" in line for line in lines)
    assert handler.stream is out  # given back


def test_a_dumb_terminal_gets_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as out:
        progress = Progress(lambda: pytest.fail("not drawn"), duration_s=None, out=out)
        assert not progress.tty
        assert progress.interval_s == 10.0
    os.close(master)
