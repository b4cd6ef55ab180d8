"""What ``credit-router run`` shows: a live progress line, then the report (or two, compared).

``Collector`` takes every ``CreditRecord`` as it arrives (and writes it as a JSON line when
asked); ``Report`` turns the collection into the figures a benchmark is read by: throughput,
TTFT / ITL / end-to-end / submit→dispatch percentiles over completed credits, outcomes by status
and reason, the sticky-hit rate (turns with history that ran on the worker holding it), the
prefix-cache hit rate (prompt tokens the servers reported cached), turns whose history had to be
rebuilt, and the balance of credits over workers. ``render_comparison`` puts reports side by side.

``Progress`` redraws one line on a terminal (a few times a second) and, when the output is not
a terminal (CI logs), prints one plain line every ``quiet_interval_s`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

import msgspec

from loadgen.replay import CreditRecord, ReplayProgress

__all__ = ["Collector", "Progress", "Report", "percentile", "render_comparison"]

_COMPLETED: Final = "completed"
_encoder: Final = msgspec.json.Encoder()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) of ``values``, linearly interpolated; ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Collector:
    """Aggregates credit records as they arrive.

    Args:
        records_out: if given, every record is written to it as one JSON line.
    """

    def __init__(self, records_out: IO[bytes] | None = None) -> None:
        self.records_out = records_out
        self.credits = 0
        self.statuses: Counter[str] = Counter()
        self.reasons: Counter[tuple[str, str]] = Counter()
        self.ttft_s: list[float] = []
        self.itl_s: list[float] = []
        self.e2e_s: list[float] = []
        self.wait_s: list[float] = []
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

    def add(self, record: CreditRecord) -> None:
        """Take one record (the replayer's ``on_record``)."""
        self.credits += 1
        status = record.status
        self.statuses[status] += 1
        if status != _COMPLETED:
            self.reasons[(status, record.reason)] += 1
        if record.turn_index == 0:
            mode = record.branch_mode or ("root" if record.session == record.root else "pre")
            self.modes[mode] += 1
        if record.worker:
            self.workers[record.worker] += 1
            self.sessions.setdefault(record.worker, set()).add(record.session)
        if record.submit_to_dispatch_s is not None:
            self.wait_s.append(record.submit_to_dispatch_s)
        if record.affinity is not None:
            self.affinity_turns += 1
            self.affinity_hits += record.affinity
        if status == _COMPLETED:
            self._completed(record)
        if self.records_out is not None:
            self.records_out.write(_encoder.encode(record) + b"\n")

    def _completed(self, record: CreditRecord) -> None:
        for value, values in (
            (record.ttft_s, self.ttft_s),
            (record.itl_s, self.itl_s),
            (
                record.e2e_s if record.e2e_s is not None else record.dispatch_to_outcome_s,
                self.e2e_s,
            ),
        ):
            if value is not None:
                values.append(value)
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
    servers: list[dict[str, Any]] = field(default_factory=list)
    """The mock servers' own counters, when the run started them."""
    problems: list[str] = field(default_factory=list)
    """What went wrong with the cluster during the run (a process that exited)."""

    def latency(self) -> dict[str, dict[str, float | None]]:
        """p50/p90/p99/mean in seconds, per metric."""
        c = self.collector
        out: dict[str, dict[str, float | None]] = {}
        for name, values in (
            ("ttft_s", c.ttft_s),
            ("ttft_content_s", c.ttft_content_s),
            ("itl_s", c.itl_s),
            ("e2e_s", c.e2e_s),
            ("submit_to_dispatch_s", c.wait_s),
        ):
            out[name] = {
                "p50": percentile(values, 50),
                "p90": percentile(values, 90),
                "p99": percentile(values, 99),
                "mean": sum(values) / len(values) if values else None,
                "count": len(values),
            }
        return out

    def as_dict(self) -> dict[str, Any]:
        """Everything, as plain data (``--json``)."""
        c = self.collector
        completed = c.statuses.get(_COMPLETED, 0)
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
            "reasons": {f"{s}: {r}": n for (s, r), n in c.reasons.most_common()},
            "throughput_per_s": completed / self.duration_s if self.duration_s else None,
            "output_tokens_per_s": c.output_tokens / self.duration_s if self.duration_s else None,
            "latency": self.latency(),
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

    def render(self) -> str:
        """The report as text."""
        d = self.as_dict()
        c = self.collector
        lines = [
            f"credit-router run · routing {self.policy} · {self.topology} · "
            f"{self.duration_s:.1f} s",
            f"  workload      {self.workload}",
            f"  sessions      {self.trees_started:,} trees started: {_modes(c)}",
            f"  credits       {c.credits:,} with an outcome"
            + (f", {self.unfinished} without (gave up waiting)" if self.unfinished else ""),
            f"  outcomes      {_outcomes(c)}",
            f"  throughput    {_num(d['throughput_per_s'], '.1f')} req/s · "
            f"{_num(d['output_tokens_per_s'], ',.0f')} output tok/s",
            f"  {'latency (ms)':<18}"
            + "".join(f"{q:>9}" for q in ("p50", "p90", "p99", "mean"))
            + f"{'samples':>9}   (completed credits)",
        ]
        names = {
            "ttft_s": "TTFT",
            "ttft_content_s": "TTFT content",
            "itl_s": "ITL",
            "e2e_s": "E2E",
            "submit_to_dispatch_s": "submit→dispatch",
        }
        for key, stats in self.latency().items():
            if key == "ttft_content_s" and stats["count"] == len(c.ttft_s):
                continue  # no reasoning or tool-call-only turns: the same as TTFT
            cells = "".join(f"{_ms(stats[q]):>9}" for q in ("p50", "p90", "p99", "mean"))
            # The sample count: a metric some completed credits lack (no TTFT without streaming)
            # says so instead of passing for all of them.
            lines.append(f"    {names[key]:<16}{cells}{stats['count']:>9,.0f}")
        if c.reasoning_known_output:
            lines.append(
                f"  output        {c.output_tokens:,} tokens: {c.reasoning_tokens:,} reasoning, "
                f"{c.reasoning_known_output - c.reasoning_tokens:,} content"
                + (
                    f" (of {c.reasoning_known_output:,} split)"
                    if c.reasoning_known_output != c.output_tokens
                    else ""
                )
                + f" · {c.tool_calls:,} tool calls"
            )
        lines += [
            f"  sticky hits   {_pct(d['sticky_hit_rate'])} of {c.affinity_turns:,} turns with "
            "history ran on the worker holding it",
            f"  prefix cache  {_pct(d['prefix_cache_hit_rate'])} of {c.reported_prompt_tokens:,} "
            "prompt tokens were cached (server-reported)",
            f"  rebuilt       {c.rebuilt:,} turns lacked history on their worker "
            "(prompt padded to size)",
            f"  balance       {_workers(c)}",
        ]
        for problem in self.problems:
            lines.append(f"  PROBLEM       {problem.splitlines()[0]}")
        for server in self.servers:
            lines.append(
                f"  server        {server['server']}: {server['completed']:,} requests, "
                f"{server['cache_hit_rate']:.1%} of prompt tokens cached, "
                f"{server['disconnected']} disconnects"
            )
        return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.1f}"


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


def _outcomes(c: Collector) -> str:
    parts = []
    for status, n in c.statuses.most_common():
        reasons = [f"{r or '?'} {k}" for (s, r), k in c.reasons.most_common(3) if s == status]
        parts.append(f"{status} {n:,}" + (f" ({', '.join(reasons)})" if reasons else ""))
    return " · ".join(parts) or "none"


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


def render_comparison(reports: Sequence[Report]) -> str:
    """Reports side by side, one column per routing policy."""
    rows: list[tuple[str, Callable[[Report], str]]] = [
        ("credits completed", lambda r: f"{r.collector.statuses.get(_COMPLETED, 0):,}"),
        ("errors", lambda r: f"{r.collector.credits - r.collector.statuses.get(_COMPLETED, 0):,}"),
        ("throughput req/s", lambda r: _num(r.as_dict()["throughput_per_s"], ".1f")),
        ("sticky hits", lambda r: _pct(r.as_dict()["sticky_hit_rate"])),
        ("prefix-cache hits", lambda r: _pct(r.as_dict()["prefix_cache_hit_rate"])),
        ("rebuilt turns", lambda r: f"{r.collector.rebuilt:,}"),
    ]
    for key, label in (("ttft_s", "TTFT"), ("e2e_s", "E2E")):
        for q in ("p50", "p90", "p99"):
            rows.append((f"{label} {q} ms", _latency_cell(key, q)))
    rows.append(("ITL p50 ms", _latency_cell("itl_s", "p50")))
    rows.append(("balance max/mean", lambda r: _num(r.as_dict()["balance_max_over_mean"], ".2f")))
    width = max(len(label) for label, _ in rows) + 2
    header = "".join(f"{r.policy:>16}" for r in reports)
    lines = [f"{'':<{width}}{header}"]
    for label, cell in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{cell(r):>16}" for r in reports))
    return "\n".join(lines)


class Progress:
    """A live progress line for a running replay.

    Args:
        source: returns the replay's progress snapshot.
        duration_s: the run's time limit, if any (the bar then shows time).
        out: where to draw (standard error by default).
        interval_s: redraw period on a terminal.
        quiet_interval_s: period of plain lines when ``out`` is not a terminal.
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
        self.tty = self.out.isatty()
        self.interval_s = interval_s if self.tty else quiet_interval_s
        self.label = label
        self._task: asyncio.Task[None] | None = None
        self._last_done = 0
        self._last_at = 0.0

    def line(self, p: ReplayProgress, rate: float) -> str:
        """One progress line (also used in tests)."""
        if self.duration_s:
            fraction = min(p.elapsed_s / self.duration_s, 1.0)
        elif p.expected_credits:
            fraction = min(p.done / p.expected_credits, 1.0)
        else:
            fraction = 0.0
        filled = round(fraction * 24)
        bar = "#" * filled + "-" * (24 - filled)
        total = f"/{p.expected_credits:,}" if p.expected_credits else ""
        state = f"settling, {p.in_flight} in flight" if p.stopping else f"{p.in_flight} in flight"
        return (
            f"{self.label}[{bar}] {p.elapsed_s:5.1f}s  credits {p.done:,}{total} done  "
            f"{rate:6.1f}/s  errors {p.errors:,}  {state}"
        )

    async def _draw(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_at = loop.time()
        while True:
            await asyncio.sleep(self.interval_s)
            self.draw(loop.time())

    def draw(self, now: float) -> None:
        """Draw once (on a terminal: over the previous line)."""
        p = self.source()
        dt = max(now - self._last_at, 1e-9)
        rate = (p.done - self._last_done) / dt
        self._last_done, self._last_at = p.done, now
        text = self.line(p, rate)
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def start(self) -> None:
        """Start redrawing on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._draw())

    async def stop(self) -> None:
        """Stop, and leave the terminal on a clean line."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.tty:
            self.out.write("\r\x1b[2K")
            self.out.flush()
