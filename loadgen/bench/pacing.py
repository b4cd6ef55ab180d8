"""The replayer's pacing: does ``--rate`` hold its schedule? (``make bench``)

An *instant producer* (every credit completes as it is submitted, no router, no sockets) takes
single-turn trees from the real ``Replayer`` in ``rate`` mode with constant arrivals, at 50,
200, 1,000 and 5,000 trees/s, for ``duration_s`` (≥ 5 s) each, on a uvloop event loop as
``credit-router run`` uses. For each rate it reports:

* ``ratio`` — trees started within the window / (rate × window): the target is ≥ 0.99;
* ``span_ratio`` — the achieved rate between the first and the last start / the rate;
* ``late_p50_ms`` / ``late_p99_ms`` / ``late_max_ms`` — submission minus intended time.

With ``baseline`` a second row per rate paces the same trees the way the replayer used to:
sleeping each gap relative to the previous start (``asyncio.sleep(1 / rate)``), whose loop
overhead and millisecond timer rounding accumulate. Read the ratios, not the absolute numbers
(the machine is shared).

``python -m loadgen.bench.pacing [--json] [--duration-s 5] [--no-baseline]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

import uvloop

from loadgen.replay import CreditRecord, Replayer, ReplayOptions
from loadgen.report import percentile
from loadgen.workload import SessionSpec, TurnSpec, Workload, compile_workload
from protocol.messages import Credit, Outcome, Status

__all__ = ["RATES", "InstantProducer", "main", "run"]

RATES = (50.0, 200.0, 1_000.0, 5_000.0)


class InstantProducer:
    """Completes every credit the moment it is submitted."""

    def __init__(self) -> None:
        self.submitted = 0

    async def submit(self, credit: Credit) -> asyncio.Future[Outcome]:
        """An already-resolved outcome."""
        self.submitted += 1
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        future.set_result(Outcome(credit_id=credit.id, status=Status.COMPLETED, worker="w"))
        return future

    def cancel(self, credit_ids: Iterable[int]) -> None:
        """Nothing is ever in flight."""

    def end_session(self, session: str, reason: str = "") -> None:
        """Nothing to free."""


def _workload() -> Workload:
    spec = SessionSpec(id="t", turns=[TurnSpec(input_tokens=1, output_tokens=1)])
    return compile_workload([(0, spec)], source="pacing")


async def _anchored(rate: float, duration_s: float) -> dict[str, Any]:
    records: list[CreditRecord] = []
    options = ReplayOptions(
        mode="rate", rate=rate, arrival="constant", duration_s=duration_s, grace_s=1.0
    )
    replayer = Replayer(_workload(), InstantProducer(), options, on_record=records.append)
    await replayer.run()
    starts = sorted(r.submitted_at_s for r in records)
    late = [r.submitted_at_s - (r.intended_at_s or 0.0) for r in records]
    within = sum(1 for t in starts if t < duration_s)
    return _row("anchored", rate, duration_s, within, starts, late)


async def _relative(rate: float, duration_s: float) -> dict[str, Any]:
    """The old pacing: a relative sleep of one gap after each start."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    starts: list[float] = []
    n = 0
    end = loop.time() + duration_s
    while loop.time() < end:
        if n:
            await asyncio.sleep(1 / rate)
        starts.append(time.monotonic() - t0)
        n += 1
    late = [t - i / rate for i, t in enumerate(starts)]
    within = sum(1 for t in starts if t < duration_s)
    return _row("relative_gap", rate, duration_s, within, starts, late)


def _row(
    pacing: str,
    rate: float,
    duration_s: float,
    within: int,
    starts: list[float],
    late: list[float],
) -> dict[str, Any]:
    span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    ms = [x * 1e3 for x in late]
    return {
        "bench": "pacing",
        "pacing": pacing,
        "rate_per_s": rate,
        "duration_s": duration_s,
        "trees": within,
        "expected": round(rate * duration_s),
        "ratio": round(within / (rate * duration_s), 4),
        "span_ratio": round((len(starts) - 1) / span / rate, 4) if span else None,
        "late_p50_ms": _r(percentile(ms, 50)),
        "late_p99_ms": _r(percentile(ms, 99)),
        "late_max_ms": _r(max(ms) if ms else None),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run(
    rates: Iterable[float] = RATES, duration_s: float = 5.0, baseline: bool = True
) -> list[dict[str, Any]]:
    """One row per rate (and pacing); see the module docstring."""
    rows = []
    for rate in rates:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            rows.append(runner.run(_anchored(rate, duration_s)))
            if baseline:
                rows.append(runner.run(_relative(rate, duration_s)))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the rows (``--json``: one JSON object a line)."""
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench.pacing")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--rate", type=float, action="append", help="instead of the four rates")
    args = parser.parse_args(argv)
    for row in run(args.rate or RATES, args.duration_s, not args.no_baseline):
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
