"""The run directory (``credit-router run --output DIR``) and reading it back (``report``).

One run (one routing policy) writes::

    DIR/
      summary.json     the report as data (``Report.as_dict``), plus the exit status
      report.txt       the report as printed
      records.jsonl    one ``CreditRecord`` per line (pandas: ``read_json(lines=True)``)
      records.csv      the same, one row per credit, a column per field
      config.json      the run's settings, command line, workload summary, versions, host
      plots/*.png      ``loadgen.plots.PLOTS``

``--compare`` writes one such directory per policy (``DIR/sticky``, ``DIR/least_loaded``) and,
at the top, ``config.json`` and ``comparison.txt``.

``load_reports(DIR)`` rebuilds the reports of a directory (one, or both of a comparison) from
``summary.json`` and ``records.jsonl``; ``report_command`` is ``credit-router report DIR
[DIR2]``: it re-renders one directory, or compares two side by side.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from loadgen.plots import PLOTS, draw
from loadgen.replay import CreditRecord
from loadgen.report import Report, render_comparison

if TYPE_CHECKING:
    from loadgen.run import RunSettings
    from loadgen.workload import Workload

__all__ = ["FIELDS", "load_reports", "report_command", "write_records_csv", "write_run"]

FIELDS = tuple(f.name for f in msgspec.structs.fields(CreditRecord))
"""The records' fields, in the order of ``records.csv``'s columns."""

_PACKAGES = ("credit-router", "msgspec", "pyzmq", "aiohttp", "uvloop", "matplotlib", "rich")
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CreditRecord)


class ArtifactError(Exception):
    """A directory that is not a run directory, or a file in it that does not read."""


def versions() -> dict[str, str]:
    """The installed versions of the packages a run's figures depend on, and Python's."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _plain(value: Any) -> Any:
    """Settings as JSON: dataclasses to dicts, paths to strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def write_records_csv(records: list[CreditRecord], path: Path) -> None:
    """One row per record, one column per field (``FIELDS``); empty cells for ``None``."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for r in records:
            writer.writerow(["" if (v := getattr(r, name)) is None else v for name in FIELDS])


def _write_one(directory: Path, report: Report, exit_status: int, plots: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    records = report.collector.records
    summary = {**report.as_dict(), "exit_status": exit_status}
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (directory / "report.txt").write_text(report.render(100) + "\n")
    with (directory / "records.jsonl").open("wb") as f:
        for r in records:
            f.write(_encoder.encode(r) + b"\n")
    write_records_csv(records, directory / "records.csv")
    if not plots:
        return
    draw(
        records,
        directory / "plots",
        title=f"{report.workload} · routing {report.policy} · {report.topology}",
        lateness_threshold_s=report.lateness_threshold_s,
    )


def write_run(
    directory: Path,
    reports: list[Report],
    settings: RunSettings,
    workload: Workload,
    *,
    exit_status: int,
    plots: bool = True,
) -> None:
    """Write the run directory (module docstring); ``plots=False`` leaves out ``plots/``.

    Raises:
        OSError: the directory cannot be written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _clear(directory)
    config = {
        "command": ["credit-router", "run", *settings.argv],
        "written_unix_s": time.time(),
        "exit_status": exit_status,
        "settings": _plain(settings),
        "workload": {
            "source": workload.source,
            "description": workload.description,
            **workload.summary(),
        },
        "versions": versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "runs": [r.policy for r in reports],
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if len(reports) == 1:
        _write_one(directory, reports[0], exit_status, plots)
        return
    for report in reports:
        _write_one(directory / _slug(report.policy), report, exit_status, plots)
    (directory / "comparison.txt").write_text(render_comparison(reports, 100) + "\n")


_FILES = ("summary.json", "report.txt", "records.jsonl", "records.csv", "comparison.txt")


def _clear(directory: Path) -> None:
    """Remove an earlier run's artifacts from ``directory`` (``make run`` reuses one), so that
    a single run never sits beside a stale comparison or the other way round. Other files stay.
    """
    for sub in [directory, *(p for p in directory.iterdir() if (p / "summary.json").exists())]:
        for name in _FILES:
            (sub / name).unlink(missing_ok=True)
        for name in PLOTS:
            (sub / "plots" / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (sub / "plots").rmdir()
        if sub is not directory:
            with contextlib.suppress(OSError):
                sub.rmdir()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "run"


def _load_one(directory: Path) -> Report:
    try:
        summary = json.loads((directory / "summary.json").read_text())
        lines = (directory / "records.jsonl").read_bytes().splitlines()
        records = [_decoder.decode(line) for line in lines if line.strip()]
    except FileNotFoundError as exc:
        missing = Path(exc.filename).name
        raise ArtifactError(f"{directory}: not a run directory (no {missing})") from None
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        raise ArtifactError(f"{directory}: cannot read the run: {exc}") from None
    if not isinstance(summary, dict):
        raise ArtifactError(f"{directory}/summary.json: not a run summary")
    return Report.from_summary(summary, records)


def load_reports(directory: Path) -> list[Report]:
    """The reports a run directory holds: one, or one per policy of a comparison.

    Raises:
        ArtifactError: not a run directory, or one of its files does not read.
    """
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such directory")
    if (directory / "summary.json").exists():
        return [_load_one(directory)]
    runs = sorted(p for p in directory.iterdir() if (p / "summary.json").exists())
    if not runs:
        raise ArtifactError(f"{directory}: not a run directory (no summary.json)")
    return [_load_one(p) for p in runs]


def report_command(directories: list[Path], *, json_out: bool = False, width: int = 100) -> int:
    """``credit-router report DIR [DIR2]``: print one run's report, or compare two.

    Returns 0, or 2 with one line on standard error for a directory that does not read.
    """
    try:
        groups = [load_reports(d) for d in directories]
    except ArtifactError as exc:
        print(f"credit-router report: {exc}", file=sys.stderr)
        return 2
    reports: list[Report] = []
    for directory, group in zip(directories, groups, strict=True):
        for report in group:
            if len(directories) > 1:
                report.policy = (
                    f"{directory.name}:{report.policy}" if len(group) > 1 else (directory.name)
                )
            reports.append(report)
    if json_out:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
        return 0
    if len(directories) == 1:
        for report in reports:
            print(report.render(width))
            print()
    if len(reports) > 1:
        print(render_comparison(reports, width))
    return 0
