"""Fault tests with real processes on loopback: a router (``credit-router serve``), worker agents
(``python -m worker_agent``) and a RouterClient producer in the test. Processes get killed,
frozen, restarted and drained; every credit must still end with exactly one outcome.

Timing: beats every 0.2 s, suspect after 3 missed, lost after 2 s of silence; ZMTP's own
heartbeat timeout is 5 s, so a loss seen in under 5 s was seen by the application heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from protocol import Credit, Outcome, Status
from router_service.client import RouterClient
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BEAT_S = 0.2
LOST_AFTER_S = 2.0


def worker_samples(ports: Iterable[int], name: str, skip_unreachable: bool = False) -> list[Sample]:
    """The samples named ``name`` in the ``/metrics`` of the workers on these HTTP ports (read
    with prometheus_client's own parser); ``skip_unreachable``: a worker not answering counts
    as having none (else its error is raised)."""
    out: list[Sample] = []
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            if not skip_unreachable:
                raise
            continue
        for family in text_string_to_metric_families(text):
            out += [sample for sample in family.samples if sample.name == name]
    return out


def payload(output_tokens: int) -> bytes:
    """Sim executor payload: decode takes ``output_tokens`` x 4 ms."""
    return msgspec.msgpack.encode({"input_tokens": 64, "output_tokens": output_tokens})


class Cluster:
    """A router and its workers as real processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.worker_port = free_port()
        self.producer_port = free_port()
        self.http_port = free_port()
        self.router: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_http: dict[str, int] = {}
        self._files: list[Any] = []

    @property
    def worker_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.worker_port}"

    @property
    def producer_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.producer_port}"

    def _log(self, name: str) -> Any:
        f = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        self._files.append(f)
        return f

    def start_router(self, *extra: str) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable, "-m", "credit_router", "serve",
            "--workers", self.worker_endpoint, "--producers", self.producer_endpoint,
            "--http-port", str(self.http_port),
            "--heartbeat-interval-s", str(BEAT_S), "--lost-after-s", str(LOST_AFTER_S),
            "--inflight-report-interval-s", "0.5", "--drain-deadline-s", "5",
            "--log-level", "debug", *extra,
        ]  # fmt: skip
        self.router = subprocess.Popen(cmd, stdout=self._log("router"), stderr=subprocess.STDOUT)
        return self.router

    def start_worker(self, name: str, *extra: str, capacity: int = 4) -> subprocess.Popen[bytes]:
        if "--http-port" not in extra:
            self.worker_http[name] = port = free_port()
            extra = (*extra, "--http-port", str(port))
        cmd = [
            sys.executable, "-m", "worker_agent", "--router", self.worker_endpoint,
            "--name", name, "--capacity", str(capacity), "--executor", "sim",
            "--drain-deadline-s", "10", "--log-level", "DEBUG", *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=self._log(name), stderr=subprocess.STDOUT)
        self.workers[name] = proc
        return proc

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/status"
        with urllib.request.urlopen(url, timeout=2) as r:
            doc: dict[str, Any] = json.load(r)
        return doc

    def held(self) -> int:
        """Credits the workers hold, by their own ``/metrics`` (``credit_worker_in_flight``);
        a worker not up yet, or killed, holds nothing we can count."""
        samples = worker_samples(self.worker_http.values(), "credit_worker_in_flight", True)
        return int(sum(sample.value for sample in samples))

    async def until_held(self, count: int, within_s: float = 10.0) -> None:
        """Wait until the workers hold ``count`` credits: the router's ``in_flight`` counts a
        dispatch once decided, which may still be in its socket (and die with it)."""
        deadline = time.monotonic() + within_s
        held = -1
        while time.monotonic() < deadline:
            held = await asyncio.to_thread(self.held)
            if held == count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for the workers to hold {count}: {held}")

    async def until(self, predicate: Any, within_s: float = 10.0, what: str = "") -> Any:
        deadline = time.monotonic() + within_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await asyncio.to_thread(self.status)
                if predicate(last):
                    return last
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: last status {last}")

    async def workers_active(self, *names: str) -> None:
        def ok(doc: dict[str, Any]) -> bool:
            states = {w["name"]: w["state"] for w in doc["workers"]}
            return all(states.get(n) == "active" for n in names)

        await self.until(ok, what=f"workers {names} active")

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.router]:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
        for proc in [*self.workers.values(), self.router]:
            if proc is not None:
                proc.wait(timeout=10)
        for f in self._files:
            f.close()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log"))
        )


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(c.logs())  # the processes' own logs, in the failure report


@contextlib.asynccontextmanager
async def producer(c: Cluster, **kw: Any) -> AsyncIterator[RouterClient]:
    client = RouterClient(c.producer_endpoint, name="faults", **kw)
    await client.connect(timeout_s=20)
    try:
        yield client
    finally:
        await client.close()


async def gather(futures: list[asyncio.Future[Outcome]], within_s: float) -> list[Outcome]:
    return list(await asyncio.wait_for(asyncio.gather(*futures), within_s))


async def test_kill9_worker_mid_run(cluster: Cluster) -> None:
    cluster.start_router()
    cluster.start_worker("a")
    cluster.start_worker("b")
    await cluster.workers_active("a", "b")
    async with producer(cluster) as client:
        first = [
            Credit(id=i, x_correlation_id=f"s{i}", num_turns=2, allow_migration=i % 2 == 0,
                   payload=payload(750))
            for i in range(8)
        ]  # fmt: skip
        futures = await client.submit_many(first)
        await cluster.until(lambda d: d["totals"]["in_flight"] == 8, what="8 in flight")
        cluster.workers["a"].kill()
        killed_at = time.monotonic()
        lost = []
        for future in asyncio.as_completed(futures, timeout=15):
            outcome = await future
            if outcome.worker == "a":
                assert (outcome.status, outcome.reason) == (Status.LOST, "worker_lost")
                lost.append(outcome)
                assert time.monotonic() - killed_at < 5.0, "a's credits ended within 5 s"
            else:
                assert outcome.status is Status.COMPLETED, outcome
        assert len(lost) == 4
        # The router said so in one line an operator can act on: who, why, what it cost.
        router_log = (cluster.tmp / "router.log").read_text()
        assert re.search(
            r"WARNING .*worker left the fleet name=a reason=worker_lost credits_ended=4 "
            r"sessions_lost=4",
            router_log,
        ), router_log[-2000:]
        lost_ids = {o.credit_id for o in lost}
        second = [
            Credit(id=100 + i, x_correlation_id=f"s{i}", turn_index=1, num_turns=2,
                   allow_migration=i % 2 == 0, payload=payload(1))
            for i in range(8)
        ]  # fmt: skip
        outcomes = await gather(await client.submit_many(second), 10)
        for credit, outcome in zip(second, outcomes, strict=True):
            if credit.id - 100 not in lost_ids:
                assert outcome.status is Status.COMPLETED
            elif credit.allow_migration:
                assert (outcome.status, outcome.worker) == (Status.COMPLETED, "b")
            else:
                assert (outcome.status, outcome.reason) == (Status.REJECTED, "session_lost")
        assert client.outstanding == 0
    doc = cluster.status()
    assert doc["totals"]["submitted"] == sum(doc["totals"]["outcomes"].values()) == 16


async def test_sigstop_is_caught_by_application_heartbeats(cluster: Cluster) -> None:
    cluster.start_router()
    cluster.start_worker("frozen")
    cluster.start_worker("fine")
    await cluster.workers_active("frozen", "fine")
    async with producer(cluster) as client:
        futures = await client.submit_many(
            Credit(id=i, x_correlation_id=f"s{i}", payload=payload(500)) for i in range(4)
        )
        await cluster.until(lambda d: d["totals"]["in_flight"] == 4, what="4 in flight")
        os.kill(cluster.workers["frozen"].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        outcomes = await gather(futures, 10)
        frozen = [o for o in outcomes if o.worker == "frozen"]
        assert [(o.status, o.reason) for o in frozen] == [(Status.LOST, "worker_lost")] * 2
        # ZMTP would have taken 5 s; the application heartbeats took the grace period.
        assert time.monotonic() - stopped_at < 4.5
        os.kill(cluster.workers["frozen"].pid, signal.SIGCONT)
        # It speaks again, learns it is unknown, and joins anew; new credits reach it.
        await cluster.workers_active("frozen", "fine")
        more = await gather(
            await client.submit_many(
                Credit(id=10 + i, x_correlation_id=f"t{i}", payload=payload(1)) for i in range(4)
            ),
            10,
        )
        assert {o.status for o in more} == {Status.COMPLETED}


async def test_freeze_shorter_than_grace_loses_nothing(cluster: Cluster) -> None:
    cluster.start_router()
    cluster.start_worker("napper")
    await cluster.workers_active("napper")
    async with producer(cluster) as client:
        futures = await client.submit_many(
            Credit(id=i, x_correlation_id=f"s{i}", num_turns=2, payload=payload(250))
            for i in range(4)
        )
        await cluster.until(lambda d: d["totals"]["in_flight"] == 4, what="4 in flight")
        os.kill(cluster.workers["napper"].pid, signal.SIGSTOP)
        await cluster.until(
            lambda d: d["workers"][0]["state"] == "suspect",
            within_s=LOST_AFTER_S,
            what="suspect",
        )
        os.kill(cluster.workers["napper"].pid, signal.SIGCONT)
        outcomes = await gather(futures, 10)
        assert {o.status for o in outcomes} == {Status.COMPLETED}
        nxt = await gather(
            await client.submit_many(
                Credit(id=10 + i, x_correlation_id=f"s{i}", turn_index=1, num_turns=2,
                       payload=payload(1))
                for i in range(4)
            ),
            10,
        )  # fmt: skip
        assert {(o.status, o.worker) for o in nxt} == {(Status.COMPLETED, "napper")}


class Proxy:
    """A TCP proxy the test can cut, to make a live worker lose its connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self, for_s: float) -> None:
        """Drop every connection and refuse new ones for ``for_s`` seconds."""
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        await asyncio.sleep(for_s)
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()


async def test_worker_behind_a_proxy_waits_for_its_router(cluster: Cluster) -> None:
    """A worker started before its router, through a TCP proxy that accepts and hangs up while
    nothing is behind it: its handshakes fail many times a second with a bare hang-up, which is
    no verdict on its keys. It keeps trying, and joins once the router is up."""
    proxy = Proxy(cluster.worker_port)
    await proxy.start()
    real = cluster.worker_port
    cluster.worker_port = proxy.port
    worker = cluster.start_worker("patient")
    cluster.worker_port = real
    try:
        await asyncio.sleep(2.0)  # libzmq retries every 0.1 s: well past 5 hang-ups
        assert "during the handshake" in (cluster.tmp / "patient.log").read_text()
        assert worker.poll() is None, cluster.logs()
        cluster.start_router()
        await cluster.workers_active("patient")
        async with producer(cluster) as client:
            outcome = await client.run(Credit(id=1, x_correlation_id="s", payload=payload(1)))
        assert (outcome.status, outcome.worker) == (Status.COMPLETED, "patient")
    finally:
        await proxy.stop()


async def test_same_incarnation_reconnecting_within_grace_loses_nothing(
    cluster: Cluster,
) -> None:
    # A blip costs the worker's libzmq a few reconnect back-off steps and a hello: give it the
    # default grace (5 s) rather than the short one the other tests use.
    # (A cut link looks like a closed connection: it gets the same grace here.)
    cluster.start_router("--lost-after-s", "5", "--closed-grace-s", "5")
    proxy = Proxy(cluster.worker_port)
    await proxy.start()
    real = cluster.worker_port
    cluster.worker_port = proxy.port  # the worker connects through the proxy
    cluster.start_worker("blip")
    cluster.worker_port = real
    await cluster.workers_active("blip")
    try:
        async with producer(cluster) as client:
            futures = await client.submit_many(
                Credit(id=i, x_correlation_id=f"s{i}", payload=payload(150)) for i in range(4)
            )
            await cluster.until(lambda d: d["totals"]["in_flight"] == 4, what="4 in flight")
            # Cut once the worker holds them: a dispatch still in the proxy dies with the
            # connection, and its credit ends lost: orphaned (not this test's subject).
            await cluster.until_held(4)
            incarnation = cluster.status()["workers"][0]["incarnation"]
            await proxy.cut(for_s=0.8)  # completions finish during the cut
            outcomes = await gather(futures, 10)
            assert {(o.status, o.worker) for o in outcomes} == {(Status.COMPLETED, "blip")}, (
                outcomes
            )
            doc = cluster.status()
            assert doc["workers"][0]["incarnation"] == incarnation
            assert doc["totals"]["outcomes"]["lost"] == 0
    finally:
        await proxy.stop()


async def test_restarted_worker_is_new_and_the_old_one_is_lost_at_once(
    cluster: Cluster,
) -> None:
    cluster.start_router("--lost-after-s", "30")  # long grace: only the new hello can end it
    cluster.start_worker("phoenix")
    await cluster.workers_active("phoenix")
    old = cluster.status()["workers"][0]["incarnation"]
    async with producer(cluster) as client:
        future = await client.submit(
            Credit(id=1, x_correlation_id="s", num_turns=2, payload=payload(2000))
        )
        await cluster.until(lambda d: d["totals"]["in_flight"] == 1, what="in flight")
        cluster.workers["phoenix"].kill()
        cluster.workers["phoenix"].wait()
        started = time.monotonic()
        cluster.start_worker("phoenix")
        outcome = await asyncio.wait_for(future, 15)
        assert (outcome.status, outcome.reason) == (Status.LOST, "worker_lost")
        assert time.monotonic() - started < 10, "ended by the new hello, not the 30 s grace"
        doc = await cluster.until(
            lambda d: d["workers"] and d["workers"][0]["incarnation"] != old, what="new one"
        )
        assert doc["workers"][0]["state"] == "active"
        nxt = await client.run(
            Credit(id=2, x_correlation_id="s", turn_index=1, num_turns=2, payload=payload(1))
        )
        assert (nxt.status, nxt.reason) == (Status.REJECTED, "session_lost")


async def test_router_restart_mid_run(cluster: Cluster) -> None:
    cluster.start_router()
    cluster.start_worker("a", capacity=8)
    cluster.start_worker("b", capacity=8)
    await cluster.workers_active("a", "b")
    async with producer(cluster, recovery_grace_s=8.0, heartbeat_interval_s=BEAT_S) as client:
        futures = await client.submit_many(
            Credit(id=i, x_correlation_id=f"s{i}", payload=payload(300)) for i in range(8)
        )
        await cluster.until(lambda d: d["totals"]["in_flight"] == 8, what="8 in flight")
        # Killed once the workers hold them: a dispatch still in the dying router's socket
        # never ran, and ends lost: router_restarted after the grace (PROTOCOL.md §5.1).
        await cluster.until_held(8)
        assert cluster.router is not None
        cluster.router.kill()
        cluster.router.wait()
        await asyncio.sleep(1.5)  # the credits finish while no router is there
        cluster.start_router()
        outcomes = await gather(futures, 20)
        # Each completion reached the producer exactly once, through the new router.
        assert [o.status for o in outcomes] == [Status.COMPLETED] * 8, outcomes
        assert {o.credit_id for o in outcomes} == set(range(8))
        await cluster.workers_active("a", "b")
        after = await client.run(Credit(id=100, x_correlation_id="later", payload=payload(1)))
        assert after.status is Status.COMPLETED


async def test_sigterm_worker_drains_without_losing_credits(cluster: Cluster) -> None:
    cluster.start_router()
    cluster.start_worker("leaving")
    await cluster.workers_active("leaving")
    async with producer(cluster) as client:
        # Long enough (6 s) to still be running after the second worker has started on a slow
        # machine, and short enough for the worker's 10 s drain deadline.
        futures = await client.submit_many(
            Credit(id=i, x_correlation_id=f"s{i}", payload=payload(1500)) for i in range(4)
        )
        await cluster.until(lambda d: d["totals"]["in_flight"] == 4, what="4 in flight")
        cluster.start_worker("staying")
        await cluster.workers_active("staying")
        cluster.workers["leaving"].send_signal(signal.SIGTERM)
        await cluster.until(
            lambda d: {w["name"]: w["state"] for w in d["workers"]}.get("leaving") == "draining",
            what="draining",
        )
        fresh = await client.run(Credit(id=10, x_correlation_id="new", payload=payload(1)))
        assert fresh.worker == "staying", "no new session goes to a draining worker"
        outcomes = await gather(futures, 20)
        assert {(o.status, o.worker) for o in outcomes} == {(Status.COMPLETED, "leaving")}
    assert cluster.workers["leaving"].wait(timeout=15) == 0
    doc = await cluster.until(
        lambda d: "leaving" not in {w["name"] for w in d["workers"]}, what="goodbye"
    )
    assert doc["totals"]["outcomes"]["lost"] == 0


async def test_sigterm_router_drains_and_every_credit_ends(cluster: Cluster) -> None:
    cluster.start_router()
    cluster.start_worker("w", capacity=2)
    await cluster.workers_active("w")
    async with producer(cluster) as client:
        running = await client.submit_many(
            Credit(id=i, x_correlation_id=f"s{i}", payload=payload(150)) for i in range(2)
        )
        queued = await client.submit_many(
            Credit(id=10 + i, x_correlation_id=f"q{i}", payload=payload(5000)) for i in range(3)
        )
        await cluster.until(lambda d: d["totals"]["queued"] == 3, what="3 queued")
        assert cluster.router is not None
        cluster.router.send_signal(signal.SIGTERM)
        await cluster.until(lambda d: d["router"]["draining"], what="draining")
        late = await client.run(Credit(id=99, x_correlation_id="late", payload=payload(1)))
        assert (late.status, late.reason) == (Status.REJECTED, "router_draining")
        done = await gather(running, 10)
        assert {o.status for o in done} == {Status.COMPLETED}
        rest = await gather(queued, 15)  # 5000 tokens = 20 s: past the 5 s drain deadline
        assert all(o.status in (Status.LOST, Status.REJECTED, Status.COMPLETED) for o in rest)
        assert {o.reason for o in rest if o.status is not Status.COMPLETED} <= {"router_shutdown"}
    assert cluster.router.wait(timeout=15) == 0


async def test_worker_metrics_and_readiness(cluster: Cluster) -> None:
    cluster.start_router()
    port = free_port()
    cluster.start_worker("metered", "--http-port", str(port))
    await cluster.workers_active("metered")

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    async with producer(cluster) as client:
        outcomes = await gather(
            await client.submit_many(
                Credit(id=i, x_correlation_id=f"s{i}", payload=payload(2)) for i in range(3)
            ),
            10,
        )
    assert {o.status for o in outcomes} == {Status.COMPLETED}
    status, text = await asyncio.to_thread(get, "/metrics")
    assert status == 200
    assert 'credit_worker_requests_total{status="completed"} 3.0' in text
    assert "credit_worker_ttft_seconds_count 3.0" in text
    assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
