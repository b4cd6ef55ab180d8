"""What ``credit-router run`` shows: a live progress line, then the report (or two, compared).

``Collector`` takes every ``CreditRecord`` as it arrives (and writes it as a JSON line when
asked); ``Report`` turns the collection into the figures a benchmark is read by: throughput,
TTFT / ITL / end-to-end / submit→dispatch percentiles over completed credits, TTFT and E2E
measured from each credit's *intended* time beside the worker-measured ones, lateness split by
stage (intended → submitted → dispatched → first token) with a one-line warning when its p99
passes ``lateness_threshold_s``, outcomes by status and reason (credits the run's own stop
cancelled apart from errors), what the workload declared but the run never sent, goodput
against SLOs, the sticky-hit rate (turns with history that ran on the worker holding it), the
prefix-cache hit rate (prompt tokens the servers reported cached), turns whose history had to be
rebuilt, and the balance of credits over workers. ``render_comparison`` puts reports side by
side. ``Report.from_directory`` rebuilds a report from a run directory (``loadgen.artifacts``).

Tables are drawn with ``rich`` (it fits them to narrow terminals). ``Progress`` keeps one live
line at the bottom of a terminal (``rich.live``: log lines print above it, never into it) and,
when the output is not a terminal (CI logs), prints one plain line every ``quiet_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

import msgspec
from rich import box
from rich.console import Console
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.table import Table
from rich.text import Text

from loadgen.replay import NO_OUTCOME, CreditRecord, ReplayProgress

__all__ = [
    "Collector",
    "Progress",
    "Report",
    "Slo",
    "percentile",
    "render_comparison",
]

_COMPLETED: Final = "completed"
_encoder: Final = msgspec.json.Encoder()
DEFAULT_LATENESS_THRESHOLD_S: Final = 0.05
"""p99 lateness (intended → dispatched) above which the report warns."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) of ``values``, linearly interpolated; ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Slo:
    """Service-level objectives a request must all meet to count toward goodput.

    TTFT and E2E are measured from the credit's intended time when it has one (the wait a
    user of the schedule saw), else as the worker measured them. A credit that did not complete
    meets none. ``attainment`` is the fraction of credits that must meet them for the run to
    pass (``--slo``: exit status 4 below it).
    """

    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: float | None = None
    attainment: float = 0.99

    @classmethod
    def parse(cls, text: str) -> Slo:
        """``ttft_ms=500,e2e_ms=5000[,itl_ms=50][,attainment=0.9]``.

        Raises:
            ValueError: an unknown key, a value that is not a positive number, or no objective.
        """
        values: dict[str, float] = {}
        keys = {"ttft_ms": "ttft_s", "e2e_ms": "e2e_s", "itl_ms": "itl_s"}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or key not in (*keys, "attainment"):
                raise ValueError(
                    f"--slo {item!r}: expected KEY=VALUE, KEY one of "
                    "ttft_ms, e2e_ms, itl_ms, attainment"
                )
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"--slo {item!r}: {raw!r} is not a number") from None
            if not value > 0 or (key == "attainment" and value > 1):
                raise ValueError(f"--slo {item!r}: must be > 0 (attainment at most 1)")
            values[keys.get(key, key)] = value / 1e3 if key in keys else value
        if not {"ttft_s", "e2e_s", "itl_s"} & values.keys():
            raise ValueError("--slo: give at least one of ttft_ms, e2e_ms, itl_ms")
        return cls(**values)

    def met(self, record: CreditRecord) -> bool:
        """Did this credit complete within every objective?"""
        if record.status != _COMPLETED:
            return False
        ttft = _first(record.ttft_from_intended_s, record.ttft_s)
        e2e = _first(record.e2e_from_intended_s, record.e2e_s, record.dispatch_to_outcome_s)
        for limit, value in ((self.ttft_s, ttft), (self.e2e_s, e2e), (self.itl_s, record.itl_s)):
            if limit is not None and (value is None or value > limit):
                return False
        return True

    def describe(self) -> str:
        """``TTFT ≤ 500 ms, E2E ≤ 5000 ms``."""
        parts = [
            f"{name} ≤ {value * 1e3:g} ms"
            for name, value in (("TTFT", self.ttft_s), ("E2E", self.e2e_s), ("ITL", self.itl_s))
            if value is not None
        ]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, float | None]:
        """Plain data (milliseconds, as given)."""
        return {
            "ttft_ms": None if self.ttft_s is None else self.ttft_s * 1e3,
            "e2e_ms": None if self.e2e_s is None else self.e2e_s * 1e3,
            "itl_ms": None if self.itl_s is None else self.itl_s * 1e3,
            "attainment": self.attainment,
        }


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


class Collector:
    """Aggregates credit records as they arrive (and keeps them, for exports and plots).

    Args:
        records_out: if given, every record is written to it as one JSON line.
    """

    def __init__(self, records_out: IO[bytes] | None = None) -> None:
        self.records_out = records_out
        self.records: list[CreditRecord] = []
        self.credits = 0
        self.stopped = 0
        """Credits the run's own stop cancelled (not errors)."""
        self.no_outcome = 0
        """Records of credits that never got an outcome (status ``no_outcome``): kept and
        written, but not among ``credits`` (those with an outcome); ``Report.unfinished``."""
        self.statuses: Counter[str] = Counter()
        self.reasons: Counter[tuple[str, str]] = Counter()
        self.ttft_s: list[float] = []
        self.itl_s: list[float] = []
        self.e2e_s: list[float] = []
        self.wait_s: list[float] = []
        self.ttft_intended_s: list[float] = []
        self.e2e_intended_s: list[float] = []
        self.late_submit_s: list[float] = []
        """Intended → submitted (the producer's lateness)."""
        self.late_dispatch_s: list[float] = []
        """Intended → dispatched (the lateness the warning is about)."""
        self.dispatch_first_token_s: list[float] = []
        """Dispatched → first token (worker send, server queue and prefill)."""
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.reported_prompt_tokens = 0
        """Prompt tokens of the credits whose server reported cached tokens."""
        self.output_tokens = 0
        self.reasoning_tokens = 0
        self.reasoning_known_output = 0
        """Output tokens of the credits whose reasoning count is known."""
        self.ttft_content_s: list[float] = []
        self.tool_calls = 0
        self.affinity_hits = 0
        self.affinity_turns = 0
        self.rebuilt = 0
        self.workers: Counter[str] = Counter()
        self.sessions: dict[str, set[str]] = {}
        self.modes: Counter[str] = Counter()

    @property
    def completed(self) -> int:
        """Credits that completed."""
        return self.statuses.get(_COMPLETED, 0)

    @property
    def errors(self) -> int:
        """Credits that ended other than completed, apart from those the stop cancelled."""
        return self.credits - self.completed - self.stopped

    def add(self, record: CreditRecord) -> None:
        """Take one record (the replayer's ``on_record``)."""
        self.records.append(record)
        if self.records_out is not None:
            self.records_out.write(_encoder.encode(record) + b"\n")
        if record.status == NO_OUTCOME:
            self.no_outcome += 1
            return
        self._count(record)

    def _count(self, record: CreditRecord) -> None:
        """Count a record with an outcome."""
        self.credits += 1
        status = record.status
        self.statuses[status] += 1
        if record.stopped:
            self.stopped += 1
        elif status != _COMPLETED:
            self.reasons[(status, record.reason)] += 1
        if record.turn_index == 0:
            mode = record.branch_mode or ("root" if record.session == record.root else "pre")
            self.modes[mode] += 1
        if record.worker:
            self.workers[record.worker] += 1
            self.sessions.setdefault(record.worker, set()).add(record.session)
        if record.submit_to_dispatch_s is not None:
            self.wait_s.append(record.submit_to_dispatch_s)
        if record.intended_at_s is not None:
            self.late_submit_s.append(record.submitted_at_s - record.intended_at_s)
        if record.lateness_s is not None:
            self.late_dispatch_s.append(record.lateness_s)
        if record.affinity is not None:
            self.affinity_turns += 1
            self.affinity_hits += record.affinity
        if status == _COMPLETED:
            self._completed(record)

    def _completed(self, record: CreditRecord) -> None:
        for value, values in (
            (record.ttft_s, self.ttft_s),
            (record.itl_s, self.itl_s),
            (_first(record.e2e_s, record.dispatch_to_outcome_s), self.e2e_s),
            (record.ttft_from_intended_s, self.ttft_intended_s),
            (record.e2e_from_intended_s, self.e2e_intended_s),
        ):
            if value is not None:
                values.append(value)
        if record.ttft_from_intended_s is not None and record.lateness_s is not None:
            self.dispatch_first_token_s.append(record.ttft_from_intended_s - record.lateness_s)
        prompt = record.input_tokens or 0
        self.prompt_tokens += prompt
        self.output_tokens += record.output_tokens or 0
        if record.reasoning_tokens is not None:
            self.reasoning_tokens += record.reasoning_tokens
            self.reasoning_known_output += record.output_tokens or 0
        if record.ttft_content_s is not None:
            self.ttft_content_s.append(record.ttft_content_s)
        self.tool_calls += record.tool_calls
        if record.cached_tokens is not None:
            self.cached_tokens += record.cached_tokens
            self.reported_prompt_tokens += prompt
        self.rebuilt += record.rebuilt


_LATENCY: Final = {
    "ttft_s": "TTFT",
    "ttft_content_s": "TTFT content",
    "ttft_from_intended_s": "TTFT from intended",
    "itl_s": "ITL",
    "e2e_s": "E2E",
    "e2e_from_intended_s": "E2E from intended",
    "submit_to_dispatch_s": "submit→dispatch",
}
_STAGES: Final = {
    "intended_to_submitted_s": "intended→submitted",
    "submitted_to_dispatched_s": "submitted→dispatched",
    "dispatched_to_first_token_s": "dispatched→first token",
    "intended_to_dispatched_s": "intended→dispatched",
}


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
        "count": len(values),
    }


@dataclass
class Report:
    """One run's figures (``Collector`` plus what the run knows about itself)."""

    policy: str
    topology: str
    workload: str
    duration_s: float
    """Wall time of the load, from the first submission to the end of the run."""
    collector: Collector
    trees_started: int = 0
    unfinished: int = 0
    not_sent: dict[str, dict[str, int]] = field(default_factory=dict)
    """``{"failure": {...}, "stop": {...}}`` from ``Replayer.not_sent``."""
    servers: list[dict[str, Any]] = field(default_factory=list)
    """The mock servers' own counters, when the run started them."""
    problems: list[str] = field(default_factory=list)
    """What went wrong with the cluster during the run (a process that exited)."""
    lateness_threshold_s: float = DEFAULT_LATENESS_THRESHOLD_S
    slo: Slo | None = None

    # ------------------------------------------------------------------ figures

    def latency(self) -> dict[str, dict[str, float | None]]:
        """p50/p90/p99/max/mean in seconds, and the count, per metric (completed credits)."""
        c = self.collector
        values = {
            "ttft_s": c.ttft_s,
            "ttft_content_s": c.ttft_content_s,
            "ttft_from_intended_s": c.ttft_intended_s,
            "itl_s": c.itl_s,
            "e2e_s": c.e2e_s,
            "e2e_from_intended_s": c.e2e_intended_s,
            "submit_to_dispatch_s": c.wait_s,
        }
        return {name: _stats(v) for name, v in values.items()}

    def lateness(self) -> dict[str, dict[str, float | None]]:
        """The stages from intended time to first token, in seconds (every credit measured)."""
        c = self.collector
        values = {
            "intended_to_submitted_s": c.late_submit_s,
            "submitted_to_dispatched_s": c.wait_s,
            "dispatched_to_first_token_s": c.dispatch_first_token_s,
            "intended_to_dispatched_s": c.late_dispatch_s,
        }
        return {name: _stats(v) for name, v in values.items()}

    def lateness_warning(self) -> str | None:
        """One line when p99 lateness passes the threshold, naming where the time went."""
        stages = self.lateness()
        p99 = stages["intended_to_dispatched_s"]["p99"]
        if p99 is None or p99 <= self.lateness_threshold_s:
            return None
        producer = stages["intended_to_submitted_s"]["p99"] or 0.0
        queue = stages["submitted_to_dispatched_s"]["p99"] or 0.0
        late = sum(1 for x in self.collector.late_dispatch_s if x > self.lateness_threshold_s)
        share = late / len(self.collector.late_dispatch_s)
        if queue >= producer:
            where = (
                f"waiting in the router queue for worker capacity (p99 {_sec(queue)}; "
                f"producer p99 {_sec(producer)})"
            )
        else:
            where = (
                f"in the producer, which could not keep up (p99 {_sec(producer)}; "
                f"router queue p99 {_sec(queue)})"
            )
        return (
            f"WARNING: p99 lateness {_sec(p99)} > {_sec(self.lateness_threshold_s)} "
            f"({share:.0%} of credits late), mostly {where}: the load fell behind its "
            "schedule, read TTFT/E2E from intended"
        )

    def goodput(self) -> dict[str, Any] | None:
        """Credits meeting every SLO: count, per second, and as a fraction (``None``: no SLO)."""
        if self.slo is None:
            return None
        c = self.collector
        met = sum(1 for r in c.records if self.slo.met(r))
        judged = c.credits - c.stopped
        attainment = met / judged if judged else None
        return {
            "slo": self.slo.as_dict(),
            "met": met,
            "judged": judged,
            "goodput_per_s": met / self.duration_s if self.duration_s else None,
            "attainment": attainment,
            "breached": attainment is None or attainment < self.slo.attainment,
        }

    def error_rate(self) -> float:
        """Errors (not the stop's cancellations) over credits with an outcome."""
        c = self.collector
        return c.errors / c.credits if c.credits else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Everything, as plain data (``--json``, ``summary.json``)."""
        c = self.collector
        balance = _balance(c.workers)
        return {
            "policy": self.policy,
            "topology": self.topology,
            "workload": self.workload,
            "duration_s": round(self.duration_s, 3),
            "trees_started": self.trees_started,
            "sessions_started": dict(c.modes),
            "credits": c.credits,
            "unfinished": self.unfinished,
            "outcomes": dict(c.statuses),
            "errors": c.errors,
            "stopped": c.stopped,
            "error_rate": self.error_rate(),
            "reasons": {f"{s}: {r}": n for (s, r), n in c.reasons.most_common()},
            "not_sent": self.not_sent,
            "throughput_per_s": c.completed / self.duration_s if self.duration_s else None,
            "output_tokens_per_s": c.output_tokens / self.duration_s if self.duration_s else None,
            "latency": self.latency(),
            "lateness": self.lateness(),
            "lateness_threshold_s": self.lateness_threshold_s,
            "lateness_warning": self.lateness_warning(),
            "goodput": self.goodput(),
            "sticky_hit_rate": c.affinity_hits / c.affinity_turns if c.affinity_turns else None,
            "turns_with_history": c.affinity_turns,
            "prefix_cache_hit_rate": (
                c.cached_tokens / c.reported_prompt_tokens if c.reported_prompt_tokens else None
            ),
            "output_tokens": c.output_tokens,
            "reasoning_tokens": c.reasoning_tokens if c.reasoning_known_output else None,
            "content_tokens": (
                c.reasoning_known_output - c.reasoning_tokens if c.reasoning_known_output else None
            ),
            "tool_calls": c.tool_calls,
            "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "rebuilt_turns": c.rebuilt,
            "workers": {
                w: {"credits": n, "sessions": len(c.sessions[w])}
                for w, n in sorted(c.workers.items())
            },
            "balance_max_over_mean": balance,
            "servers": self.servers,
            "problems": self.problems,
        }

    @classmethod
    def from_summary(cls, summary: dict[str, Any], records: Iterable[CreditRecord]) -> Report:
        """Rebuild a report from its ``as_dict`` and its records (``credit-router report``)."""
        collector = Collector()
        for record in records:
            collector.add(record)
        slo = summary.get("goodput") or {}
        objectives = slo.get("slo")
        return cls(
            policy=str(summary.get("policy", "")),
            topology=str(summary.get("topology", "")),
            workload=str(summary.get("workload", "")),
            duration_s=float(summary.get("duration_s", 0.0)),
            collector=collector,
            trees_started=int(summary.get("trees_started", 0)),
            unfinished=int(summary.get("unfinished", 0)),
            not_sent=dict(summary.get("not_sent") or {}),
            servers=list(summary.get("servers") or []),
            problems=list(summary.get("problems") or []),
            lateness_threshold_s=float(
                summary.get("lateness_threshold_s", DEFAULT_LATENESS_THRESHOLD_S)
            ),
            slo=None
            if not objectives
            else Slo(
                ttft_s=_ms_to_s(objectives.get("ttft_ms")),
                e2e_s=_ms_to_s(objectives.get("e2e_ms")),
                itl_s=_ms_to_s(objectives.get("itl_ms")),
                attainment=float(objectives.get("attainment", 0.99)),
            ),
        )

    # ------------------------------------------------------------------ text

    def render(self, width: int = 100) -> str:
        """The report as text, fitted to ``width`` columns."""
        d = self.as_dict()
        c = self.collector
        overview = _kv_table()
        rows: list[tuple[str, str]] = [
            ("workload", self.workload),
            ("sessions", f"{self.trees_started:,} trees started: {_modes(c)}"),
            (
                "credits",
                f"{c.credits:,} with an outcome"
                + (f", {self.unfinished} without (gave up waiting)" if self.unfinished else ""),
            ),
            ("outcomes", _outcomes(c)),
            ("not sent", _not_sent(self.not_sent)),
            (
                "throughput",
                f"{_num(d['throughput_per_s'], '.1f')} req/s · "
                f"{_num(d['output_tokens_per_s'], ',.0f')} output tok/s",
            ),
        ]
        if c.reasoning_known_output:
            split = (
                f" (of {c.reasoning_known_output:,} split)"
                if c.reasoning_known_output != c.output_tokens
                else ""
            )
            rows.append(
                (
                    "output",
                    f"{c.output_tokens:,} tokens: {c.reasoning_tokens:,} reasoning, "
                    f"{c.reasoning_known_output - c.reasoning_tokens:,} content{split} · "
                    f"{c.tool_calls:,} tool calls",
                )
            )
        goodput = d["goodput"]
        if goodput is not None and self.slo is not None:
            rows.append(
                (
                    "goodput",
                    f"{_num(goodput['goodput_per_s'], '.1f')} req/s meeting "
                    f"{self.slo.describe()}: {goodput['met']:,} of {goodput['judged']:,} "
                    f"({_pct(goodput['attainment'])}; required {self.slo.attainment:.0%})",
                )
            )
        for label, value in rows:
            overview.add_row(label, value)
        tail = _kv_table()
        for label, value in (
            (
                "sticky hits",
                f"{_pct(d['sticky_hit_rate'])} of {c.affinity_turns:,} turns with history ran "
                "on the worker holding it",
            ),
            (
                "prefix cache",
                f"{_pct(d['prefix_cache_hit_rate'])} of {c.reported_prompt_tokens:,} prompt "
                "tokens were cached (server-reported)",
            ),
            ("rebuilt", f"{c.rebuilt:,} turns lacked history on their worker (prompt padded)"),
            ("balance", _workers(c)),
            *(("PROBLEM", p.splitlines()[0]) for p in self.problems),
            *(
                (
                    "server",
                    f"{s['server']}: {s['completed']:,} requests, {s['cache_hit_rate']:.1%} "
                    f"of prompt tokens cached, {s['disconnected']} disconnects",
                )
                for s in self.servers
            ),
        ):
            tail.add_row(label, value)
        title = (
            f"credit-router run · routing {self.policy} · {self.topology} · {self.duration_s:.1f} s"
        )
        parts: list[Any] = [
            Text(title),
            overview,
            _stat_table("latency, ms (completed credits)", self.latency(), _LATENCY, width),
            _stat_table("lateness by stage, ms (every credit)", self.lateness(), _STAGES, width),
            tail,
        ]
        text = _to_text(parts, width)
        warning = self.lateness_warning()
        # One line, never folded: a terminal wraps it if it must, and grep finds it whole.
        return text if warning is None else f"{text}\n{warning}"


def _kv_table() -> Table:
    table = Table(box=None, show_header=False, padding=(0, 1), pad_edge=True)
    table.add_column(style="bold", no_wrap=True, min_width=12)
    table.add_column(overflow="fold")
    return table


def _stat_table(
    title: str,
    stats: dict[str, dict[str, float | None]],
    names: dict[str, str],
    width: int,
) -> Table:
    # A narrow terminal keeps the quantiles that matter (p50, p99, max) rather than wrapping.
    columns = (
        ("p50", "p90", "p99", "max", "mean", "count") if width >= 72 else ("p50", "p99", "max")
    )
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=True
    )
    table.add_column("", no_wrap=True)
    for q in columns:
        table.add_column("samples" if q == "count" else q, justify="right", no_wrap=True)
    for key, row in stats.items():
        if key == "ttft_content_s" and row["count"] in (0, stats.get("ttft_s", {}).get("count")):
            # No reasoning or tool-call-only turns (the same as TTFT), or an executor that
            # does not tell content from other tokens (the simulator): nothing to add.
            continue
        # The sample count: a metric some credits lack (no TTFT without streaming) says so
        # instead of passing for all of them.
        cells = (f"{row[q] or 0:,.0f}" if q == "count" else _ms(row[q]) for q in columns)
        table.add_row(names[key], *cells)
    return table


def _to_text(parts: Sequence[Any], width: int) -> str:
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=max(width, 40),
        no_color=True,
        highlight=False,
        emoji=False,
        force_terminal=False,
        legacy_windows=False,
    )
    for part in parts:
        console.print(part, soft_wrap=False)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip().splitlines())


def _ms_to_s(value: Any) -> float | None:
    return None if value is None else float(value) / 1e3


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.1f}"


def _sec(value: float) -> str:
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _balance(workers: Counter[str]) -> float | None:
    if not workers:
        return None
    mean = sum(workers.values()) / len(workers)
    return max(workers.values()) / mean


def _modes(c: Collector) -> str:
    names = {
        "root": "roots",
        "fork": "FORK children",
        "spawn": "SPAWN children",
        "pre": "pre-session SPAWN children",
    }
    order = sorted(
        c.modes.items(), key=lambda kv: list(names).index(kv[0]) if kv[0] in names else 9
    )
    return ", ".join(f"{n:,} {names.get(k, k)}" for k, n in order) or "none"


_SHOWN_REASONS: Final = 3


def _outcomes(c: Collector) -> str:
    """Statuses with their top reasons; what is not listed is counted, never dropped."""
    parts = []
    for status, n in c.statuses.most_common():
        errors = n - (c.stopped if status == "cancelled" else 0)
        if errors <= 0:
            continue
        reasons = [(r, k) for (s, r), k in c.reasons.most_common() if s == status]
        shown = [f"{r or '?'} {k:,}" for r, k in reasons[:_SHOWN_REASONS]]
        rest = reasons[_SHOWN_REASONS:]
        if rest:
            shown.append(
                f"+{sum(k for _, k in rest):,} other in {len(rest)} reason"
                + ("s" if len(rest) > 1 else "")
            )
        parts.append(f"{status} {errors:,}" + (f" ({', '.join(shown)})" if shown else ""))
    if c.stopped:
        parts.append(f"stopped {c.stopped:,} (cancelled by the run's end: not errors)")
    return " · ".join(parts) or "none"


def _not_sent(not_sent: dict[str, dict[str, int]]) -> str:
    parts = []
    for cause, label in (("failure", "after failed turns"), ("stop", "cut off by the stop")):
        t = not_sent.get(cause) or {}
        if not t.get("credits") and not t.get("joins"):
            continue
        part = (
            f"{t.get('credits', 0):,} credits {label} ({t.get('turns', 0):,} later turns, "
            f"{t.get('children', 0):,} child sessions never started"
        )
        if t.get("joins"):
            part += f", {t['joins']:,} joins suppressed"
        parts.append(part + ")")
    return "; ".join(parts) or "nothing: every declared turn and child was sent"


def _workers(c: Collector) -> str:
    if not c.workers:
        return "no worker ran anything"
    cells = " · ".join(
        f"{w} {n:,} ({len(c.sessions[w]):,} sessions)" for w, n in sorted(c.workers.items())
    )
    balance = _balance(c.workers)
    return f"{cells}; credits max/mean {balance:.2f}"


def _latency_cell(key: str, q: str) -> Callable[[Report], str]:
    return lambda r: _ms(r.latency()[key][q])


def _goodput_cell(r: Report) -> str:
    g = r.goodput()
    return "–" if g is None else _num(g["goodput_per_s"], ".1f")


def _not_sent_cell(cause: str) -> Callable[[Report], str]:
    return lambda r: f"{(r.not_sent.get(cause) or {}).get('credits', 0):,}"


def render_comparison(reports: Sequence[Report], width: int = 100) -> str:
    """Reports side by side, one column per report (routing policy or run directory)."""
    rows: list[tuple[str, Callable[[Report], str]]] = [
        ("credits completed", lambda r: f"{r.collector.completed:,}"),
        ("errors", lambda r: f"{r.collector.errors:,}"),
        ("stopped at the end", lambda r: f"{r.collector.stopped:,}"),
        ("not sent (failures)", _not_sent_cell("failure")),
        ("not sent (stop)", _not_sent_cell("stop")),
        ("throughput req/s", lambda r: _num(r.as_dict()["throughput_per_s"], ".1f")),
        ("sticky hits", lambda r: _pct(r.as_dict()["sticky_hit_rate"])),
        ("prefix-cache hits", lambda r: _pct(r.as_dict()["prefix_cache_hit_rate"])),
        ("rebuilt turns", lambda r: f"{r.collector.rebuilt:,}"),
    ]
    if any(r.slo is not None for r in reports):
        rows.insert(6, ("goodput req/s", _goodput_cell))
    for key, label in (
        ("ttft_s", "TTFT"),
        ("ttft_from_intended_s", "TTFT from intended"),
        ("e2e_s", "E2E"),
        ("e2e_from_intended_s", "E2E from intended"),
    ):
        for q in ("p50", "p99"):
            rows.append((f"{label} {q} ms", _latency_cell(key, q)))
    rows.append(("ITL p50 ms", _latency_cell("itl_s", "p50")))
    rows.append(("lateness p99 ms", lambda r: _ms(r.lateness()["intended_to_dispatched_s"]["p99"])))
    rows.append(("balance max/mean", lambda r: _num(r.as_dict()["balance_max_over_mean"], ".2f")))
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=True)
    table.add_column("", overflow="fold")
    for r in reports:
        table.add_column(r.policy, justify="right", overflow="fold")
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in reports))
    return _to_text([table], width)


class Progress:
    """A live progress line for a running replay.

    Args:
        source: returns the replay's progress snapshot.
        duration_s: the run's time limit, if any (the bar then shows time).
        out: where to draw (standard error by default).
        interval_s: redraw period on a terminal.
        quiet_interval_s: period of plain lines when ``out`` is not a terminal.
        label: put before the line (``--compare``: the policy).
    """

    def __init__(
        self,
        source: Callable[[], ReplayProgress],
        *,
        duration_s: float | None,
        out: IO[str] | None = None,
        interval_s: float = 0.25,
        quiet_interval_s: float = 10.0,
        label: str = "",
    ) -> None:
        self.source = source
        self.duration_s = duration_s
        self.out = out if out is not None else sys.stderr
        self._console = Console(file=self.out, highlight=False)
        # A dumb terminal cannot redraw a line: it gets the plain lines of a log file.
        self.tty = self._console.is_terminal and not self._console.is_dumb_terminal
        self.interval_s = interval_s if self.tty else quiet_interval_s
        self.label = label
        self._task: asyncio.Task[None] | None = None
        self._live: Live | None = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._last_done = 0
        self._last_at = 0.0
        self._rate = 0.0

    def _fraction(self, p: ReplayProgress) -> float:
        if self.duration_s:
            return min(p.elapsed_s / self.duration_s, 1.0)
        if p.expected_credits:
            return min(p.done / p.expected_credits, 1.0)
        return 0.0

    def line(self, p: ReplayProgress, rate: float, width: int = 100) -> str:
        """One progress line of at most ``width`` columns (also used in tests).

        The bar shrinks first, then the least useful fields go, so the line never wraps.
        """
        total = f"/{p.expected_credits:,}" if p.expected_credits else ""
        state = f"settling, {p.in_flight} in flight" if p.stopping else f"{p.in_flight} in flight"
        # (text, rank): the lowest rank goes first when the line does not fit.
        fields = [
            (f"{p.elapsed_s:5.1f}s", 2),
            (f"credits {p.done:,}{total}", 9),
            (f"{rate:6.1f}/s", 1),
            (f"errors {p.errors:,}", 3),
            (state, 0),
        ]
        while True:
            text = "  ".join(f for f, _ in fields)
            room = width - len(self.label) - len(text) - 3
            if room >= 10 or len(fields) == 1:
                break
            fields.remove(min(fields, key=lambda f: f[1]))
        bar_width = max(0, min(24, room))
        filled = round(self._fraction(p) * bar_width)
        bar = f"[{'#' * filled}{'-' * (bar_width - filled)}] " if bar_width >= 4 else ""
        return (f"{self.label}{bar}{text}")[:width]

    def _sample(self, now: float) -> tuple[ReplayProgress, float]:
        p = self.source()
        dt = max(now - self._last_at, 1e-9)
        if now > self._last_at:
            self._rate = (p.done - self._last_done) / dt
            self._last_done, self._last_at = p.done, now
        return p, self._rate

    def _renderable(self) -> Text:
        p, rate = self._sample(time.monotonic())
        width = self._live.console.width if self._live is not None else 100
        return Text(self.line(p, rate, width - 1), no_wrap=True, overflow="crop")

    async def _draw(self) -> None:
        self._last_at = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            self.draw(time.monotonic())

    def draw(self, now: float) -> None:
        """Draw once (on a terminal: refresh the live line; else print a plain line)."""
        if self._live is not None:
            self._live.refresh()
            return
        p, rate = self._sample(now)
        self.out.write(self.line(p, rate) + "\n")
        self.out.flush()

    def start(self) -> None:
        """Start drawing on the running loop."""
        if self.tty:
            console = self._console
            self._live = Live(
                console=console,
                get_renderable=self._renderable,
                auto_refresh=False,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
            # Log handlers hold the stream they were given: point those writing where the line
            # is drawn at a proxy that prints above the live line instead of into it.
            proxy = FileProxy(console, self.out)
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is self.out:
                    self._handlers.append((handler, handler.stream))
                    handler.setStream(proxy)
        self._task = asyncio.get_running_loop().create_task(self._draw())

    async def stop(self) -> None:
        """Stop, and leave the terminal on a clean line."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for handler, stream in self._handlers:
            proxy = handler.setStream(stream)
            if isinstance(proxy, FileProxy):
                proxy.flush()
        self._handlers.clear()
        if self._live is not None:
            self._live.stop()
            self._live = None
