"""A live router with steady traffic, for tests that watch it from outside (Prometheus, promtool).

``TrafficHarness`` runs, on its own event loop in a background thread, a ``RouterService`` with
its HTTP endpoints, two worker stand-ins and one ``RouterClient`` producer. The workers are raw
DEALER sockets in the manner of ``tests/router_service/test_service.py``'s ``ScriptedWorker``
(not the worker agent), answering every credit after a short delay: most complete, one in ten
fails. Each producer "session" runs three turns in a row, so sticky entries come and go. One
worker also sends one undecodable frame at start, so ``credit_router_invalid_messages_total``
has a series, and another whenever ``send_invalid()`` asks. The traffic is bounded: a fixed
number of sessions at a time, until ``stop()``.

Running on a thread keeps the module-scoped fixtures simple: tests are plain synchronous code
polling HTTP APIs with deadlines, while the router keeps serving between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import uuid
from typing import Final

import uvloop
import zmq
import zmq.asyncio

from protocol import PROTOCOL_VERSION
from protocol.codec import decode_router_to_worker, encode
from protocol.messages import (
    Completion,
    CompletionBatch,
    Credit,
    Dispatch,
    DispatchBatch,
    Heartbeat,
    Hello,
    Status,
    Welcome,
)
from router_service.client import RouterClient
from router_service.core.router import RouterCore
from router_service.service import RouterService
from worker_agent.agent import AgentState, WorkerAgent
from worker_agent.executor import SimExecutor
from worker_agent.web import WorkerHttp

WORK_S: Final = 0.04
"""How long a stand-in worker 'runs' each credit (so some are always in flight)."""
BEAT_S: Final = 0.2
INVALID_FRAME: Final = b"\xc1 not msgpack"


class TrafficHarness:
    """A router under steady load in a background thread; ``start()``, then ``stop()``.

    Args:
        workers: names of the worker stand-ins.
        capacity: credits each worker declares it can run at once.
        sessions: producer sessions kept running at once (each three turns long).
    """

    def __init__(
        self,
        workers: tuple[str, ...] = ("w1", "w2"),
        capacity: int = 8,
        sessions: int = 6,
        agents: tuple[str, ...] = (),
    ) -> None:
        self.worker_names = workers
        self.agent_names = agents
        """Real worker agents (``SimExecutor``) with their HTTP endpoints, besides the stand-ins."""
        self.agent_http_ports: list[int] = []
        self.capacity = capacity
        self.sessions = sessions
        self.http_port = 0
        self.outcomes: dict[str, int] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic-harness", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._garbage: list[zmq.asyncio.Socket] = []

    # ------------------------------------------------------------------ test side

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the thread and wait until the router serves and both workers joined."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"traffic harness not ready within {timeout_s} s")
        self.check()

    def check(self) -> None:
        """Raise what the background thread failed with, if anything."""
        if self._error is not None:
            raise RuntimeError("traffic harness failed") from self._error

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the traffic, drain the router, close everything; raise a background failure."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"traffic harness did not stop within {timeout_s} s")
        self.check()

    def send_invalid(self) -> None:
        """Have the last worker send one undecodable frame now (from the harness thread)."""
        assert self._loop is not None
        assert self._garbage
        sock = self._garbage[0]
        self._loop.call_soon_threadsafe(lambda: sock.send(INVALID_FRAME))

    @property
    def base_url(self) -> str:
        """Where the router's HTTP endpoints are."""
        return f"http://127.0.0.1:{self.http_port}"

    # ------------------------------------------------------------- harness thread

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        core = RouterCore(
            protocol_version=PROTOCOL_VERSION,
            router_incarnation=f"itest-{uuid.uuid4().hex[:8]}",
            heartbeat_interval_s=BEAT_S,
            lost_after_s=5.0,
        )
        service = RouterService(
            core,
            worker_endpoint="tcp://127.0.0.1:0",
            producer_endpoint="tcp://127.0.0.1:0",
            heartbeat_interval_s=BEAT_S,
            drain_deadline_s=1.0,
            http_port=0,
        )
        serving = asyncio.create_task(service.serve(), name="router")
        await asyncio.wait_for(service.ready.wait(), 5)
        assert service.http is not None
        self.http_port = service.http.port
        ctx = zmq.asyncio.Context()
        workers_done = asyncio.Event()
        try:
            joined = [asyncio.Event() for _ in self.worker_names]
            workers = [
                asyncio.create_task(
                    self._worker(ctx, service.worker_endpoint, name, joined[i], workers_done),
                    name=f"worker-{name}",
                )
                for i, name in enumerate(self.worker_names)
            ]
            await asyncio.wait_for(asyncio.gather(*(j.wait() for j in joined)), 5)
            agents = await self._start_agents(service.worker_endpoint)
            async with RouterClient(service.producer_endpoint, name="itest") as client:
                self._ready.set()
                await self._produce(client)
            for agent, _, _ in agents:
                agent.drain(1.0)
            for _, task, http in agents:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 5)
                await http.stop()
            service.request_exit()
            await asyncio.wait_for(serving, 10)
            workers_done.set()
            await asyncio.wait_for(asyncio.gather(*workers), 5)
        finally:
            workers_done.set()
            if not serving.done():
                service.request_exit(force=True)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(serving, 5)
            ctx.destroy(linger=0)

    async def _start_agents(
        self, endpoint: str
    ) -> list[tuple[WorkerAgent, asyncio.Task[object], WorkerHttp]]:
        """Start the real agents with their HTTP endpoints; return once each has joined."""
        started = []
        for name in self.agent_names:
            agent = WorkerAgent(
                router=endpoint,
                name=name,
                executor=SimExecutor(base_ttft_s=0.005, decode_s_per_token=0.0002),
                capacity=self.capacity,
                labels={"endpoint": "-"},
            )
            http = WorkerHttp(agent, "127.0.0.1", 0)
            await http.start()
            self.agent_http_ports.append(http.port)
            task: asyncio.Task[object] = asyncio.create_task(agent.serve(), name=f"agent-{name}")
            started.append((agent, task, http))
        for agent, task, _ in started:
            for _ in range(100):
                if agent.state is AgentState.JOINED or task.done():
                    break
                await asyncio.sleep(0.05)
            assert agent.state is AgentState.JOINED, f"agent {agent.name} did not join"
        return started

    async def _produce(self, client: RouterClient) -> None:
        assert self._stop is not None
        ids = itertools.count(1)
        session_no = itertools.count(1)

        async def session() -> None:
            assert self._stop is not None
            while not self._stop.is_set():
                name = f"s{next(session_no)}"
                for turn in range(3):
                    credit = Credit(
                        id=next(ids), x_correlation_id=name, turn_index=turn, num_turns=3
                    )
                    outcome = await client.run(credit)
                    key = outcome.status.value
                    self.outcomes[key] = self.outcomes.get(key, 0) + 1

        tasks = [asyncio.create_task(session()) for _ in range(self.sessions)]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _worker(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        name: str,
        joined: asyncio.Event,
        done: asyncio.Event,
    ) -> None:
        worker = StandInWorker(ctx, endpoint, name, self.capacity)
        try:
            await worker.hello()
            if name == self.worker_names[-1]:
                self._garbage.append(worker.sock)
                await worker.sock.send(INVALID_FRAME)  # counted by the router, which stays up
            await worker.serve(joined, done)
        finally:
            worker.close()


class StandInWorker:
    """A DEALER playing a worker: hello, beats, and each credit answered ``WORK_S`` later.

    One credit in ten fails (``upstream_503``), so outcomes have two statuses.
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.connect(endpoint)
        self._seq = itertools.count(1)
        self._count = itertools.count()
        self._pending: set[asyncio.TimerHandle] = set()

    async def hello(self) -> None:
        hello = Hello(
            name=self.name,
            incarnation=uuid.uuid4().hex[:8],
            protocol_version=PROTOCOL_VERSION,
            capacity=self.capacity,
        )
        await self.sock.send(encode(hello))

    async def serve(self, joined: asyncio.Event, done: asyncio.Event) -> None:
        """Answer the router until ``done``; set ``joined`` on the welcome."""
        loop = asyncio.get_running_loop()
        last_beat = loop.time()
        while not done.is_set():
            try:
                frame = await asyncio.wait_for(self.sock.recv(), BEAT_S / 2)
            except TimeoutError:
                frame = None
            if frame is not None:
                match decode_router_to_worker(frame):
                    case Welcome():
                        joined.set()
                    case Dispatch(producer=producer, credit=credit):
                        self._later(loop, producer, credit)
                    case DispatchBatch(producer=producer, credits=credits):
                        for credit in credits:
                            self._later(loop, producer, credit)
                    case _:
                        pass
            if loop.time() - last_beat >= BEAT_S:
                last_beat = loop.time()
                await self.sock.send(encode(Heartbeat(sent_at_s=last_beat)))

    def close(self) -> None:
        for handle in self._pending:
            handle.cancel()
        self.sock.close(linger=0)

    def _later(self, loop: asyncio.AbstractEventLoop, producer: str, credit: Credit) -> None:
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._pending.discard(handle)
            self._complete(producer, credit)

        handle = loop.call_later(WORK_S, fire)
        self._pending.add(handle)

    def _complete(self, producer: str, credit: Credit) -> None:
        failed = next(self._count) % 10 == 9
        done = Completion(
            seq=next(self._seq),
            producer=producer,
            credit_id=credit.id,
            status=Status.FAILED if failed else Status.COMPLETED,
            reason="upstream_503" if failed else "",
            duration_s=WORK_S,
            session_ended=credit.turn_index == credit.num_turns - 1,
        )
        self.sock.send(encode(CompletionBatch(completions=[done])))
