"""The run directory's plots, drawn with matplotlib (Agg backend: no display needed).

``draw(records, directory, …)`` writes one PNG per question a reader asks of a run:

* ``latency_distributions.png`` — TTFT and E2E as cumulative distributions, worker-measured
  and from the intended time side by side (their gap is the coordinated omission);
* ``latency_over_time.png`` — TTFT and E2E of each credit against its intended time;
* ``lateness_over_time.png`` — each credit's lateness by stage (intended → submitted,
  submitted → dispatched) against its intended time, with the warning threshold;
* ``workers.png`` — per worker: credits in flight and sessions active over time;
* ``prefix_cache.png`` — the prefix-cache hit rate (cached / prompt tokens) and the sticky-hit
  rate per time bin.

A plot whose data the run does not have (no completed credits, no cache figures) says so on
its canvas instead of being left out, so the directory's layout never depends on the run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, whatever the environment's display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loadgen.replay import CreditRecord

__all__ = ["PLOTS", "draw"]

PLOTS = (
    "latency_distributions.png",
    "latency_over_time.png",
    "lateness_over_time.png",
    "workers.png",
    "prefix_cache.png",
)

_DPI = 110


def draw(
    records: Sequence[CreditRecord],
    directory: Path,
    *,
    title: str = "",
    lateness_threshold_s: float | None = None,
) -> list[Path]:
    """Write the plots into ``directory`` (created if needed); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    completed = [r for r in records if r.status == "completed"]
    drawers: tuple[Callable[[], Figure], ...] = (
        lambda: _distributions(completed),
        lambda: _latency_over_time(completed),
        lambda: _lateness_over_time(records, lateness_threshold_s),
        lambda: _workers(records),
        lambda: _prefix_cache(completed),
    )
    paths = []
    for name, drawer in zip(PLOTS, drawers, strict=True):
        fig = drawer()
        if title:
            fig.suptitle(title, fontsize=10)
        path = directory / name
        fig.savefig(path, dpi=_DPI, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _empty(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _ms(values: Sequence[float | None]) -> list[float]:
    return [v * 1e3 for v in values if v is not None]


def _ecdf(ax: Axes, values: list[float], label: str, style: str = "-") -> None:
    if not values:
        return
    xs = sorted(values)
    n = len(xs)
    ax.step(xs, [(i + 1) / n for i in range(n)], style, where="post", label=f"{label} (n={n})")


def _distributions(completed: Sequence[CreditRecord]) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name, measured, intended in (
        (
            axes[0],
            "TTFT",
            [r.ttft_s for r in completed],
            [r.ttft_from_intended_s for r in completed],
        ),
        (
            axes[1],
            "E2E",
            [r.e2e_s if r.e2e_s is not None else r.dispatch_to_outcome_s for r in completed],
            [r.e2e_from_intended_s for r in completed],
        ),
    ):
        a, b = _ms(measured), _ms(intended)
        if not a and not b:
            _empty(ax, f"{name} measurements")
            continue
        _ecdf(ax, a, "worker-measured")
        _ecdf(ax, b, "from intended time", "--")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of completed credits")
        ax.set_title(f"{name} distribution")
        if max(a + b) > 20 * max(min(a + b), 1e-3):
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    return fig


def _latency_over_time(completed: Sequence[CreditRecord]) -> Figure:
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    for ax, name, pairs in (
        (axes[0], "TTFT", [(r, r.ttft_s, r.ttft_from_intended_s) for r in completed]),
        (
            axes[1],
            "E2E",
            [
                (r, r.e2e_s if r.e2e_s is not None else r.dispatch_to_outcome_s,
                 r.e2e_from_intended_s)
                for r in completed
            ],
        ),
    ):  # fmt: skip
        points = [(_when(r), m, i) for r, m, i in pairs]
        measured = [(t, m * 1e3) for t, m, _ in points if m is not None]
        intended = [(t, i * 1e3) for t, _, i in points if i is not None]
        if not measured and not intended:
            _empty(ax, f"{name} measurements")
            continue
        if measured:
            _scatter(ax, measured, "worker-measured")
        if intended:
            _scatter(ax, intended, "from intended time")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, markerscale=3)
    axes[0].set_title("latency of each completed credit over the run")
    axes[1].set_xlabel("intended time (s from the run's start)")
    return fig


def _scatter(
    ax: Axes,
    points: list[tuple[float, float]],
    label: str,
    hollow: bool = False,
    color: str | None = None,
) -> None:
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if hollow:  # drawn under the stages it sums, visible where they coincide
        ax.scatter(xs, ys, s=18, facecolors="none", edgecolors="tab:blue", linewidths=0.6,
                   label=label)  # fmt: skip
    else:
        ax.scatter(xs, ys, s=4, alpha=0.5, label=label, color=color)


def _when(r: CreditRecord) -> float:
    return r.intended_at_s if r.intended_at_s is not None else r.submitted_at_s


def _lateness_over_time(records: Sequence[CreditRecord], threshold_s: float | None) -> Figure:
    fig, ax = plt.subplots(figsize=(11, 4.2))
    producer = [
        (_when(r), (r.submitted_at_s - r.intended_at_s) * 1e3)
        for r in records
        if r.intended_at_s is not None
    ]
    queue = [
        (_when(r), r.submit_to_dispatch_s * 1e3)
        for r in records
        if r.submit_to_dispatch_s is not None
    ]
    total = [(_when(r), r.lateness_s * 1e3) for r in records if r.lateness_s is not None]
    if not producer and not queue:
        _empty(ax, "schedule data")
        return fig
    if total:
        _scatter(ax, total, "intended → dispatched (lateness)", hollow=True)
    for series, label, color in (
        (queue, "submitted → dispatched (router queue)", "tab:orange"),
        (producer, "intended → submitted (producer)", "tab:green"),
    ):
        if series:
            _scatter(ax, series, label, color=color)
    if threshold_s is not None:
        ax.axhline(threshold_s * 1e3, color="red", linewidth=1, linestyle="--")
        ax.annotate(
            f"warning threshold (p99) {threshold_s * 1e3:g} ms",
            (0.99, threshold_s * 1e3),
            xycoords=("axes fraction", "data"),
            color="red",
            fontsize=8,
            ha="right",
            va="bottom",
        )
    values = [v for _, v in total + queue + producer]
    if values and max(values) > 0 and max(values) > 50 * max(min(values), 0.01):
        ax.set_yscale("symlog", linthresh=1.0)
    if values:  # from zero, with head room above the latest credit
        ax.set_ylim(
            min(0.0, *values), max(max(values) * 1.6, threshold_s * 2e3 if threshold_s else 1)
        )
    ax.set_xlabel("intended time (s from the run's start)")
    ax.set_ylabel("ms")
    ax.set_title("lateness by stage: how far behind its schedule each credit left")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=3)
    return fig


def _bins(records: Sequence[CreditRecord]) -> tuple[float, int]:
    end = max((r.done_at_s or r.submitted_at_s for r in records), default=0.0)
    width = max(end / 60, 0.25)
    return width, max(1, math.ceil(end / width))


def _workers(records: Sequence[CreditRecord]) -> Figure:
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    ran = [r for r in records if r.worker]
    if not ran:
        for ax in axes:
            _empty(ax, "credit that reached a worker")
        return fig
    # In flight: from dispatch (submission + router wait) to the outcome, per worker.
    events: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for r in ran:
        start = r.submitted_at_s + (r.submit_to_dispatch_s or 0.0)
        events[r.worker] += [(start, 1), (r.done_at_s or start, -1)]
    for worker in sorted(events):
        xs, ys, level = [0.0], [0], 0
        for t, step in sorted(events[worker]):
            level += step
            xs.append(t)
            ys.append(level)
        axes[0].step(xs, ys, where="post", label=worker, linewidth=1)
    axes[0].set_ylabel("credits in flight")
    axes[0].set_title("per-worker load")
    # Sessions active: a session is active in a bin from its first turn's dispatch to its
    # last outcome on that worker.
    width, count = _bins(ran)
    spans: dict[tuple[str, str], list[float]] = {}
    for r in ran:
        start = r.submitted_at_s + (r.submit_to_dispatch_s or 0.0)
        span = spans.setdefault((r.worker, r.session), [start, r.done_at_s or start])
        span[0] = min(span[0], start)
        span[1] = max(span[1], r.done_at_s or start)
    active: dict[str, list[int]] = defaultdict(lambda: [0] * count)
    for (worker, _), (a, b) in spans.items():
        for i in range(int(a // width), min(count - 1, int(b // width)) + 1):
            active[worker][i] += 1
    centres = [(i + 0.5) * width for i in range(count)]
    for worker in sorted(active):
        axes[1].plot(centres, active[worker], label=worker, linewidth=1)
    axes[1].set_ylabel(f"sessions active ({width:.2g} s bins)")
    axes[1].set_xlabel("time (s from the run's start)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    return fig


def _prefix_cache(completed: Sequence[CreditRecord]) -> Figure:
    fig, ax = plt.subplots(figsize=(11, 4.2))
    if not completed:
        _empty(ax, "completed credit")
        return fig
    width, count = _bins(completed)
    cached = [0] * count
    prompt = [0] * count
    hits = [0] * count
    turns = [0] * count
    for r in completed:
        i = min(count - 1, int((r.done_at_s or r.submitted_at_s) // width))
        if r.cached_tokens is not None:
            cached[i] += r.cached_tokens
            prompt[i] += r.input_tokens or 0
        if r.affinity is not None:
            hits[i] += r.affinity
            turns[i] += 1
    centres = [(i + 0.5) * width for i in range(count)]
    series: list[tuple[list[Any], str]] = [
        (
            [c / p if p else None for c, p in zip(cached, prompt, strict=True)],
            "prefix-cache hit rate",
        ),
        ([h / t if t else None for h, t in zip(hits, turns, strict=True)], "sticky-hit rate"),
    ]
    drawn = False
    for values, label in series:
        pts = [(x, y) for x, y in zip(centres, values, strict=True) if y is not None]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=label)
            drawn = True
    if not drawn:
        _empty(ax, "cache figures (the servers reported no cached tokens)")
        return fig
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"fraction ({width:.2g} s bins, by outcome time)")
    ax.set_xlabel("time (s from the run's start)")
    ax.set_title("prefix-cache hit rate (cached / prompt tokens, server-reported) over time")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig
