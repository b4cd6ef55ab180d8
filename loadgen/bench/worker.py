"""The worker agent's CPU per credit on the zero-latency path, in one process, no sockets.

A real ``WorkerAgent`` with the zero-latency ``SimExecutor`` (as ``bench e2e`` runs its workers:
``--executor sim --sim-zero-latency --no-first-token-events``) gets its frames the way
``DealerTransport`` hands them over: ``_on_frames(frames)``, one wakeup per event-loop
iteration. A round is one ``DispatchBatch`` frame (encoded by ``protocol.codec.encode``, as the
router does) plus the ``Ack`` of the previous round's completions; the agent's completion frames
go to a transport that keeps nothing. Frames are built before the timed loop (the router makes
them, not the worker); what is timed is the agent's whole wakeup: decode, bookkeeping, the
executor, the completion frame's encode, and the loop iteration that carries it.

Scenarios: single-turn sessions in dispatch batches of 64 and of 1 (a lightly loaded worker),
and 5-turn sticky sessions in batches of 64 (history kept between turns).

``--compare REV`` times the agent of git revision ``REV`` (its ``worker_agent`` package,
extracted to a temporary directory) against this tree's, alternating runs in subprocesses, and
prints the ratio per scenario: the before/after figure within one run.

Usage: ``python -m loadgen.bench.worker [--credits N] [--repeat K] [--compare REV] [--json]``
and ``--profile SCENARIO`` for a cProfile table of one scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

from protocol import PROTOCOL_VERSION
from protocol.codec import encode
from protocol.messages import Ack, Credit, DispatchBatch, Welcome
from worker_agent.agent import WorkerAgent
from worker_agent.executor import SimExecutor
from worker_agent.transport import ErrorHandler, FrameHandler, Transport

__all__ = ["SCENARIOS", "main", "measure"]

PRODUCER = "bench-producer"

SCENARIOS: dict[str, tuple[int, int]] = {
    "single_turn_batch64": (64, 1),
    "single_turn_batch1": (1, 1),
    "sticky5_batch64": (64, 5),
}
"""Scenario -> (credits per dispatch frame, turns per session)."""


class _NullTransport:
    """Counts what the agent sends and keeps nothing."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0

    def send(self, frame: bytes) -> None:
        self.frames += 1
        self.bytes += len(frame)

    def discard_backlog(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _rounds(batch: int, turns: int, rounds: int) -> list[bytes]:
    """``rounds`` dispatch frames: ``batch`` credits each, every session running ``turns``
    turns, one per round (a session's next turn is dispatched after its previous completed)."""
    frames = []
    for r in range(rounds):
        turn = r % turns
        group = r // turns
        credits = [
            Credit(
                id=r * batch + i,
                x_correlation_id=f"s{group * batch + i}",
                turn_index=turn,
                num_turns=turns,
            )
            for i in range(batch)
        ]
        frames.append(encode(DispatchBatch(producer=PRODUCER, credits=credits)))
    return frames


async def _run(batch: int, turns: int, credits: int, profile: Callable[[], Any] | None) -> float:
    """CPU seconds per credit of the agent's wakeups."""
    loop = asyncio.get_running_loop()
    transport = _NullTransport()

    def factory(_e: str, _r: str, _f: FrameHandler, _x: ErrorHandler) -> Transport:
        return transport

    agent = WorkerAgent(
        router="inproc://bench",
        name="bench-worker",
        executor=SimExecutor(zero_latency=True),
        capacity=max(2048, batch),
        first_token_events=False,
        incarnation="bench",
        transport_factory=factory,
    )
    await agent.startup()
    welcome = Welcome(
        router_incarnation="router",
        protocol_version=PROTOCOL_VERSION,
        heartbeat_interval_s=1.0,
        inflight_report_interval_s=5.0,
    )
    agent._on_frames([encode(welcome)])  # the transport's own entry point
    rounds = max(turns, credits // batch // turns * turns)
    dispatches = _rounds(batch, turns, rounds)
    acks = [encode(Ack(seq=(r + 1) * batch)) for r in range(rounds)]
    on_frames = agent._on_frames
    # Warm up (first-use costs: memo tables, interned strings), then time.
    warm = min(rounds, 8)
    for r in range(warm):
        on_frames([dispatches[r]])
        await asyncio.sleep(0)
    gc.collect()
    stop = profile() if profile is not None else None
    t0 = time.process_time()
    on_frames([dispatches[warm]])
    await asyncio.sleep(0)
    for r in range(warm + 1, rounds):
        on_frames([acks[r - 2], dispatches[r]])
        await asyncio.sleep(0)
    elapsed = time.process_time() - t0
    if stop is not None:
        stop()
    done = (rounds - warm) * batch
    received = agent.stats.credits_received
    completed = agent.stats.completions["completed"]
    if completed != received or received != rounds * batch:
        raise RuntimeError(f"the agent completed {completed} of {received} credits")
    agent.force_exit()
    agent._on_tick(loop.time())  # sets the stop reason without a main loop
    await agent.shutdown()
    return elapsed / done


def measure(scenario: str, credits: int = 200_000) -> float:
    """Microseconds of CPU per credit of one scenario (one run)."""
    batch, turns = SCENARIOS[scenario]
    if batch == 1:
        credits //= 4  # the per-frame costs dominate; keep the run short
    return asyncio.run(_run(batch, turns, credits, None)) * 1e6


def _profile(scenario: str, credits: int, top: int) -> None:
    import cProfile
    import pstats

    batch, turns = SCENARIOS[scenario]
    profiler = cProfile.Profile()

    def start() -> Callable[[], None]:
        profiler.enable()
        return profiler.disable

    asyncio.run(_run(batch, turns, credits, start))
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def _extract(rev: str, into: Path) -> None:
    """``worker_agent/`` of git revision ``rev`` into ``into``."""
    blob = subprocess.run(
        ["git", "archive", "--format=tar", rev, "worker_agent"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")


def _child(scenario: str, credits: int, first: str | None) -> float:
    """One ``measure`` in a fresh interpreter whose ``worker_agent`` comes from ``first``
    (a directory holding an old ``worker_agent/``), or from this tree when ``None``."""
    here = str(Path(__file__).resolve().parents[2])
    # Explicit path entries ahead of everything: `-c` puts the working directory first, and
    # from inside this tree that would be this tree's worker_agent, whatever PYTHONPATH says.
    paths = [first, here] if first is not None else [here]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path[0:0] = {paths!r}; "
            "import worker_agent; "
            f"assert worker_agent.__file__.startswith({paths[0]!r}), worker_agent.__file__; "
            "from loadgen.bench.worker import measure; "
            f"print(measure({scenario!r}, {credits}))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def _compare(rev: str, credits: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        _extract(rev, Path(tmp))
        for scenario in SCENARIOS:
            old: list[float] = []
            new: list[float] = []
            for _ in range(repeat):  # alternating: drift of a shared machine hits both alike
                old.append(_child(scenario, credits, tmp))
                new.append(_child(scenario, credits, None))
            o, n = statistics.median(old), statistics.median(new)
            rows.append(
                {
                    "scenario": scenario,
                    "before_rev": rev,
                    "before_us_per_credit": round(o, 3),
                    "after_us_per_credit": round(n, 3),
                    "after_over_before": round(n / o, 3),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print µs of CPU per credit per scenario (one line each, or JSON lines)."""
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench.worker", description=__doc__)
    parser.add_argument("--credits", type=int, default=200_000, help="credits per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (median)")
    parser.add_argument("--compare", metavar="REV", help="also time REV's worker_agent")
    parser.add_argument("--profile", choices=sorted(SCENARIOS), help="cProfile one scenario")
    parser.add_argument("--top", type=int, default=25, help="rows of the profile")
    parser.add_argument("--json", action="store_true", help="JSON lines")
    args = parser.parse_args(argv)
    if args.profile:
        _profile(args.profile, args.credits, args.top)
        return 0
    if args.compare:
        rows = _compare(args.compare, args.credits, args.repeat)
    else:
        rows = [
            {
                "scenario": s,
                "us_per_credit": round(
                    statistics.median(measure(s, args.credits) for _ in range(args.repeat)), 3
                ),
            }
            for s in SCENARIOS
        ]
    for row in rows:
        if args.json:
            print(json.dumps({"bench": "worker", **row}))
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
