"""``make bench-peers``: our routing core against AIPerf's sticky router, same closed loop, one run.

AIPerf runs in its own throwaway virtual environment (``--aiperf-python``, built by the Makefile
from the newest ``aiperf`` on PyPI) through ``scripts/aiperf_harness.py``; ours runs here through
``core._closed_loop``. Both: 64 workers, 1024 credits in flight, single-turn and 5-turn sticky
sessions, credits built before the timed loop, GC off inside it; in both orders of
``core._closed_loop`` (a new credit after each return, or after all of a round's returns). The
systems alternate run by run so a noisy neighbour on this shared machine hits both alike; the
table reports the best of ``repeat`` runs and each of ours as a ratio to AIPerf's best.

Usage: ``python -m loadgen.bench.peers --aiperf-python PATH [--json] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadgen.bench import core

__all__ = ["main", "run"]

# Not in the package: it runs under the throwaway environment, which has AIPerf and not us.
HARNESS = Path(__file__).resolve().parents[2] / "scripts" / "aiperf_harness.py"
SCENARIOS = ("single_turn", "sticky_5_turn")


ORDERS = ("interleaved", "returns-first")
"""The closed loop's two orders (``core._closed_loop``): a new credit right after each return,
or after all of a round's returns (the issue's loop, where AIPerf's least-loaded pick scans)."""


def _aiperf(
    python: str, scenario: str, workers: int, credits: int, concurrency: int, order: str
) -> Any:
    out = subprocess.run(
        [python, str(HARNESS), "--scenario", scenario, "--workers", str(workers),
         "--credits", str(credits), "--concurrency", str(concurrency), "--order", order],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ours(
    scenario: str, workers: int, credits: int, concurrency: int, batch: int, order: str
) -> float:
    router = core._core(workers, capacity=10 * concurrency)
    elapsed = core._closed_loop(
        router, core._credits(scenario, credits, concurrency), concurrency, batch, order
    )
    return credits / elapsed


def run(
    aiperf_python: str,
    *,
    workers: int = 64,
    credits: int = 100_000,
    concurrency: int = 1024,
    repeat: int = 3,
) -> list[dict[str, Any]]:
    """One row per (order, system, scenario) with best/median decisions/s and the ratio to
    AIPerf's best in the same order."""
    rows: list[dict[str, Any]] = []
    for order, scenario in ((o, s) for o in ORDERS for s in SCENARIOS):
        peer: list[float] = []
        one: list[float] = []
        batched: list[float] = []
        label = "aiperf"
        for _ in range(repeat):
            result = _aiperf(aiperf_python, scenario, workers, credits, concurrency, order)
            label = result["system"]
            peer.append(result["decisions_per_s"])
            one.append(_ours(scenario, workers, credits, concurrency, 1, order))
            batched.append(_ours(scenario, workers, credits, concurrency, 64, order))
        best_peer = max(peer)
        for system, rates in (
            (label, peer),
            ("ours, one credit per call", one),
            ("ours, batched 64", batched),
        ):
            rates.sort()
            rows.append(
                {
                    "bench": "peers",
                    "system": system,
                    "scenario": scenario,
                    "order": order,
                    "workers": workers,
                    "concurrency": concurrency,
                    "credits": credits,
                    "decisions_per_s_best": round(rates[-1]),
                    "decisions_per_s_median": round(rates[len(rates) // 2]),
                    "vs_aiperf_best": round(rates[-1] / best_peer, 2),
                }
            )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    cell = {(r["order"], r["system"], r["scenario"]): r for r in rows}
    lines = [
        f"closed loop, {rows[0]['workers']} workers, {rows[0]['concurrency']} in flight, "
        "decisions/s best of runs (ratio to AIPerf in the same order); one run, shared "
        "machine: read the ratios",
        f"| {'':<56} | {'single-turn':>20} | {'5-turn sticky':>20} |",
        f"|{'-' * 58}|{'-' * 21}:|{'-' * 21}:|",
    ]
    for order in ORDERS:
        for system in systems:
            vals = []
            for scenario in SCENARIOS:
                r = cell[(order, system, scenario)]
                rate = r["decisions_per_s_best"] / 1000
                vals.append(f"{rate:.0f}k/s ({r['vs_aiperf_best']:.2f}x)")
            label = f"{system} [{order}]"
            lines.append(f"| {label:<56} | {vals[0]:>20} | {vals[1]:>20} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench.peers", description=__doc__)
    parser.add_argument("--aiperf-python", required=True, help="python of a venv with aiperf")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--repeat", type=int, default=3, help="runs per system and scenario")
    parser.add_argument("--credits", type=int, default=100_000, help="credits per run")
    parser.add_argument("--workers", type=int, default=64, help="workers")
    args = parser.parse_args(argv)
    rows = run(args.aiperf_python, workers=args.workers, credits=args.credits, repeat=args.repeat)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    print(_table(rows), file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
