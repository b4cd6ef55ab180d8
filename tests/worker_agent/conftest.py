"""Fixtures for the worker agent's tests: a real ZeroMQ ROUTER that plays the router.

``FakeRouter`` binds a ROUTER on ``tcp://127.0.0.1`` (a random port, ``linger=0``) and speaks
the worker conversation by hand, through the real codec; ``start_agent`` runs a ``WorkerAgent``
against it on the test's loop, with back-offs short enough for tests, and always stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import pytest
import zmq
import zmq.asyncio

from protocol.codec import decode_worker_to_router, encode
from protocol.messages import (
    Credit,
    FirstToken,
    Heartbeat,
    Hello,
    InFlightReport,
    RouterToWorker,
    Welcome,
    WorkerToRouter,
)
from worker_agent.agent import WorkerAgent
from worker_agent.executor import SimExecutor

T = TypeVar("T")

BORING: tuple[type, ...] = (Heartbeat, InFlightReport, FirstToken, Hello)
# (Hello: a worker resends it until a Welcome comes, so a slow test may see two.)
"""Messages ``FakeRouter.expect`` skips unless asked for."""


def payload(input_tokens: int, output_tokens: int) -> bytes:
    """A simulator payload (msgpack map)."""
    return msgspec.msgpack.encode({"input_tokens": input_tokens, "output_tokens": output_tokens})


def credit(credit_id: int, session: str | None = None, **fields: Any) -> Credit:
    """A credit with defaults (single-turn root session named after the id)."""
    return Credit(id=credit_id, x_correlation_id=session or f"s-{credit_id}", **fields)


class FakeRouter:
    """A ROUTER socket and a log of everything the worker sent it."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.identity: bytes | None = None
        self.received: list[WorkerToRouter] = []

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    async def recv(self, within_s: float = 3.0) -> WorkerToRouter:
        identity, frame = await asyncio.wait_for(self.sock.recv_multipart(), within_s)
        self.identity = identity
        msg = decode_worker_to_router(frame)
        self.received.append(msg)
        return msg

    async def expect(
        self, kind: type[T], *, within_s: float = 3.0, skip: tuple[type, ...] = BORING
    ) -> T:
        """The next message of type ``kind``, skipping ``skip``; anything else fails the test."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            msg = await self.recv(max(0.01, deadline - loop.time()))
            if isinstance(msg, kind):
                return msg
            if not isinstance(msg, skip):
                raise AssertionError(f"expected {kind.__name__}, got {msg!r}")

    async def collect(self, seconds: float) -> list[WorkerToRouter]:
        """Everything that arrives within ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        out: list[WorkerToRouter] = []
        while (left := deadline - loop.time()) > 0:
            try:
                out.append(await self.recv(left))
            except TimeoutError:
                break
        return out

    async def send(self, msg: RouterToWorker | bytes) -> None:
        assert self.identity is not None, "no worker has spoken yet"
        frame = msg if isinstance(msg, bytes) else encode(msg)
        await self.sock.send_multipart([self.identity, frame])

    async def welcome(
        self, incarnation: str = "r-1", heartbeat_s: float = 1.0, report_s: float = 1.0
    ) -> Hello:
        """Wait for a ``Hello`` and answer it with a ``Welcome``."""
        hello = await self.expect(Hello)
        await self.send_welcome(incarnation, heartbeat_s, report_s)
        return hello

    async def send_welcome(
        self, incarnation: str = "r-1", heartbeat_s: float = 1.0, report_s: float = 1.0
    ) -> None:
        await self.send(
            Welcome(
                router_incarnation=incarnation,
                protocol_version=1,
                heartbeat_interval_s=heartbeat_s,
                inflight_report_interval_s=report_s,
            )
        )


@dataclass
class Running:
    """An agent serving on the test's loop."""

    agent: WorkerAgent
    task: asyncio.Task[Any]

    async def result(self, within_s: float = 3.0) -> Any:
        return await asyncio.wait_for(asyncio.shield(self.task), within_s)


@pytest.fixture
async def router() -> AsyncIterator[FakeRouter]:
    fake = FakeRouter()
    try:
        yield fake
    finally:
        fake.close()


StartAgent = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_agent(router: FakeRouter) -> AsyncIterator[StartAgent]:
    started: list[Running] = []

    async def start(**kwargs: Any) -> Running:
        kwargs.setdefault("executor", SimExecutor(zero_latency=True))
        kwargs.setdefault("name", "w1")
        kwargs.setdefault("capacity", 8)
        kwargs.setdefault("rehello_initial_s", 0.05)
        kwargs.setdefault("rehello_max_s", 0.2)
        kwargs.setdefault("settle_timeout_s", 0.2)
        agent = WorkerAgent(router=router.endpoint, **kwargs)
        running = Running(agent, asyncio.create_task(agent.serve()))
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.task.done():
            running.agent.force_exit()
        with contextlib.suppress(Exception, asyncio.CancelledError):  # the test judged it
            await asyncio.wait_for(running.task, 3.0)


class GateExecutor:
    """An executor each of whose credits runs until the test opens its gate.

    It records the history each credit saw, and fails credits whose payload is ``b"fail"``.
    """

    kind = "gate"

    def __init__(self, first_token_s: float | None = 0.001) -> None:
        self.first_token_s = first_token_s
        self.gates: dict[int, asyncio.Event] = {}
        self.seen: dict[int, list[Any]] = {}
        self.started: list[int] = []
        self.cancelled: list[int] = []

    def gate(self, credit_id: int) -> asyncio.Event:
        return self.gates.setdefault(credit_id, asyncio.Event())

    def release(self, *credit_ids: int) -> None:
        for credit_id in credit_ids:
            self.gate(credit_id).set()

    def execute_nowait(self, credit: Credit, session: Any) -> None:
        return None

    async def execute(self, credit: Credit, session: Any, on_first_token: Any) -> Any:
        from protocol.messages import Status
        from worker_agent.core import Turn
        from worker_agent.executor import ExecResult

        self.seen[credit.id] = list(session.history)
        self.started.append(credit.id)
        if credit.payload == b"fail":
            raise RuntimeError("boom")
        if self.first_token_s is not None:
            on_first_token(self.first_token_s)
        try:
            await self.gate(credit.id).wait()
        except asyncio.CancelledError:
            self.cancelled.append(credit.id)
            raise
        return ExecResult(Status.COMPLETED, result=b"ok", turn=Turn(10, 5))

    async def aclose(self) -> None:
        return None


async def until(predicate: Callable[[], bool], within_s: float = 2.0) -> None:
    """Poll ``predicate`` until it holds (fails the test after ``within_s``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
