"""Where the router's microseconds per credit go, end to end (``make bench-profile``).

Starts ``credit-router serve`` and sim workers as ``bench e2e`` does, keeps a closed loop of
credits in flight from a bare producer, and samples the router process with py-spy (installed by
the Makefile into a throwaway venv; sampling, so the router runs at its normal speed, unlike
under cProfile). Each sampled stack's leaf and its nearest frame in our code are charged with
the router's measured CPU per credit in proportion to their samples: a table of µs per credit by
our function (inclusive of the library calls it makes) and by leaf (where the CPU actually is).

Usage: ``python -m loadgen.bench.profile --py-spy PATH [--seconds 8] [--top 30]``.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from loadgen.bench import e2e

__all__ = ["main"]

OURS = ("router_service/", "worker_agent/", "protocol/", "credit_common/")


def _frames(stack: str) -> list[tuple[str, str]]:
    """``func (file:line)`` frames of one collapsed py-spy stack, outermost first."""
    out = []
    for frame in stack.split(";"):
        name, _, where = frame.partition(" (")
        out.append((name.strip(), where.rstrip(")").rsplit(":", 1)[0]))
    return out


def _label(name: str, path: str) -> str:
    for marker in OURS:
        if marker in path:
            return f"{marker}{path.split(marker, 1)[1]}:{name}"
    return f"{Path(path).name}:{name}" if path else name


def _tables(raw: str, us_per_credit: float, top: int) -> dict[str, list[tuple[str, float]]]:
    by_leaf: collections.Counter[str] = collections.Counter()
    by_ours: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        total += count
        by_leaf[_label(*frames[-1])] += count
        ours = [f for f in frames if any(m in f[1] for m in OURS)]
        by_ours[_label(*ours[-1]) if ours else "(outside our code: loop, libzmq, idle)"] += count
    scale = us_per_credit / max(total, 1)
    return {
        "by_our_function": [(k, v * scale) for k, v in by_ours.most_common(top)],
        "by_leaf": [(k, v * scale) for k, v in by_leaf.most_common(top)],
    }


def _main_thread_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process's main thread (its tid is the pid)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / e2e.CLK_TCK


def run(
    py_spy: str, seconds: float, window: int, workers: int, top: int, target: str = "router"
) -> dict[str, Any]:
    """Profile ``target`` ("router", or "worker": the first worker agent process)."""
    producers, worker_ep = f"tcp://127.0.0.1:{e2e._port()}", f"tcp://127.0.0.1:{e2e._port()}"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stats: dict[str, float] = {}
    with e2e._processes(e2e._router_commands(producers, worker_ep, workers, window)) as procs:
        time.sleep(1.0)
        pid = procs[0].pid if target == "router" else procs[1].pid
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "profile.txt"

            def loop() -> None:
                stats.update(
                    e2e._closed_loop(
                        ctx, producers, procs[0].pid, window, 1.0, seconds, (procs[1].pid,)
                    )
                )

            thread = threading.Thread(target=loop)
            thread.start()
            time.sleep(1.5)  # past start-up (imports) and the closed loop's warm-up
            # Sampling without --idle: only samples where the process runs, so the shares
            # split its CPU time (not wall time).
            main0, all0 = _main_thread_cpu_s(pid), e2e._cpu_s(pid)
            spy = subprocess.run(
                [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "500",
                 "--duration", str(max(1, int(seconds) - 2)), "--output", str(out),
                 "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
            )  # fmt: skip
            main_cpu, all_cpu = _main_thread_cpu_s(pid) - main0, e2e._cpu_s(pid) - all0
            thread.join()
            if not out.exists():
                raise RuntimeError(f"py-spy wrote no profile: {spy.stderr.decode()[-300:]}")
            raw = out.read_text()
    ctx.destroy(linger=0)
    # One worker process of ``workers`` is sampled: it handles 1/workers of the credits.
    per_credit = (
        stats["router_cpu_us_per_credit"]
        if target == "router"
        else stats["workers_cpu_us_per_credit"] * workers
    )
    # py-spy samples Python threads only: the samples split the main thread's share of the
    # process CPU; libzmq's native I/O thread (the TCP work of every send and receive) is the
    # rest, shown as one row.
    main_share = main_cpu / all_cpu if all_cpu > 0 else 1.0
    tables = _tables(raw, per_credit * main_share, top)
    io_row = ("(libzmq I/O thread, native: not sampled)", per_credit * (1 - main_share))
    for rows in tables.values():
        rows.append(io_row)
        rows.sort(key=lambda row: -row[1])
    return {"closed_loop": stats, "main_thread_share": main_share, **tables}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench.profile", description=__doc__)
    parser.add_argument("--py-spy", required=True, help="path of a py-spy executable")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--target", choices=["router", "worker"], default="router")
    args = parser.parse_args(argv)
    result = run(args.py_spy, args.seconds, args.window, args.workers, args.top, args.target)
    loop = result["closed_loop"]
    print(
        f"{loop['credits_per_s']:.0f} credits/s; router {loop['router_cpu_us_per_credit']:.2f} µs "
        f"CPU per credit ({loop['router_cores']:.2f} cores); worker processes "
        f"{loop['workers_cpu_us_per_credit']:.2f} µs per credit ({loop['workers_cores']:.2f} "
        f"cores, {args.workers} processes); profiled: {args.target}, main thread "
        f"{result['main_thread_share']:.0%} of its CPU (shared machine: noisy)"
    )
    for title, key in (("our function (inclusive)", "by_our_function"), ("leaf", "by_leaf")):
        print(f"\n| µs/credit | {title} |\n|---:|---|")
        for name, us in result[key]:
            print(f"| {us:.3f} | {name} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
