"""The pair tier: the real router service, worker agents and producer clients, in one process.

Everything the product runs is here — ``RouterService`` around a real ``RouterCore``,
``WorkerAgent`` with its real DEALER transport, ``RouterClient`` — wired over ``ipc://``
sockets in a temporary directory, on the test's event loop, with short heartbeats. A test can
crash the router (its sockets vanish, nothing is drained: a kill -9 as the peers see it), stop
it gracefully (SIGTERM's path), start a new incarnation on the same endpoints, restart
workers and producers, and hold or release each credit's execution. Nothing is mocked; only
processes are folded into one (the real-process tier in ``tests/integration`` covers those).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from protocol import PROTOCOL_VERSION
from protocol.codec import encode
from protocol.messages import Credit, Outcome, Status
from router_service.client import RouterClient
from router_service.core.router import RouterCore
from router_service.service import RouterService
from router_service.transport import TransportError
from worker_agent.agent import WorkerAgent
from worker_agent.core import Turn
from worker_agent.executor import ExecResult

HEARTBEAT_S = 0.05
"""Router beat (and so, through the welcome, the peers'): silence is judged in 0.15 s."""


@dataclass
class Ran:
    """One execution of a credit on a worker."""

    worker: str
    producer: str
    credit_id: int
    session: str
    turn_index: int
    history: int
    """Turns in the session's history when it started (0: a fresh context)."""


class HoldExecutor:
    """Runs each credit for ``delay_s`` (or until released, when ``hold`` is set), recording
    where it ran and how much history it saw. Shared by every worker of a rig."""

    kind = "hold"

    def __init__(self, worker: str, log: list[Ran], delay_s: float, hold: bool) -> None:
        self.worker = worker
        self.log = log
        self.delay_s = delay_s
        self.hold = hold
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []

    def release(self, *credit_ids: int) -> None:
        for cid in credit_ids:
            self.gates.setdefault(cid, asyncio.Event()).set()

    def execute_nowait(self, credit: Credit, session: Any) -> ExecResult | None:
        return None

    async def execute(self, credit: Credit, session: Any, on_first_token: Any) -> ExecResult:
        self.log.append(
            Ran(
                self.worker,
                session.producer,
                credit.id,
                credit.x_correlation_id,
                credit.turn_index,
                len(session.history),
            )
        )
        self.started.append(credit.id)
        on_first_token(0.001)
        if self.hold:
            await self.gates.setdefault(credit.id, asyncio.Event()).wait()
        else:
            await asyncio.sleep(self.delay_s)
        return ExecResult(Status.COMPLETED, result=b"ok", turn=Turn(10, 5))

    async def aclose(self) -> None:
        return None


@dataclass
class Worker:
    name: str
    agent: WorkerAgent
    task: asyncio.Task[Any]
    executor: HoldExecutor


@dataclass
class Producer:
    """A client and every outcome it received, per credit id (to count them)."""

    client: RouterClient
    outcomes: dict[int, list[Outcome]] = field(default_factory=dict)
    futures: dict[int, asyncio.Future[Outcome]] = field(default_factory=dict)
    _reader: asyncio.Task[None] | None = None

    async def submit(self, credit: Credit) -> asyncio.Future[Outcome]:
        future = await self.client.submit(credit)
        self.futures[credit.id] = future
        return future

    async def all_done(self, timeout_s: float = 10.0) -> list[Outcome]:
        """Every submitted credit's outcome (fails if one hangs)."""
        async with asyncio.timeout(timeout_s):
            return [await f for f in self.futures.values()]

    def counts(self) -> Counter[int]:
        return Counter({cid: len(v) for cid, v in self.outcomes.items()})


class Rig:
    """Router, workers and producers of one test (see the module docstring)."""

    def __init__(self, tmp_path: Path, *, hold: bool = False, delay_s: float = 0.01) -> None:
        self.dir = tmp_path
        self.worker_endpoint = f"ipc://{tmp_path}/w.ipc"
        self.producer_endpoint = f"ipc://{tmp_path}/p.ipc"
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.router: RouterService | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.incarnations = (f"r{i}" for i in itertools.count())
        self.workers: dict[str, Worker] = {}
        self.retired: list[Worker] = []
        self.producers: list[Producer] = []
        self.ran: list[Ran] = []
        self.hold = hold
        self.delay_s = delay_s
        self.core_kwargs: dict[str, Any] = {}

    # ------------------------------------------------------------------ router

    async def start_router(self, **core_kwargs: Any) -> RouterService:
        kwargs = {
            "heartbeat_interval_s": HEARTBEAT_S,
            "lost_after_s": 0.5,
            "inflight_report_interval_s": 0.2,
            **self.core_kwargs,
            **core_kwargs,
        }
        core = RouterCore(
            protocol_version=PROTOCOL_VERSION, router_incarnation=next(self.incarnations), **kwargs
        )
        router = RouterService(
            core,
            worker_endpoint=self.worker_endpoint,
            producer_endpoint=self.producer_endpoint,
            heartbeat_interval_s=HEARTBEAT_S,
            drain_deadline_s=0.3,
            producer_timeout_s=5.0,
            context=self.ctx,
        )
        # The previous router's listeners close on libzmq's I/O thread, a moment after its
        # sockets do (a dead process's close at once): wait for that, then bind.
        for _ in range(200):
            try:
                router.startup()
                break
            except TransportError as exc:
                if "another process" not in str(exc):
                    raise
                await asyncio.sleep(0.005)
        else:
            router.startup()
        self.router = router
        self._loop_task = asyncio.create_task(router.main_loop())
        return router

    async def crash_router(self) -> None:
        """The router process dies (kill -9): no drain, no goodbye, sockets gone."""
        router = self.router
        assert router is not None
        assert self._loop_task is not None
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        for sock in (router._workers_sock, router._producers_sock):
            if sock is not None:
                sock._sock.setsockopt(zmq.LINGER, 0)
                sock.close()
        router._workers_sock = router._producers_sock = None
        self.router = None

    async def stop_router(self) -> None:
        """SIGTERM: drain until the deadline, end what is left, tell the workers, close."""
        router = self.router
        assert router is not None
        assert self._loop_task is not None
        router.request_exit()
        await self._loop_task
        await router.shutdown()
        self.router = None

    # ----------------------------------------------------------------- workers

    async def start_worker(
        self, name: str, *, capacity: int = 4, incarnation: str | None = None, **kwargs: Any
    ) -> Worker:
        executor = HoldExecutor(name, self.ran, self.delay_s, self.hold)
        agent = WorkerAgent(
            router=self.worker_endpoint,
            name=name,
            executor=executor,
            capacity=capacity,
            incarnation=incarnation,
            settle_timeout_s=0.1,
            drain_deadline_s=kwargs.pop("drain_deadline_s", 0.5),
            **kwargs,
        )
        worker = Worker(name, agent, asyncio.create_task(agent.serve()), executor)
        if name in self.workers:
            self.retired.append(self.workers[name])
        self.workers[name] = worker
        return worker

    async def joined(self, *names: str, timeout_s: float = 5.0) -> None:
        """Wait until the router has admitted these workers (or all)."""
        wanted = set(names or self.workers)
        async with asyncio.timeout(timeout_s):
            while True:
                router = self.router
                if router is not None and wanted <= set(router.core.workers):
                    agents = [self.workers[n].agent for n in wanted]
                    if all(a.router_incarnation == router.core.router_incarnation for a in agents):
                        return
                await asyncio.sleep(0.005)

    async def kill_worker(self, name: str) -> None:
        """The worker process dies: its socket closes, nothing is said."""
        worker = self.workers[name]
        transport = worker.agent._transport
        sock = getattr(transport, "_sock", None)
        if transport is not None and sock is not None:
            # The socket goes first, abruptly (no linger): nothing the dying agent does after
            # this — cancelling, flushing, saying goodbye — reaches the router.
            watch = transport._watch  # type: ignore[attr-defined]
            if watch is not None:
                watch.close()
                transport._watch = None  # type: ignore[attr-defined]
            transport._loop.remove_reader(transport._fd)  # type: ignore[attr-defined]
            transport._sock = None  # type: ignore[attr-defined]
            sock.close(linger=0)
            transport._ctx.term()  # type: ignore[attr-defined]
        worker.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker.task

    # --------------------------------------------------------------- producers

    async def producer(self, name: str = "p", **kwargs: Any) -> Producer:
        client = RouterClient(
            self.producer_endpoint,
            name=name,
            context=self.ctx,
            recovery_grace_s=kwargs.pop("recovery_grace_s", 1.0),
            **kwargs,
        )
        await client.connect(timeout_s=5.0)
        producer = Producer(client)
        producer._reader = asyncio.create_task(self._read(producer))
        self.producers.append(producer)
        return producer

    @staticmethod
    async def _read(producer: Producer) -> None:
        async for outcome in producer.client.stream():
            producer.outcomes.setdefault(outcome.credit_id, []).append(outcome)

    # ------------------------------------------------------------------ checks

    def ran_elsewhere(self) -> list[Ran]:
        """Non-first turns and FORK children that ran without the history they needed
        (invariant 8): they started with an empty history."""
        return [r for r in self.ran if r.turn_index > 0 and r.history == 0]

    async def close(self) -> None:
        for producer in self.producers:
            if producer._reader is not None:
                producer._reader.cancel()
            await producer.client.close()
        for worker in [*self.workers.values(), *self.retired]:
            if not worker.task.done():
                worker.agent.force_exit()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(worker.task, 3.0)
        if self.router is not None:
            self.router.force_exit = True
            await self.stop_router()
        # destroy, not term: a test that failed half-way may leave a scripted socket open.
        self.ctx.destroy(linger=0)


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    """Wait until ``condition()`` holds (polled; fails the test after ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def credits(ids: Iterable[int], session: str | None = None, **kwargs: Any) -> list[Credit]:
    """Single-turn credits (or turns of ``session``), one per id."""
    return [Credit(id=i, x_correlation_id=session or f"s{i}", **kwargs) for i in ids]


def quiet_logs() -> None:
    for name in ("router_service", "worker_agent", "credit_common"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Scripted:
    """A raw DEALER with a chosen routing id, driven frame by frame (a peer whose every move
    the test decides: a stale process, a third-party producer)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: bytes) -> None:
        self.identity = identity
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.connect(endpoint)
        self.seq = 0

    def send(self, msg: object) -> None:
        self.sock.send(encode(msg))

    async def recv(self, decode: Any, within_s: float = 3.0) -> object:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while loop.time() < deadline:
            try:
                return decode(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                await asyncio.sleep(0.002)
        raise TimeoutError(f"{self.identity!r} got nothing in {within_s} s")

    async def expect(self, decode: Any, kind: Any, within_s: float = 3.0) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            msg = await self.recv(decode, max(0.01, deadline - loop.time()))
            if isinstance(msg, kind):
                return msg

    def close(self) -> None:
        self.sock.close(0)
