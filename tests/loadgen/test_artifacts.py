"""The run directory: what ``--output`` writes, and ``credit-router report`` reading it back."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loadgen.artifacts import FIELDS, load_reports, report_command, write_run
from loadgen.plots import PLOTS
from loadgen.report import Collector, Report, Slo
from loadgen.run import RunSettings
from loadgen.workload import GeneratorParams, generate
from tests.loadgen.test_report import late, record


def _report(policy: str, n: int = 40) -> Report:
    c = Collector()
    for i in range(n):
        c.add(late(i, producer_s=0.001, queue_s=0.4 if i % 2 else 0.0, worker=f"w{i % 3}"))
    c.add(record(n, status="failed", reason="http_503", ttft_s=None, input_tokens=None,
                 output_tokens=None, cached_tokens=None, error="overloaded"))  # fmt: skip
    not_sent = {"failure": {"turns": 1, "children": 0, "credits": 1, "joins": 0}, "stop": {}}
    return Report(policy, "local", "w", 5.0, c, trees_started=n, not_sent=not_sent,
                  slo=Slo(ttft_s=0.2))  # fmt: skip


def test_a_run_directory_round_trips_and_renders_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _report("sticky")
    settings = RunSettings(argv=("--rate", "8"))
    workload = generate(GeneratorParams(sessions=3))
    out = tmp_path / "run"
    write_run(out, [report], settings, workload, exit_status=1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_status"] == 1
    assert summary["not_sent"]["failure"]["credits"] == 1
    with (out / "records.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == FIELDS
        rows = list(reader)
    assert len(rows) == 41
    failed = rows[-1]
    assert (failed["status"], failed["error"], failed["output_tokens"]) == (
        "failed", "overloaded", ""
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == ["credit-router", "run", "--rate", "8"]
    assert config["workload"]["roots"] == 3
    assert {"python", "msgspec", "matplotlib", "rich"} <= config["versions"].keys()
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(PLOTS)
    (again,) = load_reports(out)
    assert again.as_dict() == report.as_dict()  # every figure recomputed from the records
    assert report_command([out]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == report.render(100).strip()


def test_a_comparison_directory_and_comparing_two_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = generate(GeneratorParams(sessions=2))
    out = tmp_path / "cmp"
    single = _report("sticky", 10)
    write_run(out, [single], RunSettings(), workload, exit_status=0)  # with plots, once
    write_run(out, [_report("sticky"), _report("least_loaded", 20)], RunSettings(), workload,
              exit_status=0, plots=False)  # fmt: skip
    assert not (out / "plots").exists()
    assert not (out / "summary.json").exists()  # the earlier single run's files are gone
    assert (out / "comparison.txt").read_text().split("\n")[1].split() == [
        "sticky", "least_loaded"
    ]  # fmt: skip
    assert [r.policy for r in load_reports(out)] == ["least_loaded", "sticky"]
    other = tmp_path / "base"
    write_run(other, [single], RunSettings(), workload, exit_status=0, plots=False)
    capsys.readouterr()
    assert report_command([other, out]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.strip())
    assert header.split() == ["base", "cmp:least_loaded", "cmp:sticky"]
    assert report_command([tmp_path / "missing"]) == 2
    assert "no such directory" in capsys.readouterr().err
