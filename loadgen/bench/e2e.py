"""``credit-router bench e2e``: real processes over TCP loopback, against a raw baseline.

One run measures, on the same machine, minutes apart:

* **raw**: ``bench/raw.py`` — a plain pyzmq ROUTER forwarding producer batches to echo DEALER
  workers with the same batching and msgspec codec, no routing;
* **router**: ``credit-router serve`` with ``credit-router worker --executor sim
  --sim-zero-latency`` processes.

For each: closed-loop credits/s round trip (a producer keeps ``window`` credits in flight and
submits one per outcome), the router process's CPU per credit, and at half load (an open loop
at half the router's closed-loop rate) the p50/p99 submit→outcome latency. Ratios are what to
read: absolute numbers drift tens of percent between runs on a shared VM.

The scale run connects ``scale_agents`` worker agents (several per process) that only beat,
and reports the router's idle CPU.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import zmq

from protocol import PROTOCOL_VERSION
from protocol.codec import decode_router_to_producer, encode
from protocol.messages import (
    Credit,
    Outcome,
    OutcomeBatch,
    ProducerHello,
    ProducerWelcome,
    SubmitBatch,
)

__all__ = ["run"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (libzmq's I/O thread included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextlib.contextmanager
def _processes(
    commands: list[list[str]], env: dict[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        for cmd in commands
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)


class _Producer:
    """A bare producer speaking the real protocol, so both systems see the same client."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, f"bench/{uuid.uuid4().hex[:8]}".encode())
        self.sock.connect(endpoint)
        self.next_id = 0
        self.max_batch = 1024
        hello = encode(ProducerHello(producer="bench", protocol_version=PROTOCOL_VERSION))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.sock.send(hello)
            if self.sock.poll(200):
                msg = decode_router_to_producer(self.sock.recv())
                if isinstance(msg, ProducerWelcome):
                    self.max_batch = msg.max_batch
                    return
        raise TimeoutError(f"no router at {endpoint}")

    def submit(self, n: int, sent_at: dict[int, float] | None = None) -> None:
        start = self.next_id
        self.next_id += n
        now = time.perf_counter()
        for lo in range(start, start + n, self.max_batch):
            hi = min(lo + self.max_batch, start + n)
            credits = [Credit(id=i, x_correlation_id=f"s{i}") for i in range(lo, hi)]
            if sent_at is not None:
                for i in range(lo, hi):
                    sent_at[i] = now
            self.sock.send(encode(SubmitBatch(credits=credits)))

    def outcomes(self, timeout_ms: int) -> list[Outcome]:
        if not self.sock.poll(timeout_ms):
            raise TimeoutError("no outcome in time")
        msg = decode_router_to_producer(self.sock.recv())
        if isinstance(msg, OutcomeBatch):
            return msg.outcomes
        if isinstance(msg, Outcome):
            return [msg]
        return []

    def close(self) -> None:
        self.sock.close(0)


def _closed_loop(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    pid: int,
    window: int,
    warmup_s: float,
    duration_s: float,
    worker_pids: tuple[int, ...] = (),
) -> dict[str, float]:
    producer = _Producer(ctx, endpoint)
    producer.submit(window)
    start = time.perf_counter()
    measuring_since = 0.0
    count = 0
    cpu0 = wcpu0 = pcpu0 = 0.0
    while True:
        outcomes = producer.outcomes(10_000)
        now = time.perf_counter()
        if not measuring_since and now - start >= warmup_s:
            measuring_since, count, cpu0 = now, 0, _cpu_s(pid)
            wcpu0 = sum(_cpu_s(w) for w in worker_pids)
            pcpu0 = time.process_time()
        elif measuring_since:
            count += len(outcomes)
            if now - measuring_since >= duration_s:
                break
        producer.submit(len(outcomes))
    elapsed = now - measuring_since
    cpu = _cpu_s(pid) - cpu0
    wcpu = sum(_cpu_s(w) for w in worker_pids) - wcpu0
    pcpu = time.process_time() - pcpu0
    producer.close()
    return {
        "credits_per_s": count / elapsed,
        "router_cpu_us_per_credit": cpu / max(count, 1) * 1e6,
        "router_cores": cpu / elapsed,
        # The workers share the same two cores: when they use most of them, they and not the
        # router bound the closed loop.
        "workers_cpu_us_per_credit": wcpu / max(count, 1) * 1e6,
        "workers_cores": wcpu / elapsed,
        # The bench's own producer (this process) takes its share of the two cores as well.
        "producer_cpu_us_per_credit": pcpu / max(count, 1) * 1e6,
    }


def _one_in_flight(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, duration_s: float
) -> dict[str, float]:
    """One credit in flight at a time: submit -> outcome round trip, the latency floor of a hop."""
    producer = _Producer(ctx, endpoint)
    rtts: list[float] = []
    start = time.perf_counter()
    while True:
        sent = time.perf_counter()
        if sent - start >= duration_s:
            break
        producer.submit(1)
        while not producer.outcomes(5_000):
            pass
        rtts.append(time.perf_counter() - sent)
    producer.close()
    rtts = sorted(rtts[len(rtts) // 10 :])  # the first tenth warms connections and caches
    return {
        "one_in_flight_p50_us": rtts[len(rtts) // 2] * 1e6,
        "one_in_flight_mean_us": sum(rtts) / len(rtts) * 1e6,
    }


def _open_loop(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, rate: float, duration_s: float
) -> dict[str, float]:
    """Offer ``rate`` credits/s in 1 ms slices; latency is submit -> outcome per credit."""
    if rate <= 0:
        raise RuntimeError("no closed-loop throughput was measured to set the offered rate")
    producer = _Producer(ctx, endpoint)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    per_slice = max(1, round(rate / 1000))
    start = time.perf_counter()
    next_slice = start
    while True:
        now = time.perf_counter()
        if now >= next_slice:
            if now - start >= duration_s:
                break
            producer.submit(per_slice, sent_at)
            next_slice += per_slice / rate
        # Sleep in poll until the next slice is due: a busy-waiting producer would take a whole
        # core from the two the router and its workers share.
        wait_ms = max(0, int((next_slice - time.perf_counter()) * 1000))
        while producer.sock.poll(wait_ms):
            done = time.perf_counter()
            for o in producer.outcomes(0):
                latencies.append(done - sent_at.pop(o.credit_id))
            wait_ms = 0
    deadline = time.perf_counter() + 5
    while sent_at and time.perf_counter() < deadline:
        done = time.perf_counter()
        for o in producer.outcomes(5_000):
            latencies.append(done - sent_at.pop(o.credit_id))
    producer.close()
    latencies.sort()
    # Skip the first half second (connection set-up, caches).
    return {
        "offered_per_s": rate,
        "p50_us": latencies[len(latencies) // 2] * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


def _raw_commands(producers: str, workers: str, k: int) -> list[list[str]]:
    raw = [sys.executable, "-m", "loadgen.bench.raw"]
    cmds = [
        [
            *raw,
            "router",
            "--producers",
            producers,
            "--workers",
            workers,
            "--workers-expected",
            str(k),
        ]
    ]
    cmds += [[*raw, "worker", "--router", workers, "--name", f"raw-{i}"] for i in range(k)]
    return cmds


def _router_commands(producers: str, workers: str, k: int, capacity: int) -> list[list[str]]:
    cli = [sys.executable, "-m", "credit_router"]
    cmds = [
        [
            *cli,
            "serve",
            "--producers",
            producers,
            "--workers",
            workers,
            "--log-level",
            "warning",
            "--http-port",
            "0",
        ]
    ]
    cmds += [
        [
            *cli,
            "worker",
            "--router",
            workers,
            "--name",
            f"bench-{i}",
            "--capacity",
            str(capacity),
            "--executor",
            "sim",
            "--sim-zero-latency",
            "--no-first-token-events",
            "--log-level",
            "WARNING",
        ]
        for i in range(k)
    ]
    return cmds


def _measure(
    name: str,
    commands: list[list[str]],
    producers: str,
    window: int,
    duration_s: float,
    half_rate: float | None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with _processes(commands, env) as procs:
            time.sleep(1.0)
            dead = [c[:5] for c, p in zip(commands, procs, strict=True) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{name}: processes exited at start: {dead}")
            row: dict[str, Any] = {"system": name}
            pids = tuple(p.pid for p in procs[1:])
            row.update(_closed_loop(ctx, producers, procs[0].pid, window, 1.0, duration_s, pids))
            rate = half_rate if half_rate is not None else row["credits_per_s"] / 2
            row.update(_open_loop(ctx, producers, rate, duration_s))
            row.update(_one_in_flight(ctx, producers, min(duration_s, 2.0)))
            return row
    finally:
        ctx.destroy(linger=0)


def _scale(agents: int, processes: int, duration_s: float) -> dict[str, Any]:
    """Router CPU with ``agents`` idle workers connected and beating (a few per process)."""
    import json
    import urllib.request

    workers, producers, http = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}", _port()
    cli = [sys.executable, "-m", "credit_router"]
    commands = [[*cli, "serve", "--workers", workers, "--producers", producers,
                 "--http-port", str(http), "--log-level", "warning"]]  # fmt: skip
    per = -(-agents // processes)
    commands += [
        [sys.executable, "-m", "loadgen.bench.agents", "--router", workers,
         "--prefix", f"a{i}", "--count", str(min(per, agents - i * per))]
        for i in range(processes)
    ]  # fmt: skip
    with _processes(commands) as procs:
        started = time.monotonic()
        joined = 0
        while time.monotonic() - started < 60 and joined < agents:
            time.sleep(0.5)
            url = f"http://127.0.0.1:{http}/status"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as r:
                joined = json.load(r)["totals"]["workers"]
        join_s = time.monotonic() - started
        cpu0 = _cpu_s(procs[0].pid)
        time.sleep(duration_s)
        cores = (_cpu_s(procs[0].pid) - cpu0) / duration_s
    return {
        "system": "scale",
        "agents_connected": joined,
        "join_s": join_s,
        "router_idle_cores": cores,
        "heartbeat_interval_s": 1.0,
    }


def run(
    *, workers: int = 2, window: int = 2048, duration_s: float = 3.0, scale_agents: int = 1000
) -> list[dict[str, Any]]:
    """Measure raw and router in one run; the last row holds the ratios against the targets."""

    def endpoints() -> tuple[str, str]:
        return f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"

    p, w = endpoints()
    router = _measure(
        "router", _router_commands(p, w, workers, window), p, window, duration_s, None
    )
    p, w = endpoints()
    bare = _measure(
        "router_without_histograms", _router_commands(p, w, workers, window), p, window,
        duration_s, router["offered_per_s"], env={"CREDIT_ROUTER_LATENCY_HISTOGRAMS": "false"},
    )  # fmt: skip
    p, w = endpoints()
    raw = _measure("raw", _raw_commands(p, w, workers), p, window, duration_s,
                   router["offered_per_s"])  # fmt: skip
    summary = {
        "system": "ratio",
        "metrics_throughput_cost": 1 - router["credits_per_s"] / bare["credits_per_s"],
        "metrics_router_cpu_us_per_credit": router["router_cpu_us_per_credit"]
        - bare["router_cpu_us_per_credit"],
        "throughput_vs_raw": router["credits_per_s"] / raw["credits_per_s"],
        "target_throughput_vs_raw": 0.6,
        "target_credits_per_s": 250_000,
        "p99_half_load_vs_raw": router["p99_us"] / raw["p99_us"],
        "target_p99_half_load_vs_raw": 1.5,
        "one_in_flight_p50_minus_raw_us": router["one_in_flight_p50_us"]
        - raw["one_in_flight_p50_us"],
        "target_one_in_flight_minus_raw_us": 100,
    }
    rows = [raw, router, bare, summary]
    if scale_agents:
        rows.append(_scale(scale_agents, 4, duration_s))
    for row in rows:
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = round(v, 3)
        row["bench"] = "e2e"
    return rows
