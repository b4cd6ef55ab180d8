"""RouterService and RouterClient over real ZeroMQ sockets on loopback, with scripted workers.

The workers here are raw DEALER sockets driven by the test, so every frame is under its control
(the real worker agent has its own tests, and the end-to-end tests run real processes).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import zmq

from protocol import PROTOCOL_VERSION
from protocol.codec import decode_router_to_producer, decode_router_to_worker, encode
from protocol.messages import (
    Ack,
    BranchMode,
    ChildRelease,
    Completion,
    CompletionBatch,
    Credit,
    Dispatch,
    DispatchBatch,
    ErrorReport,
    Goodbye,
    Heartbeat,
    Hello,
    ProducerHello,
    Recovered,
    Refusal,
    Status,
    Welcome,
)
from router_service.client import ProducerRefusedError, RouterClient
from router_service.core.router import RouterCore
from router_service.service import RouterService
from router_service.transport import DealerSocket

pytestmark = pytest.mark.integration


class ScriptedWorker:
    """A DEALER the test drives frame by frame."""

    def __init__(self, ctx: zmq.Context, endpoint: str, name: str) -> None:
        self.name = name
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.connect(endpoint)
        self.seq = 0

    def send(self, msg: object) -> None:
        self.sock.send(encode(msg))

    async def recv(self, within_s: float = 3.0) -> object:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while loop.time() < deadline:
            try:
                return decode_router_to_worker(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                await asyncio.sleep(0.002)
        raise TimeoutError(f"{self.name} got nothing")

    async def expect(self, kind: type, within_s: float = 3.0) -> object:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if isinstance(msg, kind):
                return msg

    async def hello(
        self, capacity: int = 8, incarnation: str = "i1", version: int = PROTOCOL_VERSION
    ):
        self.send(
            Hello(
                name=self.name, incarnation=incarnation, protocol_version=version, capacity=capacity
            )
        )
        return await self.expect(Welcome | Refusal)

    async def credits(self, n: int, within_s: float = 3.0) -> list[tuple[str, Credit]]:
        got: list[tuple[str, Credit]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while len(got) < n:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if isinstance(msg, Dispatch):
                got.append((msg.producer, msg.credit))
            elif isinstance(msg, DispatchBatch):
                got.extend((msg.producer, c) for c in msg.credits)
        return got

    def complete(self, producer: str, credit: Credit, status: Status = Status.COMPLETED) -> int:
        self.seq += 1
        self.send(
            CompletionBatch(
                completions=[
                    Completion(seq=self.seq, producer=producer, credit_id=credit.id, status=status)
                ]
            )
        )
        return self.seq

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
async def router() -> AsyncIterator[RouterService]:
    core = RouterCore(
        protocol_version=PROTOCOL_VERSION,
        router_incarnation="r1",
        heartbeat_interval_s=0.2,
        lost_after_s=1.0,
    )
    service = RouterService(
        core,
        worker_endpoint="tcp://127.0.0.1:0",
        producer_endpoint="tcp://127.0.0.1:0",
        heartbeat_interval_s=0.2,
        drain_deadline_s=1.0,
    )
    task = asyncio.create_task(service.serve())
    await asyncio.wait_for(service.ready.wait(), 5)
    yield service
    service.request_exit(force=True)
    await asyncio.wait_for(task, 5)


@pytest.fixture
def ctx() -> zmq.Context:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


async def test_round_trip_with_acks(router: RouterService, ctx: zmq.Context) -> None:
    worker = ScriptedWorker(ctx, router.worker_endpoint, "w1")
    assert isinstance(await worker.hello(), Welcome)
    async with RouterClient(router.producer_endpoint, name="bench", context=ctx) as client:
        futures = await client.submit_many(Credit(id=i, x_correlation_id=f"s{i}") for i in range(5))
        got = await worker.credits(5)
        assert {c.id for _, c in got} == set(range(5))
        assert {p for p, _ in got} == {client.key}
        for producer, credit in got:
            last = worker.complete(producer, credit)
        ack = await worker.expect(Ack)
        assert ack.seq <= last
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 3)
        assert [o.status for o in outcomes] == [Status.COMPLETED] * 5
        assert all(o.worker == "w1" for o in outcomes)
        assert all(o.submit_to_dispatch_s is not None for o in outcomes)
        # A retransmitted completion is acknowledged again but never delivered twice.
        worker.complete(*got[0])
        await worker.expect(Ack)
        await asyncio.sleep(0.05)
        assert client.unmatched_outcomes == 0
        assert router.core.stats.duplicate_completions == 1
    worker.close()


async def test_version_mismatch_is_refused_naming_both(router: RouterService, ctx) -> None:
    worker = ScriptedWorker(ctx, router.worker_endpoint, "old")
    refusal = await worker.hello(version=99)
    assert isinstance(refusal, Refusal)
    assert "99" in refusal.reason
    assert str(PROTOCOL_VERSION) in refusal.reason
    worker.close()


async def test_hello_may_not_claim_another_routing_id(router: RouterService, ctx) -> None:
    worker = ScriptedWorker(ctx, router.worker_endpoint, "real-name")
    worker.send(
        Hello(name="someone-else", incarnation="x", protocol_version=PROTOCOL_VERSION, capacity=1)
    )
    refusal = await worker.expect(Refusal)
    assert "does not match" in refusal.reason
    assert "someone-else" not in router.core.workers
    worker.close()


async def test_garbage_costs_only_that_peer(router: RouterService, ctx) -> None:
    good = ScriptedWorker(ctx, router.worker_endpoint, "good")
    bad = ScriptedWorker(ctx, router.worker_endpoint, "bad")
    await good.hello()
    await bad.hello()
    bad.sock.send(b"\xc1\xc1garbage")
    bad.sock.send_multipart([b"a", b"b"])
    report = await bad.expect(ErrorReport)
    assert report.code == "invalid_message"
    assert router.invalid_messages.get("malformed") == 1
    async with RouterClient(router.producer_endpoint, context=ctx) as client:
        futures = await client.submit_many(Credit(id=i, x_correlation_id=f"s{i}") for i in range(2))
        for w in (good, bad):
            for producer, credit in await w.credits(1):
                w.complete(producer, credit)
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 3)
        assert {o.status for o in outcomes} == {Status.COMPLETED}
    assert router.invalid_messages.get("multipart") == 1
    good.close()
    bad.close()


async def test_unknown_worker_is_told_to_hello(router: RouterService, ctx) -> None:
    stranger = ScriptedWorker(ctx, router.worker_endpoint, "stranger")
    stranger.send(ChildRelease(x_correlation_id="x"))
    report = await stranger.expect(ErrorReport)
    assert report.code == "unknown_worker"
    stranger.close()


async def test_credit_toward_a_vanished_worker_is_not_lost_in_silence(
    router: RouterService, ctx: zmq.Context
) -> None:
    """A worker whose connection closed is noticed at once (issue 9 scenario 19: not after the
    silence timeout), so a new session's credit goes to a live worker instead of the void."""
    ghost = ScriptedWorker(ctx, router.worker_endpoint, "ghost")
    await ghost.hello()  # joins first: the least-loaded tie-break picks it first
    alive = ScriptedWorker(ctx, router.worker_endpoint, "alive")
    await alive.hello()
    ghost.close()
    for _ in range(100):
        if router.peer_events.get("worker_connection_closed"):
            break
        await asyncio.sleep(0.01)
    assert router.peer_events.get("worker_connection_closed") == 1
    async with RouterClient(router.producer_endpoint, context=ctx) as client:
        future = await client.submit(Credit(id=1, x_correlation_id="s"))
        ((producer, credit),) = await alive.credits(1)
        alive.complete(producer, credit)
        outcome = await asyncio.wait_for(future, 3)
    assert (outcome.status, outcome.worker) == (Status.COMPLETED, "alive")
    alive.close()


async def test_silent_worker_is_lost_and_its_credits_end(router: RouterService, ctx) -> None:
    worker = ScriptedWorker(ctx, router.worker_endpoint, "mute")
    await worker.hello()
    async with RouterClient(router.producer_endpoint, context=ctx) as client:
        future = await client.submit(Credit(id=1, x_correlation_id="s"))
        await worker.credits(1)
        outcome = await asyncio.wait_for(future, 5)  # lost_after_s=1 with 0.2 s beats
    assert (outcome.status, outcome.reason) == (Status.LOST, "worker_lost")
    worker.close()


async def test_recovered_completion_reaches_the_producer_once(router: RouterService, ctx) -> None:
    worker = ScriptedWorker(ctx, router.worker_endpoint, "w")
    await worker.hello()
    async with RouterClient(router.producer_endpoint, context=ctx) as client:
        # A credit this router never saw: as if dispatched by its previous incarnation.
        future = client._futures.setdefault(77, asyncio.get_running_loop().create_future())
        done = Completion(seq=1, producer=client.key, credit_id=77, status=Status.COMPLETED)
        worker.send(Recovered(router_incarnation="r0", completions=[done]))
        outcome = await asyncio.wait_for(future, 3)
        assert outcome.status is Status.COMPLETED
        worker.send(Recovered(router_incarnation="r0", completions=[done]))  # resent
        await worker.expect(Ack)
        await asyncio.sleep(0.05)
        # Issue 9 scenario 5: the router forwards a retransmitted Recovered once, not twice
        # (a producer written from PROTOCOL.md alone cannot know to filter it).
        assert client.unmatched_outcomes == 0
        assert router.peer_events["duplicate_completions"] == 1
    worker.close()


async def test_goodbye_and_fork_child_on_parent_worker(router: RouterService, ctx) -> None:
    a = ScriptedWorker(ctx, router.worker_endpoint, "a")
    b = ScriptedWorker(ctx, router.worker_endpoint, "b")
    await a.hello()
    await b.hello()
    async with RouterClient(router.producer_endpoint, context=ctx) as client:
        root = await client.submit(Credit(id=1, x_correlation_id="root", fork_count=2))
        polled = await asyncio.wait_for(_first_credit(a, b), 3)
        holder, (producer, credit) = polled
        holder.complete(producer, credit)
        await root
        kids = await client.submit_many(
            Credit(
                id=10 + i,
                x_correlation_id=f"k{i}",
                parent_correlation_id="root",
                branch_mode=BranchMode.FORK,
            )
            for i in range(2)
        )
        for producer, credit in await holder.credits(2):
            holder.complete(producer, credit)
            # Sessions belong to their producer: the release names it (PROTOCOL.md §5.3).
            holder.send(ChildRelease(x_correlation_id=credit.x_correlation_id, producer=producer))
        await asyncio.wait_for(asyncio.gather(*kids), 3)
        await asyncio.sleep(0.05)
        assert router.core.sessions.live == 0
    a.send(Goodbye(reason="done"))
    await asyncio.sleep(0.1)
    assert "a" not in router.core.workers
    a.close()
    b.close()


async def _first_credit(*workers: ScriptedWorker):
    while True:
        for w in workers:
            try:
                return w, (await w.credits(1, within_s=0.05))[0]
            except TimeoutError:
                continue


async def test_producer_of_another_version_is_refused(router: RouterService, ctx) -> None:
    got: list[bytes] = []
    sock = DealerSocket(ctx, router.producer_endpoint, b"old/1", got.extend)
    sock.attach(asyncio.get_running_loop())
    hello = encode(ProducerHello(producer="old", protocol_version=7, incarnation="1"))
    for _ in range(300):
        if got:
            break
        sock.send(hello)  # IMMEDIATE: not queued until connected, so retry
        await asyncio.sleep(0.01)
    refusal = decode_router_to_producer(got[0])
    assert isinstance(refusal, Refusal)
    assert "7" in refusal.reason
    assert str(PROTOCOL_VERSION) in refusal.reason
    sock.close()


async def test_client_raises_on_refusal(router: RouterService, ctx) -> None:
    client = RouterClient(router.producer_endpoint, context=ctx, protocol_version=7)
    with pytest.raises(ProducerRefusedError, match="7"):
        await client.connect(timeout_s=3)


async def test_http_endpoints_and_metrics(ctx) -> None:
    import aiohttp

    core = RouterCore(protocol_version=PROTOCOL_VERSION, router_incarnation="r9")
    service = RouterService(
        core,
        worker_endpoint="tcp://127.0.0.1:0",
        producer_endpoint="tcp://127.0.0.1:0",
        http_port=0,
        drain_deadline_s=0.5,
    )
    task = asyncio.create_task(service.serve())
    await asyncio.wait_for(service.ready.wait(), 5)
    base = f"http://127.0.0.1:{service.http.port}"
    worker = ScriptedWorker(ctx, service.worker_endpoint, "w1")
    await worker.hello(capacity=4)
    async with RouterClient(service.producer_endpoint, context=ctx) as client:
        future = await client.submit(Credit(id=1, x_correlation_id="s", num_turns=2))
        ((producer, credit),) = await worker.credits(1)
        worker.complete(producer, credit)
        await asyncio.wait_for(future, 3)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/livez") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200
        async with http.get(f"{base}/status") as r:
            doc = await r.json()
        assert doc["router"]["incarnation"] == "r9"
        assert doc["totals"]["sessions"] == 1
        assert doc["workers"][0]["name"] == "w1"
        assert doc["workers"][0]["capacity"] == 4
        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
    table = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "credit_router", "status", "--url", base],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert "WORKER" in table.stdout
    assert table.stdout.splitlines()[-1].split()[:6] == ["w1", "active", "?", "-", "0", "4"]
    assert "completed 1" in table.stdout
    assert 'credit_router_credit_outcomes_total{reason="none",status="completed"} 1.0' in text
    assert "credit_router_sticky_entries 1.0" in text
    assert 'credit_router_workers{state="active"} 1.0' in text
    assert "credit_router_submit_to_dispatch_seconds_count 1.0" in text
    assert 'credit_router_worker_dispatched_total{worker="w1"} 1.0' in text
    assert 'credit_router_worker_outcomes_total{status="completed",worker="w1"} 1.0' in text
    assert "process_cpu_seconds_total" in text
    # No per-session or per-credit label anywhere in the exposition.
    labels = {
        kv.split("=")[0]
        for line in text.splitlines()
        if "{" in line
        for kv in line.split("{", 1)[1].split("}")[0].split(",")
        if kv
    }
    assert labels <= {
        "status",
        "reason",
        "state",
        "worker",
        "executor",
        "endpoint",
        "le",
        "version",
        "incarnation",
    }
    service.request_exit()
    service.draining = True
    async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as r:
        assert r.status == 503
    await asyncio.wait_for(task, 5)
    worker.close()


async def test_a_silent_worker_is_logged_suspect_once_then_answering_again(
    ctx: zmq.Context, caplog: pytest.LogCaptureFixture
) -> None:
    """A newcomer saw a frozen worker only when it was lost: the router now warns when the
    silence makes it suspect (once, not every tick), and says when it answers again."""
    core = RouterCore(
        protocol_version=PROTOCOL_VERSION,
        router_incarnation="r1",
        heartbeat_interval_s=0.05,  # suspect after 3 beats of silence...
        lost_after_s=60.0,  # ... and not lost while the test runs
    )
    service = RouterService(
        core,
        worker_endpoint="tcp://127.0.0.1:0",
        producer_endpoint="tcp://127.0.0.1:0",
        heartbeat_interval_s=0.05,
    )
    task = asyncio.create_task(service.serve())
    caplog.set_level("INFO", logger="router_service.service")
    worker = None
    try:
        await asyncio.wait_for(service.ready.wait(), 5)
        worker = ScriptedWorker(ctx, service.worker_endpoint, "frozen")
        assert isinstance(await worker.hello(), Welcome)

        def lines(text: str) -> list[str]:
            return [r.getMessage() for r in caplog.records if text in r.getMessage()]

        async def logged(text: str) -> None:
            async with asyncio.timeout(10):
                while True:
                    if lines(text):
                        return
                    await asyncio.sleep(0.02)

        await logged("worker suspect name=frozen")
        await asyncio.sleep(0.3)  # many ticks later: still one line
        (suspect,) = lines("worker suspect name=frozen")
        assert "gets no new credits" in suspect
        assert "lost at 60.0 s" in suspect
        assert [r.levelname for r in caplog.records if "suspect" in r.getMessage()] == ["WARNING"]
        worker.send(Heartbeat())
        await logged("worker answered again name=frozen")
        # (Not its state now: silent again for 3 beats, it is suspect again, and logged again.)
        (answered,) = lines("worker answered again name=frozen")
        assert "s of silence" in answered
    finally:
        if worker is not None:
            worker.sock.close(0)
        service.request_exit(force=True)
        await asyncio.wait_for(task, 5)
