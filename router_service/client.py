"""RouterClient: the async producer API — submit credits, await exactly one outcome each.

Usage::

    async with RouterClient("ipc:///tmp/credit-router.sock", name="bench") as client:
        done = await client.submit(Credit(id=1, x_correlation_id="s1", num_turns=2))
        outcome = await done

Credits submitted in one loop iteration leave as one ``SubmitBatch`` frame. ``submit`` waits
while ``max_outstanding`` credits have no outcome yet (back-pressure). The client beats every
``heartbeat_interval_s``; if the router falls silent it says hello again until a router answers.
A router with a new incarnation has restarted and lost its queue: credits running on workers
still come back (workers send their completions as ``Recovered``), and whatever has no outcome
``recovery_grace_s`` later ends locally as ``lost: router_restarted`` — never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType

import zmq

from protocol import PROTOCOL_VERSION
from protocol.codec import decode_router_to_producer, encode
from protocol.errors import DecodeError
from protocol.messages import (
    CancelCredits,
    Credit,
    EndSession,
    ErrorReport,
    Heartbeat,
    Outcome,
    OutcomeBatch,
    ProducerFirstToken,
    ProducerHello,
    ProducerWelcome,
    Refusal,
    ReleaseReservation,
    Status,
    SubmitBatch,
)
from router_service.transport import DealerSocket

__all__ = ["ProducerRefusedError", "RouterClient"]

logger = logging.getLogger(__name__)


class ProducerRefusedError(Exception):
    """The router refused this producer (e.g. another protocol version)."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        super().__init__(refusal.reason)


class RouterClient:
    """A producer connection to a credit router.

    Args:
        endpoint: the router's producer endpoint.
        name: this producer's name; its credit keys are ``(name/incarnation, id)``.
        max_outstanding: credits that may await an outcome at once (``submit`` waits beyond).
        heartbeat_interval_s: how often to beat (the router's welcome may say otherwise).
        recovery_grace_s: after a router restart, how long to wait for recovered outcomes.
        on_first_token: called with ``(credit_id, ttft_s)`` when a worker saw the first token.
        context: the process's ZeroMQ context (one is created if omitted).
        protocol_version: the version to announce (only tests speak another one).
        curve: ``(router public, own public, own secret)`` Z85 keys when the router's producer
            endpoint is TCP with CURVE; the key's name in its allowlist must be ``name``.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        name: str = "producer",
        max_outstanding: int = 65_536,
        heartbeat_interval_s: float = 1.0,
        recovery_grace_s: float = 30.0,
        on_first_token: Callable[[int, float], None] | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        protocol_version: int = PROTOCOL_VERSION,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.protocol_version = protocol_version
        self._curve = curve
        self.name = name
        self.incarnation = uuid.uuid4().hex[:12]
        self.key = f"{name}/{self.incarnation}"
        self.heartbeat_interval_s = heartbeat_interval_s
        self.recovery_grace_s = recovery_grace_s
        self.on_first_token = on_first_token
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.Context()
        self._sock: DealerSocket | None = None
        self._futures: dict[int, asyncio.Future[Outcome]] = {}
        self._slots = asyncio.Semaphore(max_outstanding)
        self._pending: list[Credit] = []
        self._unsent: deque[bytes] = deque()
        self._flush_scheduled = False
        self._streams: list[asyncio.Queue[Outcome]] = []
        self._welcome: asyncio.Future[ProducerWelcome] | None = None
        self._router_incarnation: str | None = None
        self._last_heard = 0.0
        self._max_batch = 1_024
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.unmatched_outcomes = 0
        """Outcomes for credits this client was not waiting for (e.g. recovered twice)."""
        self.errors: list[ErrorReport] = []
        """Error reports the router sent (kept for inspection; also logged)."""

    # ----------------------------------------------------------------- life cycle

    async def __aenter__(self) -> RouterClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and wait for the router's welcome. Raises ``TimeoutError`` or refusal."""
        loop = asyncio.get_running_loop()
        self._sock = DealerSocket(
            self._ctx, self.endpoint, self.key.encode(), self._on_frames, curve=self._curve
        )
        self._sock.attach(loop)
        try:
            await self._handshake(timeout_s)
        except BaseException:
            await self.close()
            raise
        self._task = asyncio.create_task(self._beat(), name=f"producer-{self.key}-beat")

    async def _handshake(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._welcome = loop.create_future()
        hello = encode(
            ProducerHello(
                producer=self.name,
                protocol_version=self.protocol_version,
                incarnation=self.incarnation,
            )
        )
        deadline = loop.time() + timeout_s
        delay = 0.05
        while not self._welcome.done():
            assert self._sock is not None
            self._sock.send(hello)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no router answered at {self.endpoint} in {timeout_s:.1f} s")
            await asyncio.wait({self._welcome}, timeout=min(delay, remaining))
            delay = min(delay * 2, 1.0)
        self._on_welcome(self._welcome.result())

    def _on_welcome(self, welcome: ProducerWelcome) -> None:
        previous = self._router_incarnation
        self._router_incarnation = welcome.router_incarnation
        self._max_batch = welcome.max_batch
        self.heartbeat_interval_s = welcome.heartbeat_interval_s
        self._last_heard = asyncio.get_running_loop().time()
        if previous is not None and previous != welcome.router_incarnation:
            logger.warning(
                "router restarted (incarnation %s -> %s): %d credits await recovery",
                previous,
                welcome.router_incarnation,
                len(self._futures),
            )
            waiting = list(self._futures)
            asyncio.get_running_loop().call_later(self.recovery_grace_s, self._give_up, waiting)
        self._retry_unsent()

    def _give_up(self, credit_ids: list[int]) -> None:
        for cid in credit_ids:
            if cid in self._futures:
                self._resolve(Outcome(credit_id=cid, status=Status.LOST, reason="router_restarted"))

    async def close(self) -> None:
        """Stop beating and close the socket. Credits still awaited stay unresolved."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            self._sock.close()
        if self._own_context:
            self._ctx.term()

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        beat = encode(Heartbeat())
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            assert self._sock is not None
            if loop.time() - self._last_heard > 3 * self.heartbeat_interval_s:
                logger.warning("router silent at %s; saying hello again", self.endpoint)
                try:
                    await self._handshake(timeout_s=3600.0)
                except ProducerRefusedError:
                    logger.error("router refused this producer after a reconnect")
                    return
                continue
            self._sock.send(beat)
            self._retry_unsent()

    # ------------------------------------------------------------------- credits

    @property
    def outstanding(self) -> int:
        """Credits submitted and awaiting their outcome."""
        return len(self._futures)

    async def submit(self, credit: Credit) -> asyncio.Future[Outcome]:
        """Submit one credit; returns the future of its one outcome. Waits under back-pressure."""
        await self._slots.acquire()
        if credit.id in self._futures:
            self._slots.release()
            raise ValueError(f"credit id {credit.id} is already awaiting its outcome")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._futures[credit.id] = future
        self._pending.append(credit)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    async def submit_many(self, credits: Iterable[Credit]) -> list[asyncio.Future[Outcome]]:
        """Submit several credits (they leave in as few frames as possible)."""
        return [await self.submit(c) for c in credits]

    async def run(self, credit: Credit) -> Outcome:
        """Submit one credit and wait for its outcome."""
        return await (await self.submit(credit))

    def cancel(self, credit_ids: Iterable[int]) -> None:
        """Cancel credits (queued ones end at the router; dispatched ones at their worker)."""
        self._send(encode(CancelCredits(credit_ids=list(credit_ids))))

    def end_session(self, session: str, reason: str = "") -> None:
        """This producer will send no more turns of ``session``."""
        self._send(encode(EndSession(x_correlation_id=session, reason=reason)))

    def release_reservation(self, session: str, count: int = 1) -> None:
        """Give back FORK reservations ``session``'s turns declared and will not use."""
        self._send(encode(ReleaseReservation(x_correlation_id=session, count=count)))

    async def stream(self) -> AsyncIterator[Outcome]:
        """Every outcome as it arrives, from now on (also delivered to the futures)."""
        queue: asyncio.Queue[Outcome] = asyncio.Queue()
        self._streams.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._streams.remove(queue)

    # ------------------------------------------------------------------ plumbing

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        step = self._max_batch
        for i in range(0, len(pending), step):
            self._send(encode(SubmitBatch(credits=pending[i : i + step])))

    def _send(self, frame: bytes) -> None:
        if self._unsent or self._sock is None or not self._sock.send(frame):
            self._unsent.append(frame)

    def _retry_unsent(self) -> None:
        unsent = self._unsent
        while unsent and self._sock is not None and self._sock.send(unsent[0]):
            unsent.popleft()

    def _on_frames(self, frames: list[bytes]) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        for frame in frames:
            try:
                msg = decode_router_to_producer(frame)
            except DecodeError as exc:
                logger.warning("invalid message from the router: %s", exc)
                continue
            match msg:
                case OutcomeBatch(outcomes=outcomes):
                    for outcome in outcomes:
                        self._resolve(outcome)
                case Outcome():
                    self._resolve(msg)
                case ProducerFirstToken(credit_id=cid, ttft_s=ttft):
                    if self.on_first_token is not None:
                        self.on_first_token(cid, ttft)
                case _:
                    self._on_control(msg)
        if self._sock is not None:
            self._sock.recheck()

    def _on_control(self, msg: object) -> None:
        welcome = self._welcome
        match msg:
            case ProducerWelcome():
                if welcome is not None and not welcome.done():
                    welcome.set_result(msg)
            case Refusal():
                logger.error("router refused this producer: %s", msg.reason)
                if welcome is not None and not welcome.done():
                    welcome.set_exception(ProducerRefusedError(msg))
            case ErrorReport(code=code, message=text):
                logger.warning("router reports %s: %s", code, text)
                self.errors.append(msg)

    def _resolve(self, outcome: Outcome) -> None:
        future = self._futures.pop(outcome.credit_id, None)
        if future is None:
            self.unmatched_outcomes += 1
            return
        self._slots.release()
        if not future.done():
            future.set_result(outcome)
        for queue in self._streams:
            queue.put_nowait(outcome)
