"""RouterClient: the async producer API — submit credits, await exactly one outcome each.

Usage::

    async with RouterClient("ipc:///tmp/credit-router.sock", name="bench") as client:
        done = await client.submit(Credit(id=1, x_correlation_id="s1", num_turns=2))
        outcome = await done

Credits submitted in one loop iteration leave as one ``SubmitBatch`` frame. ``submit`` waits
while ``max_outstanding`` credits have no outcome yet (back-pressure).

The conversation with the router is ``credit_common.peer.PeerSession`` (the same rules as the
worker agent's): hello, beat, say hello again when the router falls silent, forgets us
(``hello_required``) or the connection comes back, and notice a router restart by its new
incarnation. Every credit is sent under the router incarnation that welcomed us
(``SubmitBatch.router_incarnation``) and remembered so; while no router has welcomed us,
credits wait here, unsent, and go to whichever router welcomes us next — delivered and awaited,
never also given up. After a restart, credits the old router had (it may have dispatched them:
workers send their completions as ``Recovered``) have ``recovery_grace_s`` to come back before
they end locally as ``lost: router_restarted``; a frame of ours that reached the new router
although addressed to the old one comes back ``rejected: stale_incarnation`` (it never ran)
and is sent again, transparently. So each credit gets one outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Final

import zmq

from credit_common.peer import HEARTBEAT, HELLO, PeerSession, PeerState
from protocol import PROTOCOL_VERSION
from protocol.codec import decode_router_to_producer, encode
from protocol.errors import DecodeError
from protocol.messages import (
    ADOPTED_TAG,
    CancelCredits,
    Credit,
    EndSession,
    ErrorReport,
    Heartbeat,
    Outcome,
    OutcomeBatch,
    ProducerAdopted,
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

ROUTER_RESTARTED: Final = "router_restarted"
STALE_INCARNATION: Final = "stale_incarnation"
ROUTER_DRAINING: Final = "router_draining"
_MAX_RESENDS: Final = 5
"""A credit bounced ``stale_incarnation`` more often than this (routers restarting in a loop)
ends with that outcome."""


class ProducerRefusedError(Exception):
    """The router refused this producer (another protocol version), or never accepted its
    CURVE key. ``refusal.code`` says which (``version_mismatch``, ``auth_failed``…)."""

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
        incarnation: this process's incarnation (random when omitted; tests pin it).
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
        incarnation: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.protocol_version = protocol_version
        self._curve = curve
        self.name = name
        self.incarnation = incarnation if incarnation is not None else uuid.uuid4().hex[:12]
        self.key = f"{name}/{self.incarnation}"
        self.recovery_grace_s = recovery_grace_s
        self.on_first_token = on_first_token
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.Context()
        self._sock: DealerSocket | None = None
        self.session = PeerSession(heartbeat_interval_s=heartbeat_interval_s)
        self._futures: dict[int, asyncio.Future[Outcome]] = {}
        self._credits: dict[int, Credit] = {}
        """Outstanding credits, kept to send again one that bounced ``stale_incarnation``."""
        self._sent_under: dict[int, str] = {}
        """Credit id -> the router incarnation it was sent to."""
        self._resends: dict[int, int] = {}
        self.adopted = 0
        """Credits a restarted router took over from its predecessor (``ProducerAdopted``)."""
        self._draining: str | None = None
        """The router incarnation that answered ``rejected: router_draining``, while it lasts."""
        self._after_drain: set[int] = set()
        """Credits sent to ``_draining`` after it said so: they cannot run there."""
        self._slots = asyncio.Semaphore(max_outstanding)
        self._queue: list[Credit | bytes] = []
        """Credits and control frames not sent yet, in order."""
        self._flush_scheduled = False
        self._streams: list[asyncio.Queue[Outcome]] = []
        self._welcomed: asyncio.Event = asyncio.Event()
        self._wake = asyncio.Event()
        self._max_batch = 1_024
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._hello = encode(
            ProducerHello(
                producer=name,
                protocol_version=protocol_version,
                incarnation=self.incarnation,
                understands=[ADOPTED_TAG],
            )
        )
        self._beat_frame = encode(Heartbeat())
        self.unmatched_outcomes = 0
        """Outcomes for credits this client was not waiting for."""
        self.late_outcomes: deque[Outcome] = deque(maxlen=1024)
        """The most recent of those (a router killed between an outcome and its ack has the
        worker resend it to the next router: PROTOCOL.md §6.1)."""
        self.errors: list[ErrorReport] = []
        """Error reports the router sent (kept for inspection; also logged)."""
        self.handshake_failure: str | None = None
        """Why the last connection handshake failed, in words (a key the router does not
        accept, a CURVE/plaintext mismatch), or ``None``."""

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

    @property
    def router_incarnation(self) -> str | None:
        """The incarnation of the router that last welcomed us."""
        return self.session.router_incarnation

    @property
    def heartbeat_interval_s(self) -> float:
        """The beat (the router's welcome sets it)."""
        return self.session.liveness.heartbeat_interval_s

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and wait for the router's welcome.

        Raises:
            TimeoutError: no router answered within ``timeout_s``.
            ProducerRefusedError: the router refused us, or never accepted our CURVE key.
        """
        loop = asyncio.get_running_loop()
        self._sock = DealerSocket(
            self._ctx,
            self.endpoint,
            self.key.encode(),
            self._on_frames,
            curve=self._curve,
            on_connected=self._on_connected,
            on_handshake_failed=self._on_handshake_failed,
        )
        self._sock.attach(loop)
        self.session.start(loop.time())
        self._task = asyncio.create_task(self._pump(), name=f"producer-{self.key}")
        try:
            async with asyncio.timeout(timeout_s):
                await self._welcomed.wait()
            self._raise_if_final()
        except TimeoutError:
            await self.close()
            why = f": {self.handshake_failure}" if self.handshake_failure else ""
            raise TimeoutError(
                f"no router answered at {self.endpoint} in {timeout_s:.1f} s{why}"
            ) from None
        except BaseException:
            await self.close()
            raise

    def _raise_if_final(self) -> None:
        session = self.session
        if session.state is PeerState.REFUSED or session.state is PeerState.FAILED:
            code = session.refusal_code or "auth_failed"
            raise ProducerRefusedError(
                Refusal(
                    reason=session.why,
                    router_version=0,
                    peer_version=self.protocol_version,
                    code=code,
                )
            )

    async def close(self) -> None:
        """Stop beating and close the socket. Credits still awaited stay unresolved."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        self.session.close()
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            self._sock.close()
        if self._own_context:
            self._ctx.term()

    async def _pump(self) -> None:
        """Send what the session asks for (hello, beats) when it asks for it."""
        loop = asyncio.get_running_loop()
        session = self.session
        while not session.final:
            now = loop.time()
            was = session.router_incarnation if session.ready else None
            what = session.due(now)
            if was is not None and not session.ready:
                self._drained_router_gone(was)
            if what == HELLO:
                if session.state is PeerState.REJOINING and session.rehellos == 1:
                    logger.warning("saying hello again to %s: %s", self.endpoint, session.why)
                if not self._send_now(self._hello):
                    session.hello_unsent()
            elif what == HEARTBEAT:
                self._send_now(self._beat_frame)
            if self._queue and session.ready:
                self._flush()
            self._wake.clear()
            delay = max(0.005, session.next_deadline(loop.time()) - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, 0.25)):
                    await self._wake.wait()
        self._welcomed.set()  # wake connect() on a refusal or auth failure

    def _on_connected(self, reconnected: bool) -> None:
        now = asyncio.get_running_loop().time()
        if self.session.connected(now, reconnected=reconnected):
            self._wake.set()

    def _on_handshake_failed(self, why: str, hangup: bool) -> None:
        self.handshake_failure = why
        # While connecting, connect() raises with the reason: no log line of our own.
        joined = self.session.router_incarnation is not None
        logger.log(logging.WARNING if joined else logging.DEBUG, "handshake with %s failed: %s",
                   self.endpoint, why)  # fmt: skip
        if self.session.auth_failed(why, asyncio.get_running_loop().time(), hangup=hangup):
            if joined:
                logger.error("giving up on %s: %s", self.endpoint, self.session.why)
            self._end_unsent(f"auth_failed: {why}")
            self._wake.set()

    # ------------------------------------------------------------------- credits

    @property
    def outstanding(self) -> int:
        """Credits submitted and awaiting their outcome."""
        return len(self._futures)

    async def submit(self, credit: Credit) -> asyncio.Future[Outcome]:
        """Submit one credit; returns the future of its one outcome. Waits under back-pressure."""
        await self._slots.acquire()
        cid = credit.id
        if cid in self._futures:
            self._slots.release()
            raise ValueError(f"credit id {cid} is already awaiting its outcome")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._futures[cid] = future
        self._credits[cid] = credit
        self._queue.append(credit)
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
        ids = list(credit_ids)
        # A credit not sent yet ends here: it never reached a router.
        unsent = {c.id for c in self._queue if isinstance(c, Credit)} & set(ids)
        if unsent:
            self._queue = [
                c for c in self._queue if not isinstance(c, Credit) or c.id not in unsent
            ]
            for cid in unsent:
                self._resolve(Outcome(credit_id=cid, status=Status.CANCELLED, reason="cancelled"))
        rest = [cid for cid in ids if cid not in unsent]
        if rest:
            self._control(encode(CancelCredits(credit_ids=rest)))

    def end_session(self, session: str, reason: str = "") -> None:
        """This producer will send no more turns of ``session``."""
        self._control(encode(EndSession(x_correlation_id=session, reason=reason)))

    def release_reservation(self, session: str, count: int = 1) -> None:
        """Give back FORK reservations ``session``'s turns declared and will not use."""
        self._control(encode(ReleaseReservation(x_correlation_id=session, count=count)))

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

    def _control(self, frame: bytes) -> None:
        self._queue.append(frame)
        self._flush()

    def _flush(self) -> None:
        """Send what waits, in order, if a router has welcomed us; keep the rest."""
        self._flush_scheduled = False
        queue = self._queue
        sock = self._sock
        session = self.session
        if not queue or sock is None or not session.ready:
            return
        incarnation = session.router_incarnation or ""
        step = self._max_batch
        sent_under = self._sent_under
        i = 0
        n = len(queue)
        while i < n:
            item = queue[i]
            if isinstance(item, bytes):
                if not sock.send(item):
                    break
                i += 1
                continue
            j = i
            while j < n and j - i < step and isinstance(queue[j], Credit):
                j += 1
            batch: list[Credit] = queue[i:j]  # type: ignore[assignment]
            if not sock.send(encode(SubmitBatch(credits=batch, router_incarnation=incarnation))):
                break
            for credit in batch:
                sent_under[credit.id] = incarnation
            if incarnation == self._draining:
                self._after_drain.update(credit.id for credit in batch)
            i = j
        if i:
            session.sent(asyncio.get_running_loop().time())
            del queue[:i]

    def _send_now(self, frame: bytes) -> bool:
        return self._sock is not None and self._sock.send(frame)

    def _on_frames(self, frames: list[bytes]) -> None:
        now = asyncio.get_running_loop().time()
        self.session.received(now)
        for frame in frames:
            try:
                msg = decode_router_to_producer(frame)
            except DecodeError as exc:
                logger.warning("invalid message from the router: %s", exc)
                continue
            match msg:
                case OutcomeBatch(outcomes=outcomes):
                    for outcome in outcomes:
                        self._on_outcome(outcome)
                case Outcome():
                    self._on_outcome(msg)
                case ProducerFirstToken(credit_id=cid, ttft_s=ttft):
                    if self.on_first_token is not None:
                        self.on_first_token(cid, ttft)
                case ProducerAdopted(credit_ids=ids):
                    self._adopted(ids)
                case _:
                    self._on_control(msg, now)
        if self._sock is not None:
            self._sock.recheck()

    def _on_control(self, msg: object, now: float) -> None:
        session = self.session
        match msg:
            case ProducerWelcome():
                self._max_batch = max(1, msg.max_batch)
                previous = session.welcomed(msg.router_incarnation, msg.heartbeat_interval_s, now)
                if previous is not None:
                    self._router_restarted(previous)
                self._welcomed.set()
                self._flush()
                self._wake.set()
            case Refusal():
                logger.error("router refused this producer: %s", msg.reason)
                session.refused(msg.code or "refused", msg.reason)
                self._end_unsent(f"producer_refused: {msg.reason}")
                self._wake.set()
            case ErrorReport(code=code, message=text):
                self.errors.append(msg)
                if session.error_report(code, now):
                    logger.warning("router does not know us (%s): saying hello again", code)
                    self._wake.set()
                else:
                    logger.warning("router reports %s: %s", code, text)

    def _adopted(self, credit_ids: list[int]) -> None:
        """The router that welcomed us tracks these credits of its predecessor (a worker still
        runs them): they are its credits now, so the old router's recovery grace must not give
        them up (``_give_up`` skips a credit sent under another incarnation)."""
        incarnation = self.session.router_incarnation
        if incarnation is None:
            return
        for cid in credit_ids:
            if cid in self._futures and cid in self._sent_under:
                self._sent_under[cid] = incarnation
                self.adopted += 1

    def _drained_router_gone(self, incarnation: str) -> None:
        """The router ``incarnation`` is gone (silent, or replaced). If it had told us it was
        draining, the credits we sent it after that never ran (a draining router starts
        nothing new): whatever of them got no answer ends ``rejected: router_draining`` now,
        instead of waiting out the recovery grace as credits it may have run do."""
        if incarnation != self._draining:
            return
        self._draining = None
        after, self._after_drain = self._after_drain, set()
        for cid in after:
            if cid in self._futures and self._sent_under.get(cid) == incarnation:
                self._resolve(
                    Outcome(credit_id=cid, status=Status.REJECTED, reason=ROUTER_DRAINING)
                )

    def _router_restarted(self, previous: str) -> None:
        self._drained_router_gone(previous)
        waiting = [cid for cid, inc in self._sent_under.items() if inc == previous]
        logger.warning(
            "router restarted (incarnation %s -> %s): %d credits await recovery",
            previous,
            self.session.router_incarnation,
            len(waiting),
        )
        if waiting:
            asyncio.get_running_loop().call_later(
                self.recovery_grace_s, self._give_up, waiting, previous
            )

    def _give_up(self, credit_ids: list[int], incarnation: str) -> None:
        for cid in credit_ids:
            if cid in self._futures and self._sent_under.get(cid) == incarnation:
                self._resolve(Outcome(credit_id=cid, status=Status.LOST, reason=ROUTER_RESTARTED))

    def _end_unsent(self, reason: str) -> None:
        """The session is final: credits never sent end here (they never reached a router)."""
        unsent = [c.id for c in self._queue if isinstance(c, Credit)]
        self._queue = []
        for cid in unsent:
            self._resolve(Outcome(credit_id=cid, status=Status.REJECTED, reason=reason[:200]))

    def _on_outcome(self, outcome: Outcome) -> None:
        cid = outcome.credit_id
        if (
            outcome.reason == ROUTER_DRAINING
            and outcome.status is Status.REJECTED
            and self._draining is None
            and self.session.ready
        ):
            # This router drains (irreversibly): from now on, what we send it cannot run.
            self._draining = self.session.router_incarnation
        if outcome.reason == STALE_INCARNATION and outcome.status is Status.REJECTED:
            credit = self._credits.get(cid)
            resends = self._resends.get(cid, 0)
            if credit is not None and cid in self._futures and resends < _MAX_RESENDS:
                # Addressed to a router that was gone by the time it arrived: it never ran.
                # Send it again, to the router that welcomed us since.
                self._resends[cid] = resends + 1
                self._sent_under.pop(cid, None)
                self._queue.append(credit)
                self._flush()
                return
        self._resolve(outcome)

    def _resolve(self, outcome: Outcome) -> None:
        cid = outcome.credit_id
        future = self._futures.pop(cid, None)
        if future is None:
            self.unmatched_outcomes += 1
            self.late_outcomes.append(outcome)
            return
        self._credits.pop(cid, None)
        self._sent_under.pop(cid, None)
        self._resends.pop(cid, None)
        self._slots.release()
        if not future.done():
            future.set_result(outcome)
        for queue in self._streams:
            queue.put_nowait(outcome)
