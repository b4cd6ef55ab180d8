"""RouterService: the daemon around the core — sockets in, effects out, time passed in.

Life cycle (uvicorn's shape): ``startup()`` binds both endpoints and starts reading;
``main_loop()`` ticks (liveness, heartbeats, idle expiry, loop-lag measurement) until asked to
exit; ``shutdown()`` drains — no new credits, in-flight ones may finish until the deadline —
then ends everything left with an outcome, tells the workers which credits it ended
(``Cancel(revoked=True)``: they stop them and never report them, so no credit gets a second
outcome through the next router), and closes the sockets.

Every peer has a link (``router_service.links``), keyed by its exact routing-id bytes: its
handshake state, an ordered outbox (a ``Welcome`` precedes any ``Dispatch``; a frame the
transport cannot take yet waits in order, so the core never takes a dispatch back) and, for
workers, the completion sequence window that de-duplicates completions and ``Recovered`` in one
place. One wake-up of a socket is handled as a unit: every frame is decoded (in
``protocol.codec``, nowhere else), applied to the core, and then the core's effects are sent
once, coalesced: one frame per worker and producer, one ``Ack`` per worker. Bad input from a
peer is counted, answered with an ``ErrorReport`` and costs only that peer; a peer that keeps
sending it is cut off.

Identity: a worker's routing id is ``NAME`` or ``NAME/ANYTHING`` (the agent uses
``NAME/INCARNATION``), so two processes never share one; the name itself is held by one live
incarnation at a time (the core arbitrates: a second live holder is refused ``name_in_use``, a
superseded incarnation ``superseded``). A producer is known to the core by
``PRODUCER_NAME/INCARNATION`` from its hello; its credits, ledger and sessions are its own.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
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
    ADOPTED_TAG,
    MAX_IDS,
    Ack,
    Cancel,
    CancelCredits,
    ChildRelease,
    Completion,
    CompletionBatch,
    Credit,
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
    Outcome,
    OutcomeBatch,
    ProducerAdopted,
    ProducerHello,
    ProducerWelcome,
    Recovered,
    Refusal,
    ReleaseReservation,
    RouterToWorker,
    Status,
    Submit,
    SubmitBatch,
    Welcome,
)
from router_service import sdnotify
from router_service.core.router import Effects, RouterCore
from router_service.core.workers import WorkerState
from router_service.links import LinkState, ProducerLink, SeqWindows, WorkerLink
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
HELD_OUTCOMES: Final = 1_000_000
"""Outcome frames kept for a producer key that has no link yet (e.g. ``Recovered`` outcomes
that arrive at a restarted router before their producer said hello again)."""
DISCONNECT_RECHECK_S: Final = 0.05
"""After a worker's connection closed, when to ask again whether its routing id still has a
connection (the first answer may come before libzmq dropped the old one)."""
PRODUCERS_QUIET_S: Final = 0.25
"""At shutdown, the sockets close only once no producer frame came for this long (bounded by
a second): what arrives meanwhile is still answered, ``rejected: router_draining``."""
UNAUTHORIZED_REPLY_S: Final = 1.0
"""A peer whose key may not speak as its routing id is told so at most this often."""
REVOKE_WAIT_S: Final = 1.0
"""At shutdown, how long to wait for workers to confirm a ``Cancel(revoked=True)``."""
STALE_INCARNATION: Final = "stale_incarnation"
"""Outcome reason for credits addressed to an earlier router incarnation (they never ran)."""
INVALID_STATUS: Final = "invalid_status"
_ROUTER_OWNED: Final = frozenset({Status.LOST, Status.REJECTED})
"""Statuses only the router may give (ROUTING.md §6): a worker's completion with one of these
is refused and counted; the credit ends by the in-flight report rule instead."""


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
        producer_timeout_s: a producer silent this long is gone: its credits are cancelled
            and its sessions ended.
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
        self.workers: dict[bytes, WorkerLink] = {}
        """Worker links by routing id."""
        self._names: dict[str, WorkerLink] = {}
        """The link of each worker name the core knows (the live holder's)."""
        self.producers: dict[bytes, ProducerLink] = {}
        """Producer links by routing id."""
        self._producer_keys: dict[str, ProducerLink] = {}
        """Producer links by the key the core knows them by (``name/incarnation``)."""
        self._producer_rx_at = -math.inf
        """When the last producer frame arrived (the shutdown waits for a quiet moment)."""
        self._suspects: set[str] = set()
        """Workers logged as suspect (silent), until they answer again or leave."""
        self._told_unauthorized: dict[bytes, float] = {}
        """When each peer whose key may not speak as its routing id was last told so."""
        self._held_adopted: dict[str, list[int]] = {}
        """``ProducerAdopted`` credit ids for producers not connected yet (see ``_held``)."""
        self._held: dict[str, deque[bytes]] = {}
        """Frames for producer keys with no link (yet)."""
        self._held_since: dict[str, float] = {}
        self._seqs = SeqWindows()
        self._errors: dict[tuple[str, bytes], _PeerErrors] = {}
        self.should_exit = False
        self.force_exit = False
        self.ready = asyncio.Event()
        self.draining = False
        self.invalid_messages: dict[str, int] = {}
        """Invalid messages by reason (metrics read this)."""
        self.peer_events: dict[str, int] = {}
        """Peer-link events by kind (refusals by code, fenced, closed connections, stale
        submits, duplicate completions, held frames): metrics read this."""
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
        self._beat = encode(Heartbeat())
        self.http: StatusServer | None = (
            StatusServer(self, http_host, http_port) if http_port is not None else None
        )

    # ----------------------------------------------------------------- life cycle

    async def serve(self) -> None:
        """Run until asked to exit, then drain and close."""
        self.startup()
        try:
            if self.http is not None:
                await self.http.start()
        except BaseException:
            # The HTTP port may be taken: close the sockets (and an ipc:// file) we bound.
            self._close_sockets()
            raise
        self.ready.set()
        sdnotify.notify(sdnotify.READY)  # systemd Type=notify: bound and serving
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    def startup(self) -> None:
        """Bind both endpoints and start reading.

        Raises:
            router_service.transport.TransportError: an endpoint cannot be bound (in use, or
                an ``ipc://`` path another live router serves).
        """
        self._loop = asyncio.get_running_loop()
        self.core.start_clock(self.now())
        worker_curve = producer_curve = None
        if self._curve_keys is not None:
            assert self.allowlist is not None
            self._zap = ZapHandler(self._ctx, self.allowlist)
            self._zap.start_allowing()
            public, secret = self._curve_keys
            worker_curve = Curve(public, secret, lambda: self._allowed_names, _owner)
            if self.producer_endpoint.startswith("tcp://"):
                producer_curve = Curve(public, secret, lambda: self._allowed_names, _owner)
        self._workers_sock = RouterSocket(
            self._ctx,
            self.worker_endpoint,
            self._on_worker_frames,
            self._on_malformed_worker,
            curve=worker_curve,
            on_auth_failure=self._on_auth_failure,
            on_disconnect=self._on_worker_disconnect,
            on_unauthorized=self._on_unauthorized_worker,
        )
        try:
            self._producers_sock = RouterSocket(
                self._ctx,
                self.producer_endpoint,
                self._on_producer_frames,
                self._on_malformed_producer,
                curve=producer_curve,
                on_auth_failure=self._on_auth_failure,
                on_unauthorized=self._on_unauthorized_producer,
            )
        except BaseException:
            self._workers_sock.close()
            self._workers_sock = None
            raise
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
        """Tick until ``should_exit``: liveness, heartbeats, expiry, held frames."""
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
        core = self.core
        suspicions = core.stats.suspicions
        core.tick(now)
        if core.stats.suspicions != suspicions or self._suspects:
            self._log_suspects(now)
        self._flush_outboxes(self._names.values())
        if now - self._last_beat >= self.heartbeat_interval_s:
            self._last_beat = now
            self._beat_workers()
            self._tick_producers(now)
            self._prune_links(now)
            # Forget error counts of peers that have been quiet (one per identity would grow
            # without bound under a peer that keeps inventing identities).
            for peer, errors in list(self._errors.items()):
                if now - max(errors.window_start, errors.last_log) > INVALID_WINDOW_S + LOG_EVERY_S:
                    del self._errors[peer]
        self._flush(now)

    def _log_suspects(self, now: float) -> None:
        """One WARNING when a worker falls silent long enough to get nothing new (§6), so an
        operator sees the freeze before the loss it may become."""
        core = self.core
        workers = core.workers
        # (A closed connection makes its worker suspect too; that is logged where it closes.)
        suspects = {
            n
            for n, w in workers.items()
            if w.state is WorkerState.SUSPECT and w.closed_until is None
        }
        for name in sorted(suspects - self._suspects):
            worker = workers[name]
            logger.warning(
                "worker suspect name=%s: silent %.1f s, it gets no new credits; lost at %.1f s "
                "of silence (in flight %d)",
                name,
                now - worker.last_seen,
                core.lost_after_s,
                len(worker.tickets),
            )
        self._suspects = suspects

    def _heard(self, link: WorkerLink, now: float) -> None:
        """The first frame of a joined worker in this wake-up: it is alive (§6)."""
        silence = self.core.worker_seen(link.name, now)
        if silence and link.name in self._suspects:
            self._suspects.discard(link.name)
            logger.info("worker answered again name=%s after %.1f s of silence", link.name, silence)
        if link.outbox:
            self._flush_worker(link)

    def _beat_workers(self) -> None:
        assert self._workers_sock is not None
        send = self._workers_sock.send
        beat = self._beat
        for link in self._names.values():
            if not link.outbox:  # a beat is never queued: a late one says nothing
                send(link.identity, beat)

    def _prune_links(self, now: float) -> None:
        """Forget worker links that hold no name and have been quiet for a while (a restarted
        worker's old routing id, a peer that never joined, a fenced process): one per routing
        id would grow without bound. A fenced process that wakes up later is refused by the
        core, which remembers superseded incarnations."""
        names = self._names
        quiet = now - self.producer_timeout_s
        for identity, link in list(self.workers.items()):
            if link.last_seen < quiet and names.get(link.name) is not link:
                del self.workers[identity]

    def _tick_producers(self, now: float) -> None:
        """Beat, forget silent producers and the frames nobody came for."""
        assert self._producers_sock is not None
        send = self._producers_sock.send
        for identity, producer in list(self.producers.items()):
            if now - producer.last_seen > self.producer_timeout_s:
                # INFO: a producer that finished its run is silent too (it says no goodbye).
                logger.info("producer gone producer=%s (silent)", producer.key or identity)
                self._drop_producer(producer, now)
                continue
            if not producer.outbox and producer.state is LinkState.JOINED:
                send(identity, self._beat)  # never queued: a late beat says nothing
        for key, since in list(self._held_since.items()):
            if now - since > self.producer_timeout_s:
                # Nobody came for them: their producer is gone for good.
                self._held_adopted.pop(key, None)
                dropped = len(self._held.pop(key, deque()))
                del self._held_since[key]
                self._event("held_outcomes_dropped", dropped)
                logger.warning(
                    "dropped %d frames held for producer %s: it never came back", dropped, key
                )

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
        """Drain, end every remaining credit with an outcome, tell the workers, close."""
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
        # The workers were told which credits this router ended (Cancel revoked=True): wait,
        # bounded, for each to confirm (its InFlightReport), so that none of those credits is
        # completed later and forwarded a second time by the next router.
        give_up = loop.time() + REVOKE_WAIT_S
        while loop.time() < give_up and any(
            link.revoked for link in self.workers.values() if link.state is LinkState.JOINED
        ):
            await asyncio.sleep(0.02)
            self._flush_outboxes(self.workers.values())
        unconfirmed = [link.name for link in self.workers.values() if link.revoked]
        if unconfirmed:
            logger.warning(
                "workers did not confirm the credits this router ended: %s", sorted(unconfirmed)
            )
        # The last outcomes must reach producers that are still there: give any held back
        # a moment (bounded) before the sockets close. Keep reading until the producers have
        # been quiet for a moment too: a credit submitted just before we close would vanish
        # with the socket (its producer would wait out its recovery grace for nothing); read,
        # it is answered `rejected: router_draining` like every other since the drain began.
        give_up = loop.time() + 1.0
        while loop.time() < give_up and (
            any(p.outbox for p in self.producers.values())
            or self.now() - self._producer_rx_at < PRODUCERS_QUIET_S
        ):
            self._flush_outboxes(self.workers.values())
            await asyncio.sleep(0.02)
        self._close_sockets()
        if self.http is not None:
            await self.http.stop()
        logger.info("router stopped")

    def _close_sockets(self) -> None:
        for sock in (self._workers_sock, self._producers_sock):
            if sock is not None:
                sock.close()
        self._workers_sock = self._producers_sock = None
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
        if self._own_context:
            self._ctx.term()

    def _flush_outboxes(self, workers: Iterable[WorkerLink]) -> None:
        """Hand over what the producers' links and these worker links hold."""
        if self._producers_sock is not None:
            psend = self._producers_sock.send
            for producer in self.producers.values():
                if producer.outbox:
                    producer.flush(psend)
        for link in list(workers):
            if link.outbox:
                self._flush_worker(link)

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
            for producer in list(self.producers.values()):
                if producer.name == name:
                    self._drop_producer(producer, now)
        self._flush(now)

    def _on_auth_failure(self, who: str, why: str) -> None:
        self.auth_failures += 1
        now = self.now()
        # Rate-limited per host and reason (a refused peer retries every half second), not
        # for all peers at once: a second bad peer must not hide behind the first.
        key = ("auth", f"{who.rsplit(':', 1)[0]} {why}".encode())
        errors = self._errors.get(key)
        if errors is None:
            errors = self._errors[key] = _PeerErrors(now)
        suppressed = errors.loggable(now)
        if suppressed is not None:
            logger.warning(
                "authentication failure peer=%s: %s (%d more suppressed)", who, why, suppressed
            )

    def _on_unauthorized_worker(self, identity: bytes, why: str) -> None:
        self._refuse_unauthorized(identity, why, worker=True)

    def _on_unauthorized_producer(self, identity: bytes, why: str) -> None:
        self._refuse_unauthorized(identity, why, worker=False)

    def _refuse_unauthorized(self, identity: bytes, why: str, *, worker: bool) -> None:
        """A peer whose key passed the handshake but may not speak as its routing id (bound
        to another name, or removed by a key reload): its frames are dropped; tell it why,
        at most once a second per peer, so that it exits with the reason instead of saying
        hello into silence forever."""
        now = self.now()
        told = self._told_unauthorized
        last = told.get(identity)
        if last is not None and now - last < UNAUTHORIZED_REPLY_S:
            return
        if len(told) >= 10_000:  # bounded: routing ids are the peer's choice
            told.clear()
        told[identity] = now
        self._event("refused_unauthorized")
        sock = self._workers_sock if worker else self._producers_sock
        if sock is not None:
            refusal = Refusal(
                reason=f"not authorized: {why} (check this peer's --curve-key and its name "
                "against the router's --curve-allowed-keys)",
                router_version=PROTOCOL_VERSION,
                peer_version=PROTOCOL_VERSION,
                code="unauthorized",
            )
            sock.send(identity, encode(refusal))

    def _on_worker_disconnect(self, identity: bytes, recheck: bool = True) -> None:
        link = self.workers.get(identity)
        if link is None or link.state is not LinkState.JOINED:
            return
        # The monitor says a connection of this routing id closed; the same process may have
        # reconnected already (a new connection takes the id over). A send tells which.
        if self._workers_sock is None:
            return  # closed meanwhile
        gone = link.outbox or not self._workers_sock.send(identity, self._beat)
        if not gone and recheck and self._loop is not None:
            # libzmq reports the close before the socket drops the peer's pipe (a round trip
            # between its threads): a send right now may still be taken. Ask again shortly.
            self._loop.call_later(DISCONNECT_RECHECK_S, self._on_worker_disconnect, identity, False)
            return
        if gone and self._names.get(link.name) is link and link.name in self.core.workers:
            self._event("worker_connection_closed")
            logger.info("worker connection closed name=%s", link.name)
            self.core.worker_closed(link.name, self.now())
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

    def _event(self, kind: str, count: int = 1) -> None:
        self.peer_events[kind] = self.peer_events.get(kind, 0) + count

    # ---------------------------------------------------------------- workers

    def _on_worker_frames(self, frames: Frames) -> None:
        assert self._loop is not None
        now = self.now()
        acks: dict[WorkerLink, int] = {}
        seen: set[WorkerLink] = set()
        links = self.workers
        for identity, payload in frames:
            try:
                msg = decode_worker_to_router(payload)
            except DecodeError as exc:
                self._invalid(identity, exc.reason, str(exc), now, worker=True)
                continue
            link = links.get(identity)
            if link is None:
                link = links[identity] = WorkerLink(identity, now)
                assert self._workers_sock is not None
                link.address = self._workers_sock.peer_address(identity)
            link.last_seen = now
            if type(msg) is Hello:
                self._hello(link, msg, now)
                continue
            if link.state is LinkState.FENCED:
                self._refuse(link, "superseded", _fenced_reason(link), msg_version=PROTOCOL_VERSION)
                continue
            if link.state is not LinkState.JOINED or self._names.get(link.name) is not link:
                self._to_worker_identity(
                    link, ErrorReport(code="unknown_worker", message="send Hello first")
                )
                continue
            if link not in seen:
                seen.add(link)
                self._heard(link, now)
            try:
                self._worker_message(link, msg, now, acks)
            except Exception:
                # A bug of ours must not take the router down with one peer's message.
                logger.exception(
                    "internal error handling %s from %s", type(msg).__name__, link.name
                )
                self._count("internal_error")
        self._flush(now)
        # Acks leave after the outcomes they cover were handed to the transport, in the same
        # wake-up: an ack sent first would, if the router died in between, lose the outcome for
        # good (the worker never resends it); an ack held longer would, if it died after the
        # outcome left, have the worker resend it to the next router, which would forward it a
        # second time. Either window is now the gap between two sends.
        for link, seq in acks.items():
            if link.state is LinkState.JOINED:
                self._to_worker_identity(link, Ack(seq=seq))

    def _worker_message(
        self, link: WorkerLink, msg: object, now: float, acks: dict[WorkerLink, int]
    ) -> None:
        core = self.core
        name = link.name
        match msg:
            case CompletionBatch(completions=completions):
                self._completions(link, completions, None, now, acks)
            case Completion():
                self._completions(link, (msg,), None, now, acks)
            case Recovered(router_incarnation=incarnation, completions=completions):
                self._completions(link, completions, incarnation, now, acks)
            case FirstToken(producer=producer, credit_id=cid, ttft_s=ttft):
                core.first_token(name, producer, cid, ttft)
            case ChildRelease(x_correlation_id=child, producer=producer):
                core.child_release(name, producer, child, now)
            case InFlightReport(credits=credits):
                link.revoked = False
                core.worker_report(name, credits, now)
            case Draining(deadline_s=deadline):
                logger.info("worker draining name=%s deadline_s=%.1f", name, deadline)
                core.worker_draining(name, deadline, now)
            case Goodbye(reason=reason):
                logger.info("worker left name=%s reason=%s", name, reason or "-")
                core.worker_left(name, now)
            case Heartbeat():
                pass

    def _completions(
        self,
        link: WorkerLink,
        completions: Iterable[Completion],
        recovered_from: str | None,
        now: float,
        acks: dict[WorkerLink, int],
    ) -> None:
        fresh = self._fresh(link, completions, acks)
        if not fresh:
            return
        if recovered_from is None or recovered_from == self.core.router_incarnation:
            # (A Recovered naming us is a confused worker: ordinary completions.)
            self.core.complete(link.name, fresh, now)
        else:
            self.core.recovered(link.name, fresh, now)

    def _fresh(
        self, link: WorkerLink, completions: Iterable[Completion], acks: dict[WorkerLink, int]
    ) -> list[Completion]:
        """The completions not seen before from this worker incarnation, with statuses a
        worker may send; every one (seen or not) is acknowledged."""
        window = self._seqs.get(link.name, link.incarnation)
        top = acks.get(link, 0)
        fresh = []
        for done in completions:
            seq = done.seq
            if seq > top:
                top = seq
            if not window.fresh(seq):
                self._event("duplicate_completions")
                continue
            if done.status in _ROUTER_OWNED:
                self._count(INVALID_STATUS)
                self._event("router_owned_status")
                self._to_worker_identity(
                    link,
                    ErrorReport(
                        code=INVALID_STATUS,
                        message=f"credit {done.producer}/{done.credit_id}: a worker may not "
                        f"report {done.status.value!r} (only completed, failed, cancelled)",
                    ),
                )
                continue
            fresh.append(done)
        if top:
            acks[link] = top
        return fresh

    def _hello(self, link: WorkerLink, msg: Hello, now: float) -> None:
        identity = link.identity
        owner = _owner(identity)
        if msg.name != owner:
            # The routing id is NAME or NAME/ANYTHING; under CURVE the key owns NAME.
            self._refuse(
                link,
                "name_mismatch",
                f"hello name {msg.name!r} does not match routing id {owner!r} "
                "(the routing id must be NAME or NAME/INCARNATION)",
                msg_version=msg.protocol_version,
            )
            return
        if link.state is LinkState.FENCED:
            self._refuse(link, "superseded", _fenced_reason(link), msg_version=msg.protocol_version)
            return
        holder = self._names.get(msg.name)
        known = msg.name in self.core.workers
        if link.outbox:
            # Held while the peer was away: they follow the Welcome this hello will get.
            link.after_welcome.extend(link.outbox)
            link.outbox.clear()
        stats = self.core.stats
        adopted, refused = stats.adopted, stats.adoptions_refused
        admitted = self.core.worker_hello(
            msg.name,
            incarnation=msg.incarnation,
            protocol_version=msg.protocol_version,
            capacity=msg.capacity,
            labels=msg.labels,
            in_flight=msg.in_flight,
            now=now,
        )
        refusal = None if admitted else self.core.last_refusal
        if refusal is not None:
            self._event(f"refused_{refusal.code or 'other'}")
            if refusal.code == "name_in_use" and holder is not None:
                logger.warning(
                    "worker name conflict name=%s: %s (incarnation %s) holds it, %s "
                    "(incarnation %s) refused",
                    msg.name,
                    holder.address,
                    holder.incarnation,
                    link.address,
                    msg.incarnation,
                )
            else:
                logger.warning(
                    "worker refused name=%s peer=%s: %s", msg.name, link.address, refusal.reason
                )
            if refusal.code == "superseded":
                link.state = LinkState.FENCED
            self._to_worker_identity(link, refusal)
            return
        if holder is not None and holder is not link:
            # A new incarnation took the name from one that was not live: fence the old
            # process, so that it exits when it wakes up instead of taking the name back.
            holder.state = LinkState.FENCED
            holder.outbox.clear()
            self._event("fenced")
            logger.warning(
                "worker replaced name=%s: %s (incarnation %s) superseded by %s (incarnation %s)",
                msg.name,
                holder.address,
                holder.incarnation,
                link.address,
                msg.incarnation,
            )
        link.state = LinkState.JOINED
        link.name = msg.name
        link.incarnation = msg.incarnation
        self._names[msg.name] = link
        logger.info(
            "worker %s name=%s incarnation=%s capacity=%d peer=%s labels=%s",
            "reconnected" if known and holder is link else "joined",
            msg.name,
            msg.incarnation,
            msg.capacity,
            link.address,
            msg.labels,
        )
        adopted, refused = stats.adopted - adopted, stats.adoptions_refused - refused
        if adopted or refused:
            # A restarted router takes over what its predecessor dispatched there; what it
            # cannot take (beyond the capacity, already known) is given up by its producers.
            logger.log(
                logging.WARNING if refused else logging.INFO,
                "worker %s still runs credits of an earlier router: adopted=%d not_adopted=%d",
                msg.name,
                adopted,
                refused,
            )

    def _refuse(self, link: WorkerLink, code: str, reason: str, *, msg_version: int) -> None:
        self._event(f"refused_{code}")
        self._to_worker_identity(
            link,
            Refusal(
                reason=reason,
                router_version=PROTOCOL_VERSION,
                peer_version=msg_version,
                code=code,
            ),
        )

    def _to_worker_identity(self, link: WorkerLink, msg: object) -> None:
        """Send a reply to this very link (not to whoever holds its name)."""
        assert self._workers_sock is not None
        link.send(encode(msg), self._workers_sock.send)

    def _flush_worker(self, link: WorkerLink) -> None:
        assert self._workers_sock is not None
        link.flush(self._workers_sock.send)
        if link.overflowing and link.name in self.core.workers:
            logger.warning(
                "worker not reading name=%s: %d frames held; it is lost",
                link.name,
                len(link.outbox),
            )
            self._event("worker_outbox_overflow")
            link.outbox.clear()
            self.core.worker_unreachable(link.name, self.now())

    def _on_malformed_worker(self, identity: bytes) -> None:
        assert self._loop is not None
        self._invalid(identity, "multipart", "more than one frame", self.now(), worker=True)

    # --------------------------------------------------------------- producers

    def _on_producer_frames(self, frames: Frames) -> None:
        assert self._loop is not None
        now = self.now()
        self._producer_rx_at = now
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
        if type(msg) is ProducerHello:
            self._producer_hello(identity, msg, now)
            return
        link = self.producers.get(identity)
        if link is None or link.state is not LinkState.JOINED:
            self._reply_producer(
                identity, ErrorReport(code="hello_required", message="send ProducerHello first")
            )
            self._count("unknown_producer")
            return
        link.last_seen = now
        core = self.core
        key = link.key
        match msg:
            case SubmitBatch(credits=credits, router_incarnation=incarnation):
                if self._stale(link, credits, incarnation):
                    return
                core.submit(key, credits, now)  # the decoder bounds its length
            case Submit(credit=credit, router_incarnation=incarnation):
                if self._stale(link, (credit,), incarnation):
                    return
                core.submit(key, (credit,), now)
            case CancelCredits(credit_ids=ids):
                core.cancel(key, ids, now)
            case EndSession(x_correlation_id=session, reason=reason):
                core.end_session(key, session, now, reason)
            case ReleaseReservation(x_correlation_id=session, count=count):
                core.release_reservation(key, session, count, now)
            case Heartbeat():
                pass
        if link.outbox and self._producers_sock is not None:
            link.flush(self._producers_sock.send)

    def _stale(self, link: ProducerLink, credits: Iterable[Credit], incarnation: str) -> bool:
        """Credits addressed to another router incarnation never ran anywhere: end them here
        (``rejected: stale_incarnation``), once, rather than run them under a router their
        producer does not expect to hear from. Returns whether the frame was stale."""
        if not incarnation or incarnation == self.core.router_incarnation:
            return False
        outcomes = [
            Outcome(credit_id=c.id, status=Status.REJECTED, reason=STALE_INCARNATION)
            for c in credits
        ]
        self._event("stale_submits", len(outcomes))
        logger.info(
            "producer %s sent %d credits addressed to router incarnation %s: rejected",
            link.key,
            len(outcomes),
            incarnation,
        )
        self._deliver_outcomes(link.key, outcomes)
        return True

    def _producer_hello(self, identity: bytes, msg: ProducerHello, now: float) -> None:
        if msg.protocol_version != PROTOCOL_VERSION:
            logger.warning(
                "producer refused producer=%s version=%d (router speaks %d)",
                msg.producer,
                msg.protocol_version,
                PROTOCOL_VERSION,
            )
            self._event("refused_version_mismatch")
            self._reply_producer(
                identity,
                Refusal(
                    reason=f"protocol version mismatch: router speaks {PROTOCOL_VERSION}, "
                    f"producer speaks {msg.protocol_version}",
                    router_version=PROTOCOL_VERSION,
                    peer_version=msg.protocol_version,
                    code="version_mismatch",
                ),
            )
            return
        # The key the core knows this producer by: its name and this process's incarnation
        # (a producer that gives none is one incarnation per routing id).
        key = f"{msg.producer}/{msg.incarnation or identity.hex()}"
        link = self.producers.get(identity)
        if link is not None and link.key and link.key != key:
            # A new incarnation under the same routing id: a new producer. The old one's
            # credits and sessions end; none of its outcomes reach the new one.
            logger.info("producer restarted producer=%s old=%s new=%s", msg.producer, link.key, key)
            self._drop_producer(link, now)
            link = None
        if link is None:
            previous = self._producer_keys.get(key)
            link = ProducerLink(identity, now)
            if previous is not None and previous.identity != identity:
                # The same producer incarnation from another routing id (it reconnected with
                # a fresh socket): it moves, keeping its credits and what was held for it.
                del self.producers[previous.identity]
                link.outbox.extend(previous.outbox)
            self.producers[identity] = link
            if previous is None:
                logger.info("producer connected producer=%s key=%s", msg.producer, key)
        link.state = LinkState.JOINED
        link.name = msg.producer
        link.incarnation = msg.incarnation
        link.understands = frozenset(msg.understands)
        link.key = key
        link.last_seen = now
        self._producer_keys[key] = link
        assert self._producers_sock is not None
        link.send(
            encode(
                ProducerWelcome(
                    router_incarnation=self.core.router_incarnation,
                    protocol_version=PROTOCOL_VERSION,
                    heartbeat_interval_s=self.heartbeat_interval_s,
                    max_batch=MAX_BATCH,
                )
            ),
            self._producers_sock.send,
        )
        adopted = self._held_adopted.pop(key, None)
        if adopted:
            self._deliver_adopted(key, adopted)
        held = self._held.pop(key, None)
        self._held_since.pop(key, None)
        if held:
            link.outbox.extend(held)
            link.flush(self._producers_sock.send)

    def _drop_producer(self, link: ProducerLink, now: float) -> None:
        """The producer is gone (silent, cut off, or replaced by a new incarnation)."""
        self.producers.pop(link.identity, None)
        if link.key and self._producer_keys.get(link.key) is link:
            del self._producer_keys[link.key]
            self.core.producer_gone(link.key, now)

    def _reply_producer(self, identity: bytes, msg: object) -> None:
        self._reply(identity, msg, worker=False)

    def _reply(self, identity: bytes, msg: object, *, worker: bool) -> None:
        """Answer ``identity`` on its endpoint: behind what its link holds, or at once if it
        has none (a peer that never said hello)."""
        sock = self._workers_sock if worker else self._producers_sock
        assert sock is not None
        link = (self.workers if worker else self.producers).get(identity)
        if link is not None:
            link.send(encode(msg), sock.send)
        else:
            sock.send(identity, encode(msg))

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
            self._send_to_workers(fx)
            for key, outcomes in fx.outcomes.items():
                self._deliver_outcomes(key, outcomes)
            for key, tokens in fx.first_tokens.items():
                for token in tokens:
                    self._deliver(key, encode(token))
            for key, report in fx.to_producer:
                if type(report) is ProducerAdopted:
                    self._deliver_adopted(key, report.credit_ids)
                else:
                    self._deliver(key, encode(report))
            for gone in fx.departed:
                # One line an operator can act on: who, why, and what it cost.
                logger.log(
                    logging.WARNING
                    if gone.credits or gone.reason != "worker_left"
                    else logging.INFO,
                    "worker left the fleet name=%s reason=%s credits_ended=%d sessions_lost=%d",
                    gone.name,
                    gone.reason,
                    gone.credits,
                    gone.sessions,
                )
            for name in fx.disconnect:
                link = self._names.pop(name, None)
                if link is not None:
                    # Whatever it still held is accounted for by the core (lost outcomes).
                    link.outbox.clear()
                    link.state = LinkState.NEW
                logger.debug("worker forgotten name=%s", name)
        # (No recheck for input here: every send schedules one on its socket, ``_sent``.)

    def _send_to_workers(self, fx: Effects) -> None:
        """Each worker's messages, in the order the core decided them."""
        names = self._names
        sock = self._workers_sock
        assert sock is not None
        send = sock.send
        for name, item in fx.to_worker:
            link = names.get(name)
            if link is None:
                continue  # a worker the core just forgot: nothing more goes to it
            if isinstance(item, tuple):
                producer, credits = item
                for lo in range(0, len(credits), MAX_BATCH):
                    chunk = credits[lo : lo + MAX_BATCH]
                    if len(chunk) == 1:
                        frame = encode(Dispatch(producer=producer, credit=chunk[0]))
                    else:
                        frame = encode(DispatchBatch(producer=producer, credits=chunk))
                    if not link.send(frame, send):
                        self._held_for(link)
            else:
                msg: RouterToWorker = item
                if type(msg) is Refusal:
                    continue  # for the peer whose hello was refused: _hello sent it there
                if type(msg) is Welcome and link.after_welcome:
                    link.send(encode(msg), send)
                    for frame in link.after_welcome:
                        link.send(frame, send)
                    link.after_welcome.clear()
                    continue
                if type(msg) is Cancel and msg.revoked:
                    link.revoked = True
                if not link.send(encode(msg), send):
                    self._held_for(link)

    def _held_for(self, link: WorkerLink) -> None:
        if len(link.outbox) == 1:
            self._event("worker_frames_held")
            logger.info("worker not reachable now name=%s: holding its frames", link.name)
        if link.overflowing:
            self._flush_worker(link)

    def _deliver_outcomes(self, key: str, outcomes: list[Outcome]) -> None:
        for lo in range(0, len(outcomes), MAX_BATCH):
            chunk = outcomes[lo : lo + MAX_BATCH]
            self._deliver(key, encode(OutcomeBatch(outcomes=chunk) if len(chunk) > 1 else chunk[0]))

    def _deliver_adopted(self, key: str, credit_ids: list[int]) -> None:
        """Tell a producer which of its credits this router took over (``ProducerAdopted``),
        if it reads that message (§9 rule 4); one that does not gives them up after its
        recovery grace, as before. Held until its hello when it is not connected yet."""
        link = self._producer_keys.get(key)
        if link is None:
            self._held_adopted.setdefault(key, []).extend(credit_ids)
            self._held_since.setdefault(key, self.now())
            return
        if ADOPTED_TAG not in link.understands:
            self._event("adopted_not_told")
            return
        for lo in range(0, len(credit_ids), MAX_IDS):
            self._deliver(key, encode(ProducerAdopted(credit_ids=credit_ids[lo : lo + MAX_IDS])))

    def _deliver(self, key: str, frame: bytes) -> None:
        link = self._producer_keys.get(key)
        if link is not None:
            assert self._producers_sock is not None
            if not link.send(frame, self._producers_sock.send) and link.overflowing:
                link.outbox.popleft()
                self._count("producer_backlog_overflow")
            return
        # No link for this key (yet): e.g. a Recovered outcome at a restarted router, before
        # its producer said hello again. Hold it until it does (bounded, and forgotten if it
        # never comes back).
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = deque()
            self._held_since[key] = self.now()
        held.append(frame)
        if len(held) > HELD_OUTCOMES:
            held.popleft()
            self._count("producer_backlog_overflow")

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
        self._reply(
            identity, ErrorReport(code="invalid_message", message=text[:512]), worker=worker
        )
        if errors.count > INVALID_LIMIT:
            logger.warning("cutting off %s %r: %d invalid messages", kind, identity, errors.count)
            errors.count = 0
            if worker:
                link = self.workers.get(identity)
                if link is not None and self._names.get(link.name) is link:
                    self.core.worker_unreachable(link.name, now)
            else:
                producer = self.producers.get(identity)
                if producer is not None:
                    self._drop_producer(producer, now)


def _owner(identity: bytes) -> str:
    """The name a routing identity belongs to: ``NAME`` of ``NAME`` or ``NAME/ANYTHING``.

    Workers' and producers' keys are bound to that name under CURVE."""
    return identity.split(b"/", 1)[0].decode("utf-8", "replace")


def _fenced_reason(link: WorkerLink) -> str:
    return (
        f"worker {link.name!r} incarnation {link.incarnation!r} was superseded by a newer "
        "incarnation of the same name; this process must exit"
    )


def _version() -> str:
    try:
        return importlib.metadata.version("credit-router")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "0+unknown"


def new_incarnation() -> str:
    """A random id for this process start (told to peers in welcomes)."""
    return f"{uuid.uuid4().hex[:12]}-{int(time.time())}"
