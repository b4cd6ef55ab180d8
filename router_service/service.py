"""RouterService: the daemon around the core — sockets in, effects out, time passed in.

Life cycle (uvicorn's shape, STYLE R10): ``startup()`` binds both endpoints and starts reading;
``main_loop()`` ticks (liveness, heartbeats, idle expiry, loop-lag measurement) until asked to
exit; ``shutdown()`` drains — no new credits, in-flight ones may finish until the deadline —
then ends everything left with an outcome and closes the sockets.

One wake-up of a socket is handled as a unit: every frame is decoded (in
``protocol.codec``, nowhere else), applied to the core, and then the core's effects are sent
once, coalesced: one frame per worker and producer, one ``Ack`` per worker. Bad input from a
peer is counted, answered with an ``ErrorReport`` and costs only that peer; a peer that keeps
sending it is cut off.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Final

import zmq

from protocol import MAX_BATCH, PROTOCOL_VERSION
from protocol.codec import decode_producer_to_router, decode_worker_to_router, encode
from protocol.errors import DecodeError
from protocol.messages import (
    Ack,
    CancelCredits,
    ChildRelease,
    Completion,
    CompletionBatch,
    Dispatch,
    DispatchBatch,
    Draining,
    EndSession,
    ErrorReport,
    FirstToken,
    Goodbye,
    Heartbeat,
    Hello,
    InFlightReport,
    OutcomeBatch,
    ProducerHello,
    ProducerWelcome,
    Recovered,
    Refusal,
    ReleaseReservation,
    Submit,
    SubmitBatch,
)
from router_service import sdnotify
from router_service.core.router import Effects, RouterCore
from router_service.security import Allowlist, KeyError_, ZapHandler
from router_service.transport import Curve, Frames, RouterSocket
from router_service.web import StatusServer

__all__ = ["RouterService"]

logger = logging.getLogger(__name__)

INVALID_LIMIT: Final = 100
"""Invalid messages a peer may send within ``INVALID_WINDOW_S`` before it is cut off."""
INVALID_WINDOW_S: Final = 10.0
LOG_EVERY_S: Final = 10.0
"""Repeated warnings about one peer are logged at most this often (with a count)."""
PRODUCER_BACKLOG: Final = 1_000_000
"""Outcome frames kept for a producer that is not reading or reconnecting."""


class _Producer:
    """A producer connection, by routing identity."""

    __slots__ = ("backlog", "key", "last_seen", "name")

    def __init__(self, key: str, name: str, now: float) -> None:
        self.key = key
        self.name = name
        self.last_seen = now
        self.backlog: deque[bytes] = deque()


class _PeerErrors:
    """Counts a peer's invalid messages and rate-limits the warnings about them."""

    __slots__ = ("count", "last_log", "suppressed", "window_start")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.window_start = now
        self.last_log = -1e9
        self.suppressed = 0

    def loggable(self, now: float) -> int | None:
        """``None`` if a warning now would come too soon (it is counted as suppressed), else
        how many were suppressed since the last one (the caller logs it)."""
        if now - self.last_log < LOG_EVERY_S:
            self.suppressed += 1
            return None
        suppressed, self.suppressed, self.last_log = self.suppressed, 0, now
        return suppressed

    def hit(self, now: float) -> int:
        """One more invalid message in the current window; returns the window's count."""
        if now - self.window_start > INVALID_WINDOW_S:
            self.window_start = now
            self.count = 0
        self.count += 1
        return self.count


class RouterService:
    """The router daemon. Construct, then ``await serve()``.

    Args:
        core: the routing core (it owns all routing state).
        worker_endpoint: where workers connect (``tcp://HOST:PORT``).
        producer_endpoint: where producers connect (``ipc://PATH`` or ``tcp://…``).
        heartbeat_interval_s: the beat sent to every peer.
        drain_deadline_s: on shutdown, how long in-flight credits may still finish.
        producer_timeout_s: a producer silent this long is gone: its credits are cancelled.
        http_host: where the HTTP endpoints listen (loopback by default).
        http_port: their port; ``None`` serves no HTTP, 0 picks a free port.
        curve: ``(public, secret)`` Z85 server keys to require CURVE (both endpoints when
            TCP), with ``allowlist`` binding each allowed key to a worker or producer name.
        allowlist: the allowed keys (required with ``curve``); ``reload_keys()`` re-reads it.
        context: a ZeroMQ context to use (one per process; created if omitted).
    """

    def __init__(
        self,
        core: RouterCore,
        *,
        worker_endpoint: str,
        producer_endpoint: str,
        heartbeat_interval_s: float = 1.0,
        drain_deadline_s: float = 30.0,
        producer_timeout_s: float = 60.0,
        http_host: str = "127.0.0.1",
        http_port: int | None = None,
        curve: tuple[bytes, bytes] | None = None,
        allowlist: Allowlist | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.core = core
        self.worker_endpoint = worker_endpoint
        self.producer_endpoint = producer_endpoint
        self.heartbeat_interval_s = heartbeat_interval_s
        self.drain_deadline_s = drain_deadline_s
        self.producer_timeout_s = producer_timeout_s
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.Context()
        self._workers_sock: RouterSocket | None = None
        self._producers_sock: RouterSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.producers: dict[bytes, _Producer] = {}
        self._errors: dict[tuple[str, bytes], _PeerErrors] = {}
        self._names: dict[str, bytes] = {}
        self.should_exit = False
        self.force_exit = False
        self.ready = asyncio.Event()
        self.draining = False
        self.invalid_messages: dict[str, int] = {}
        """Invalid messages by reason (metrics read this)."""
        self.loop_lag_s = 0.0
        """Lateness of the last tick: how far behind its schedule the event loop ran."""
        self._last_beat = 0.0
        self.auth_failures = 0
        """Failed CURVE handshakes, and frames whose key does not own their identity."""
        if (curve is None) != (allowlist is None):
            raise ValueError("curve keys and an allowlist go together")
        self._curve_keys = curve
        self.allowlist = allowlist
        self._allowed_names: set[str] = set(allowlist.names.values()) if allowlist else set()
        self._zap: ZapHandler | None = None
        self.version = _version()
        self.started_at = time.monotonic()
        self.http: StatusServer | None = (
            StatusServer(self, http_host, http_port) if http_port is not None else None
        )

    # ----------------------------------------------------------------- life cycle

    async def serve(self) -> None:
        """Run until asked to exit, then drain and close."""
        self.startup()
        if self.http is not None:
            await self.http.start()
        self.ready.set()
        sdnotify.notify(sdnotify.READY)  # systemd Type=notify: bound and serving
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    def startup(self) -> None:
        """Bind both endpoints and start reading."""
        self._loop = asyncio.get_running_loop()
        self.core.start_clock(self.now())
        worker_curve = producer_curve = None
        if self._curve_keys is not None:
            assert self.allowlist is not None
            self._zap = ZapHandler(self._ctx, self.allowlist)
            self._zap.start_allowing()
            public, secret = self._curve_keys
            worker_curve = Curve(public, secret, lambda: self._allowed_names, _worker_owner)
            if self.producer_endpoint.startswith("tcp://"):
                producer_curve = Curve(public, secret, lambda: self._allowed_names, _producer_owner)
        self._workers_sock = RouterSocket(
            self._ctx,
            self.worker_endpoint,
            self._on_worker_frames,
            self._on_malformed_worker,
            curve=worker_curve,
            on_auth_failure=self._on_auth_failure,
            on_disconnect=self._on_worker_disconnect,
        )
        self._producers_sock = RouterSocket(
            self._ctx,
            self.producer_endpoint,
            self._on_producer_frames,
            self._on_malformed_producer,
            curve=producer_curve,
            on_auth_failure=self._on_auth_failure,
        )
        self.worker_endpoint = self._workers_sock.endpoint
        self.producer_endpoint = self._producers_sock.endpoint
        self._workers_sock.attach(self._loop)
        self._producers_sock.attach(self._loop)
        logger.info(
            "router started incarnation=%s workers=%s producers=%s",
            self.core.router_incarnation,
            self.worker_endpoint,
            self.producer_endpoint,
        )

    async def main_loop(self) -> None:
        """Tick until ``should_exit``: liveness, heartbeats, expiry, backlogs."""
        loop = asyncio.get_running_loop()
        interval = min(0.25, self.heartbeat_interval_s / 4)
        expected = loop.time() + interval
        while not self.should_exit:
            await asyncio.sleep(max(0.0, expected - loop.time()))
            self.loop_lag_s = max(0.0, loop.time() - expected)
            now = self.now()
            expected = loop.time() + interval
            self.on_tick(now)

    def on_tick(self, now: float) -> None:
        """Periodic duties; public so tests can drive them with their own clock."""
        self.core.tick(now)
        if now - self._last_beat >= self.heartbeat_interval_s:
            self._last_beat = now
            beat = encode(Heartbeat(sent_at_s=now))
            assert self._workers_sock is not None
            for name in self.core.workers:
                self._workers_sock.send(self._identity(name), beat)
            assert self._producers_sock is not None
            # Forget error counts of peers that have been quiet (one per identity would grow
            # without bound under a peer that keeps inventing identities).
            for key, errors in list(self._errors.items()):
                if now - max(errors.window_start, errors.last_log) > INVALID_WINDOW_S + LOG_EVERY_S:
                    del self._errors[key]
            for identity, producer in list(self.producers.items()):
                if now - producer.last_seen > self.producer_timeout_s:
                    logger.warning("producer gone producer=%s (silent)", producer.key)
                    del self.producers[identity]
                    self.core.producer_gone(producer.key, now)
                    continue
                self._retry_backlog(identity, producer)
                if not producer.backlog:
                    # A beat is never queued: a late one says nothing.
                    self._producers_sock.send(identity, beat)
        self._flush(now)

    def request_exit(self, *, force: bool = False) -> None:
        """Ask the service to stop (SIGTERM: drain; a second SIGINT: force)."""
        if self.should_exit or force:
            self.force_exit = True
        self.should_exit = True
        # Stop taking credits now, not at the next tick: a credit accepted during the drain
        # would only end ``router_shutdown`` later.
        self.draining = True
        self.core.accepting = False
        sdnotify.notify(sdnotify.STOPPING)

    async def shutdown(self) -> None:
        """Drain, end every remaining credit with an outcome, close the sockets."""
        loop = asyncio.get_running_loop()
        self.draining = True
        self.core.accepting = False
        deadline = loop.time() + self.drain_deadline_s
        logger.info("router draining deadline_s=%.1f", self.drain_deadline_s)
        while not self.force_exit and loop.time() < deadline and self._credits_open():
            await asyncio.sleep(0.05)
            self.on_tick(self.now())
        now = self.now()
        self.core.shutdown(now)
        self._flush(now)
        # The last outcomes must reach producers that are still there: give any held back
        # a moment (bounded) before the sockets close.
        give_up = loop.time() + 1.0
        while loop.time() < give_up and any(p.backlog for p in self.producers.values()):
            for identity, producer in list(self.producers.items()):
                self._retry_backlog(identity, producer)
            await asyncio.sleep(0.02)
        for sock in (self._workers_sock, self._producers_sock):
            if sock is not None:
                sock.close()
        if self._zap is not None:
            self._zap.stop()
        if self._own_context:
            self._ctx.term()
        if self.http is not None:
            await self.http.stop()
        logger.info("router stopped")

    def reload_keys(self) -> None:
        """Re-read the allowlist (SIGHUP): peers whose key was removed are cut off and lost."""
        if self.allowlist is None:
            logger.warning("key reload asked, but CURVE is off")
            return
        try:
            added, removed = self.allowlist.reload()
        except KeyError_ as exc:
            logger.error("key reload failed, keeping the old allowlist: %s", exc)
            return
        self._allowed_names = set(self.allowlist.names.values())
        logger.info("keys reloaded added=%s removed=%s", sorted(added), sorted(removed))
        now = self.now()
        for name in removed:
            if name in self.core.workers:
                logger.warning("worker cut off name=%s (key removed)", name)
                self.core.worker_unreachable(name, now)
            for identity, producer in list(self.producers.items()):
                if producer.key.split("/", 1)[0] == name:
                    del self.producers[identity]
                    self.core.producer_gone(producer.key, now)
        self._flush(now)

    def _on_auth_failure(self, identity: bytes, why: str) -> None:
        self.auth_failures += 1
        now = self.now()
        errors = self._errors.get(("auth", b""))
        if errors is None:
            errors = self._errors[("auth", b"")] = _PeerErrors(now)
        suppressed = errors.loggable(now)
        if suppressed is not None:
            logger.warning(
                "authentication failure %r: %s (%d more suppressed)", identity, why, suppressed
            )

    def _on_worker_disconnect(self, identity: bytes) -> None:
        name = identity.decode("utf-8", "replace")
        if name in self.core.workers:
            # Its connection closed: nothing more goes to that identity until the worker's
            # key speaks again (whoever connects with the name next must prove it).
            self.core.worker_disconnected(name, "", (), self.now())
            self._flush(self.now())

    def is_ready(self) -> bool:
        """Bound and accepting credits (``/readyz``)."""
        return self.ready.is_set() and not self.draining

    def now(self) -> float:
        """The service's clock (the loop's monotonic time)."""
        # Not loop.time(): uvloop's clock ticks in whole milliseconds, too coarse for the
        # submit->dispatch histogram (its first buckets are 10 and 25 us).
        return time.monotonic()

    def traffic(self) -> dict[str, tuple[int, int]]:
        """Payload bytes ``(in, out)`` per endpoint kind."""
        out = {}
        for kind, sock in (("workers", self._workers_sock), ("producers", self._producers_sock)):
            if sock is not None:
                out[kind] = (sock.bytes_in, sock.bytes_out)
        return out

    def _credits_open(self) -> bool:
        return any(self.core.ledgers.values())

    # ---------------------------------------------------------------- workers

    def _identity(self, name: str) -> bytes:
        identity = self._names.get(name)
        if identity is None:
            identity = self._names[name] = name.encode()
        return identity

    def _on_worker_frames(self, frames: Frames) -> None:
        assert self._loop is not None
        now = self.now()
        core = self.core
        acks: dict[str, int] = {}
        seen: set[bytes] = set()
        for identity, payload in frames:
            try:
                msg = decode_worker_to_router(payload)
            except DecodeError as exc:
                self._invalid(identity, exc.reason, str(exc), now, worker=True)
                continue
            try:
                name = identity.decode()
            except UnicodeDecodeError:
                # Credits are sent to name.encode(): an identity that is not UTF-8 could never
                # be reached, so such a peer is not admitted.
                self._invalid(identity, "identity", "routing id is not UTF-8", now, worker=True)
                continue
            if type(msg) is Hello:
                self._hello(identity, name, msg, now)
                continue
            if name not in core.workers:
                self._reply_worker(
                    identity, ErrorReport(code="unknown_worker", message="send Hello first")
                )
                continue
            if identity not in seen:
                seen.add(identity)
                core.worker_seen(name, now)
            try:
                self._worker_message(name, msg, now, acks)
            except Exception:
                # A bug of ours must not take the router down with one peer's message.
                logger.exception("internal error handling %s from %s", type(msg).__name__, name)
                self._count("internal_error")
        for name, seq in acks.items():
            self._reply_worker(self._identity(name), Ack(seq=seq))
        self._flush(now)

    def _worker_message(self, name: str, msg: object, now: float, acks: dict[str, int]) -> None:
        core = self.core
        match msg:
            case CompletionBatch(completions=completions):
                core.complete(name, completions, now)
                self._note_ack(acks, name, completions)
            case Completion():
                core.complete(name, (msg,), now)
                self._note_ack(acks, name, (msg,))
            case Recovered(router_incarnation=incarnation, completions=completions):
                if incarnation == core.router_incarnation:
                    # Ours after all (a confused worker): ordinary completions, de-duplicated.
                    core.complete(name, completions, now)
                else:
                    core.recovered(name, completions, now)
                self._note_ack(acks, name, completions)
            case FirstToken(producer=producer, credit_id=cid, ttft_s=ttft):
                core.first_token(name, producer, cid, ttft)
            case ChildRelease(x_correlation_id=child):
                core.child_release(name, child, now)
            case InFlightReport(credits=credits):
                core.worker_report(name, credits, now)
            case Draining(deadline_s=deadline):
                logger.info("worker draining name=%s deadline_s=%.1f", name, deadline)
                core.worker_draining(name, deadline, now)
            case Goodbye(reason=reason):
                logger.info("worker left name=%s reason=%s", name, reason or "-")
                core.worker_left(name, now)
            case Heartbeat():
                pass

    @staticmethod
    def _note_ack(acks: dict[str, int], name: str, completions: Iterable[Completion]) -> None:
        top = acks.get(name, 0)
        for done in completions:
            if done.seq > top:
                top = done.seq
        acks[name] = top

    def _hello(self, identity: bytes, name: str, msg: Hello, now: float) -> None:
        if msg.name != name:
            # The routing identity is what credits are sent to: a hello may not claim another.
            self._reply_worker(
                identity,
                Refusal(
                    reason=f"hello name {msg.name!r} does not match routing id {name!r}",
                    router_version=PROTOCOL_VERSION,
                    peer_version=msg.protocol_version,
                ),
            )
            return
        known = name in self.core.workers
        admitted = self.core.worker_hello(
            name,
            incarnation=msg.incarnation,
            protocol_version=msg.protocol_version,
            capacity=msg.capacity,
            labels=msg.labels,
            in_flight=msg.in_flight,
            now=now,
        )
        if admitted:
            logger.info(
                "worker %s name=%s incarnation=%s capacity=%d labels=%s",
                "reconnected" if known else "joined",
                name,
                msg.incarnation,
                msg.capacity,
                msg.labels,
            )
        else:
            logger.warning(
                "worker refused name=%s version=%d capacity=%d",
                name,
                msg.protocol_version,
                msg.capacity,
            )

    def _reply_worker(self, identity: bytes, msg: object) -> None:
        assert self._workers_sock is not None
        self._workers_sock.send(identity, encode(msg))

    def _on_malformed_worker(self, identity: bytes) -> None:
        assert self._loop is not None
        self._invalid(identity, "multipart", "more than one frame", self.now(), worker=True)

    # --------------------------------------------------------------- producers

    def _on_producer_frames(self, frames: Frames) -> None:
        assert self._loop is not None
        now = self.now()
        for identity, payload in frames:
            try:
                msg = decode_producer_to_router(payload)
            except DecodeError as exc:
                self._invalid(identity, exc.reason, str(exc), now, worker=False)
                continue
            try:
                self._producer_message(identity, msg, now)
            except Exception:
                logger.exception("internal error handling %s from a producer", type(msg).__name__)
                self._count("internal_error")
        self._flush(now)

    def _producer_message(self, identity: bytes, msg: object, now: float) -> None:
        producer = self.producers.get(identity)
        if type(msg) is ProducerHello:
            self._producer_hello(identity, msg, now)
            return
        if producer is None:
            self._send_raw_producer(
                identity, ErrorReport(code="hello_required", message="send ProducerHello first")
            )
            self._count("unknown_producer")
            return
        producer.last_seen = now
        core = self.core
        key = producer.key
        match msg:
            case SubmitBatch(credits=credits):
                core.submit(key, credits, now)  # the decoder bounds its length
            case Submit(credit=credit):
                core.submit(key, (credit,), now)
            case CancelCredits(credit_ids=ids):
                core.cancel(key, ids, now)
            case EndSession(x_correlation_id=session, reason=reason):
                core.end_session(key, session, now, reason)
            case ReleaseReservation(x_correlation_id=session, count=count):
                core.release_reservation(session, count, now)
            case Heartbeat():
                pass
        if producer.backlog:
            self._retry_backlog(identity, producer)

    def _producer_hello(self, identity: bytes, msg: ProducerHello, now: float) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            logger.warning(
                "producer refused producer=%s version=%d (router speaks %d)",
                msg.producer,
                msg.protocol_version,
                PROTOCOL_VERSION,
            )
            self._send_raw_producer(
                identity,
                Refusal(
                    reason=f"protocol version mismatch: router speaks {PROTOCOL_VERSION}, "
                    f"producer speaks {msg.protocol_version}",
                    router_version=PROTOCOL_VERSION,
                    peer_version=msg.protocol_version,
                ),
            )
            return
        producer = self.producers.get(identity)
        if producer is None:
            # The routing identity keys the producer's credits: ``name/incarnation`` by the
            # client's convention, so a restarted producer never shares keys with its past.
            producer = _Producer(identity.decode("utf-8", "replace"), msg.producer, now)
            self.producers[identity] = producer
            logger.info("producer connected producer=%s key=%s", msg.producer, producer.key)
        producer.last_seen = now
        self._send_raw_producer(
            identity,
            ProducerWelcome(
                router_incarnation=self.core.router_incarnation,
                protocol_version=PROTOCOL_VERSION,
                heartbeat_interval_s=self.heartbeat_interval_s,
                max_batch=MAX_BATCH,
            ),
        )
        self._retry_backlog(identity, producer)

    def _send_raw_producer(self, identity: bytes, msg: object) -> None:
        assert self._producers_sock is not None
        self._producers_sock.send(identity, encode(msg))

    def _send_producer(self, identity: bytes, producer: _Producer, frame: bytes) -> None:
        """Send, or keep the frame until the producer reads again (outcomes are never lost)."""
        assert self._producers_sock is not None
        if producer.backlog or not self._producers_sock.send(identity, frame):
            backlog = producer.backlog
            if not backlog:
                logger.info("producer not reading producer=%s: holding its frames", producer.key)
            backlog.append(frame)
            if len(backlog) > PRODUCER_BACKLOG:
                backlog.popleft()
                self._count("producer_backlog_overflow")

    def _retry_backlog(self, identity: bytes, producer: _Producer) -> None:
        assert self._producers_sock is not None
        backlog = producer.backlog
        while backlog and self._producers_sock.send(identity, backlog[0]):
            backlog.popleft()

    def _on_malformed_producer(self, identity: bytes) -> None:
        assert self._loop is not None
        self._invalid(identity, "multipart", "more than one frame", self.now(), worker=False)

    # ------------------------------------------------------------------ effects

    def _flush(self, now: float) -> None:
        """Send everything the core decided, coalesced; repeat while sending changes state."""
        core = self.core
        for _ in range(8):
            fx = core.take_effects()
            if not fx:
                break
            self._send_to_workers(fx, now)
            for key, outcomes in fx.outcomes.items():
                for lo in range(0, len(outcomes), MAX_BATCH):
                    chunk = outcomes[lo : lo + MAX_BATCH]
                    self._deliver(key, OutcomeBatch(outcomes=chunk) if len(chunk) > 1 else chunk[0])
            for key, tokens in fx.first_tokens.items():
                for token in tokens:
                    self._deliver(key, token)
            for key, report in fx.to_producer:
                self._deliver(key, report)
            for name in fx.disconnect:
                logger.info("worker forgotten name=%s", name)
        assert self._workers_sock is not None
        self._workers_sock.recheck()
        if self._producers_sock is not None:
            self._producers_sock.recheck()

    def _send_to_workers(self, fx: Effects, now: float) -> None:
        core = self.core
        sock = self._workers_sock
        assert sock is not None
        for name, producer, credits in fx.dispatch:
            identity = self._identity(name)
            for lo in range(0, len(credits), MAX_BATCH):
                chunk = credits[lo : lo + MAX_BATCH]
                if len(chunk) == 1:
                    frame = encode(Dispatch(producer=producer, credit=chunk[0]))
                else:
                    frame = encode(DispatchBatch(producer=producer, credits=chunk))
                if not sock.send(identity, frame):
                    # Never delivered: the core holds them for the worker's return (or its
                    # loss, after the grace period); nothing is dropped.
                    logger.warning("worker unreachable name=%s: holding its credits", name)
                    core.worker_disconnected(name, producer, chunk, now)
        for name, msg in fx.to_worker:
            if not sock.send(self._identity(name), encode(msg)) and name in core.workers:
                core.worker_disconnected(name, "", (), now)

    def _deliver(self, key: str, msg: object) -> None:
        identity = key.encode()
        producer = self.producers.get(identity)
        if producer is None:
            # A producer we have not seen (e.g. after our restart): create its slot so its
            # outcomes wait for it instead of vanishing.
            assert self._loop is not None
            producer = self.producers[identity] = _Producer(key, key, self.now())
        self._send_producer(identity, producer, encode(msg))

    # ------------------------------------------------------------------ bad input

    def _count(self, reason: str) -> None:
        self.invalid_messages[reason] = self.invalid_messages.get(reason, 0) + 1

    def _invalid(
        self, identity: bytes, reason: str, text: str, now: float, *, worker: bool
    ) -> None:
        self._count(reason)
        kind = "worker" if worker else "producer"
        # Counted per endpoint: garbage on the producer socket under a worker's name must not
        # bring that worker closer to being cut off.
        errors = self._errors.get((kind, identity))
        if errors is None:
            errors = self._errors[(kind, identity)] = _PeerErrors(now)
        errors.hit(now)
        suppressed = errors.loggable(now)
        if suppressed is not None:
            logger.warning(
                "invalid message from %s %r (%d more suppressed): %s",
                kind,
                identity,
                suppressed,
                text,
            )
        report = ErrorReport(code="invalid_message", message=text[:512])
        if worker:
            self._reply_worker(identity, report)
        else:
            self._send_raw_producer(identity, report)
        if errors.count > INVALID_LIMIT:
            logger.warning("cutting off %s %r: %d invalid messages", kind, identity, errors.count)
            errors.count = 0
            name = identity.decode("utf-8", "replace")
            if worker and name in self.core.workers:
                self.core.worker_unreachable(name, now)
            elif not worker and identity in self.producers:
                self.core.producer_gone(self.producers.pop(identity).key, now)


def _worker_owner(identity: bytes) -> str:
    """A worker's routing identity is its name, which its key must be bound to."""
    return identity.decode("utf-8", "replace")


def _producer_owner(identity: bytes) -> str:
    """A producer's routing identity is ``name/incarnation``; its key is bound to ``name``."""
    return identity.decode("utf-8", "replace").split("/", 1)[0]


def _version() -> str:
    try:
        return importlib.metadata.version("credit-router")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "0+unknown"


def new_incarnation() -> str:
    """A random id for this process start (told to peers in welcomes)."""
    return f"{uuid.uuid4().hex[:12]}-{int(time.time())}"
