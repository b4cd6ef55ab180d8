"""The worker's ZeroMQ DEALER: every socket decision of the worker agent lives in this module.

Rules:

* Socket objects never leave this module. The agent sees ``send(frame)``, a callback that gets
  the frames of one wakeup as a list, ``discard_backlog()`` and ``close()`` (the ``Transport``
  protocol), and ``worker_agent.errors`` exceptions: every ``zmq.ZMQError`` is mapped here.
* No per-message ``await``: the socket's ``ZMQ_FD`` is registered with ``loop.add_reader`` and
  drained with ``recv(NOBLOCK)`` until ``zmq.Again``.
  ``ZMQ_FD`` is edge-triggered: it signals only when the socket's command mailbox gets
  something, and any ``send``/``recv``/``EVENTS`` call may consume that edge. So we drain once
  right after ``add_reader``, always drain to ``EAGAIN``, re-check ``EVENTS & POLLIN`` after the
  callback has sent, and schedule a drain ourselves (``call_soon``) after sends made outside it.
* Fixed-shape calls with plain-int flags: one frame per message in both directions
  (PROTOCOL.md §2), so ``recv()``/``send()`` once per message, never the multipart sugar and
  never ``copy=False`` (slower for frames this small).
* Overflow policy: a ``send`` that meets ``zmq.Again`` (peer not connected, which ``IMMEDIATE``
  makes immediate, or ``SNDHWM`` reached) keeps the frame in a bounded local backlog, in order,
  and retries on the next wakeup (``POLLOUT`` shows up as an FD edge) and on a short timer. A
  full backlog drops the newest frame and counts it. Nothing is lost for good by this: the
  agent keeps every completion until it is acknowledged and resends it after a re-hello, and
  every other worker message is periodic (heartbeat, report), optional (first token),
  idempotent (child release) or resent by the re-hello itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

import zmq

from credit_common.zmqmon import ConnectionWatch
from worker_agent.errors import TransportClosedError, TransportError

__all__ = [
    "BACKLOG_MAX_FRAMES",
    "DealerTransport",
    "ErrorHandler",
    "FrameHandler",
    "Transport",
]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ constants

SOCKET_TYPE: Final = zmq.DEALER
"""DEALER to the router's ROUTER (PROTOCOL.md §1): asynchronous both ways, no REQ lock-step."""

IMMEDIATE: Final = 1
"""Queue only on completed connections: while the router is unreachable a send fails at once
(``Again``) into our own backlog, instead of piling stale frames into a pipe that libzmq would
deliver, ahead of our re-hello, to whatever router answers next."""

RECONNECT_IVL_MS: Final = 100
"""First reconnect attempt 100 ms after a drop: a restarted router is found quickly."""

RECONNECT_IVL_MAX_MS: Final = 500
"""libzmq doubles the interval up to this (exponential back-off): short enough that a restarted
router has its workers back within about a second, long enough that a fleet retrying one address
costs nothing."""

CONNECT_TIMEOUT_MS: Final = 2_000
"""Give up a TCP connect after 2 s and retry, instead of the OS default (minutes) when SYNs to a
dead or black-holed host go unanswered."""

SNDHWM: Final = 1_000
"""Bounded: our frames are batched (one completion frame per loop iteration), so 1000 queued
frames means the router is not reading; past that, frames wait in our bounded backlog."""

RCVHWM: Final = 10_000
"""Bounded, so a runaway router cannot grow our memory without limit; far above what the protocol
sends (at most ``capacity`` credits in flight, dispatches batched per frame), so it only bites if
our loop stalls, and then it pushes back into the router's own per-peer queue."""

BACKLOG_MAX_FRAMES: Final = 10_000
"""Local backlog for frames that met ``Again``; when full the newest frame is dropped and counted
(see the overflow policy above: nothing that matters is lost for good)."""

BACKLOG_RETRY_S: Final = 0.05
"""Retry the backlog on this timer too: ``POLLOUT`` arrives as an FD edge, but a timer costs
nothing and guarantees progress whatever libzmq signals."""

LINGER_MS: Final = 500
"""On close, give the last frames (completions, ``Goodbye``) half a second to leave, bounded so a
dead router cannot hold our exit."""

HEARTBEAT_IVL_MS: Final = 1_000
"""ZMTP PING every second: detects a dead peer host or a half-open TCP connection, which the
application never would while it has nothing to send, and makes libzmq reconnect."""

HEARTBEAT_TIMEOUT_MS: Final = 5_000
"""No traffic at all for 5 s after a PING: the connection is dead, drop it and reconnect."""

HEARTBEAT_TTL_MS: Final = 10_000
"""Tells the router's side to drop the connection if it hears nothing from us for 10 s (our
process or host died without closing the socket)."""

MAXMSGSIZE: Final = 16 * 1024 * 1024
"""The protocol's frame bound (PROTOCOL.md §4.1): a larger frame is a broken or hostile peer, and
libzmq drops the connection instead of allocating it."""

TCP_KEEPALIVE: Final = 1
TCP_KEEPALIVE_IDLE_S: Final = 30
TCP_KEEPALIVE_INTVL_S: Final = 10
TCP_KEEPALIVE_CNT: Final = 3
"""Kernel keepalive (probe after 30 s idle, every 10 s, 3 misses): keeps NAT and firewall state
alive and catches dead peers even if ZMTP heartbeats were disabled on the other side."""

MAX_FRAMES_PER_WAKEUP: Final = 4_096
"""Hand at most this many frames to the agent per callback, then yield to the loop (timers,
executions) and come back with ``call_soon``: fairness without a per-message await."""

_NOBLOCK: Final = int(zmq.NOBLOCK)  # plain ints: IntFlag arithmetic costs ~0.6 µs a call
_POLLIN: Final = int(zmq.POLLIN)
_EVENTS: Final = int(zmq.EVENTS)

_OPTIONS: Final[tuple[tuple[int, int], ...]] = (
    (int(zmq.IMMEDIATE), IMMEDIATE),
    (int(zmq.RECONNECT_IVL), RECONNECT_IVL_MS),
    (int(zmq.RECONNECT_IVL_MAX), RECONNECT_IVL_MAX_MS),
    (int(zmq.CONNECT_TIMEOUT), CONNECT_TIMEOUT_MS),
    (int(zmq.SNDHWM), SNDHWM),
    (int(zmq.RCVHWM), RCVHWM),
    (int(zmq.LINGER), LINGER_MS),
    (int(zmq.HEARTBEAT_IVL), HEARTBEAT_IVL_MS),
    (int(zmq.HEARTBEAT_TIMEOUT), HEARTBEAT_TIMEOUT_MS),
    (int(zmq.HEARTBEAT_TTL), HEARTBEAT_TTL_MS),
    (int(zmq.MAXMSGSIZE), MAXMSGSIZE),
    (int(zmq.TCP_KEEPALIVE), TCP_KEEPALIVE),
    (int(zmq.TCP_KEEPALIVE_IDLE), TCP_KEEPALIVE_IDLE_S),
    (int(zmq.TCP_KEEPALIVE_INTVL), TCP_KEEPALIVE_INTVL_S),
    (int(zmq.TCP_KEEPALIVE_CNT), TCP_KEEPALIVE_CNT),
)

FrameHandler = Callable[[list[bytes]], None]
"""Receives the frames of one wakeup, in arrival order. It may call ``send``."""

ErrorHandler = Callable[[TransportError], None]
"""Told once when the socket fails for good (the transport stops reading)."""


class Transport(Protocol):
    """What the agent needs from a transport: the seam between the agent and ZeroMQ."""

    def send(self, frame: bytes) -> None:
        """Send one frame, or keep it in the backlog. Raises ``TransportClosedError``."""
        ...

    def discard_backlog(self) -> int:
        """Forget frames not yet handed to the socket; returns how many."""
        ...

    def close(self) -> None:
        """Stop reading and close the socket (idempotent)."""
        ...


class DealerTransport:
    """A connected DEALER driven by the event loop's reader callback.

    Constructing it connects (libzmq connects in the background and keeps reconnecting), so it
    must be built on the loop that will run it.

    Args:
        endpoint: the router's worker endpoint, e.g. ``tcp://10.0.0.5:5555``.
        routing_id: the worker's name; its UTF-8 bytes become ``ZMQ_ROUTING_ID`` (1–255 bytes,
            not starting with a zero byte, a libzmq rule).
        on_frames: called with the frames of each wakeup.
        on_error: called once if the socket fails for good.
        loop: the event loop; the running loop when omitted.
        backlog_max: bound of the local backlog (frames).
        curve: ``(router public, own public, own secret)`` Z85 keys for CurveZMQ, or
            ``None`` for plaintext.

    Raises:
        ValueError: the routing id is empty, too long or starts with a zero byte.
        TransportError: libzmq rejected an option or the endpoint.
    """

    def __init__(
        self,
        endpoint: str,
        routing_id: str,
        on_frames: FrameHandler,
        *,
        on_error: ErrorHandler | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        backlog_max: int = BACKLOG_MAX_FRAMES,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        identity = routing_id.encode("utf-8")
        if not 0 < len(identity) <= 255 or identity[0] == 0:
            raise ValueError(
                f"worker name must be 1-255 bytes of UTF-8 not starting with NUL: {routing_id!r}"
            )
        self.endpoint = endpoint
        self._on_frames = on_frames
        self._on_error = on_error
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._backlog: deque[bytes] = deque()
        self._backlog_max = backlog_max
        self._scheduled = False
        self._in_pump = False
        self._retry: asyncio.TimerHandle | None = None
        self.frames_sent = 0
        self.frames_received = 0
        self.frames_dropped = 0
        """Frames dropped because the backlog was full."""
        self._ctx = zmq.Context(io_threads=1)
        try:
            sock = self._ctx.socket(SOCKET_TYPE)
            try:
                sock.setsockopt(int(zmq.ROUTING_ID), identity)
                for option, value in _OPTIONS:
                    sock.setsockopt(option, value)
                if curve is not None:
                    # CurveZMQ: the router's public key, then this worker's key pair (whose
                    # name in the router's allowlist must be this worker's name).
                    sock.setsockopt(int(zmq.CURVE_SERVERKEY), curve[0])
                    sock.setsockopt(int(zmq.CURVE_PUBLICKEY), curve[1])
                    sock.setsockopt(int(zmq.CURVE_SECRETKEY), curve[2])
                sock.connect(endpoint)
                fd = sock.fileno()  # ZMQ_FD: the edge-triggered notification descriptor
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
        except zmq.ZMQError as exc:
            self._ctx.term()
            raise TransportError(endpoint, f"cannot connect: {exc}", exc.errno) from None
        self._sock: zmq.Socket[bytes] | None = sock
        self._fd = fd
        self._watch: ConnectionWatch | None = None
        self._loop.add_reader(fd, self._service)
        # Edge-triggered FD: a pipe the socket has not yet seen empty never signals, so drain
        # once now rather than wait for an edge that may never come.
        self._schedule()
        logger.info("transport connecting endpoint=%s routing_id=%s", endpoint, routing_id)

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        return (
            f"<DealerTransport {self.endpoint} {state} backlog={len(self._backlog)} "
            f"sent={self.frames_sent} received={self.frames_received} "
            f"dropped={self.frames_dropped}>"
        )

    @property
    def backlog(self) -> int:
        """Frames waiting in the local backlog."""
        return len(self._backlog)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called or the socket failed."""
        return self._sock is None

    # ------------------------------------------------------------------------------ sending

    def send(self, frame: bytes) -> None:
        """Send one frame now, or keep it in the backlog (in order) if the socket would block.

        Raises:
            TransportClosedError: the transport is closed.
            TransportError: libzmq failed with something other than ``Again``.
        """
        sock = self._sock
        if sock is None:
            raise TransportClosedError(self.endpoint, "send on a closed transport")
        if self._backlog:  # nothing overtakes the backlog: frame order is message order
            self._enqueue(frame)
        else:
            try:
                sock.send(frame, _NOBLOCK)
                self.frames_sent += 1
            except zmq.Again:
                self._enqueue(frame)
            except zmq.ZMQError as exc:
                raise TransportError(self.endpoint, f"send failed: {exc}", exc.errno) from None
        if not self._in_pump:
            # libzmq processes its command mailbox inside send(), which can consume the FD's
            # edge for frames that just arrived: drain once more on the next iteration.
            self._schedule()

    def discard_backlog(self) -> int:
        """Forget the frames that never reached the socket (e.g. before a re-hello).

        Returns:
            How many frames were discarded.
        """
        count = len(self._backlog)
        self._backlog.clear()
        return count

    def _enqueue(self, frame: bytes) -> None:
        if len(self._backlog) >= self._backlog_max:
            self.frames_dropped += 1
            if self.frames_dropped == 1 or self.frames_dropped % 1000 == 0:
                logger.warning(
                    "send backlog full, frame dropped endpoint=%s backlog=%d dropped_total=%d",
                    self.endpoint,
                    len(self._backlog),
                    self.frames_dropped,
                )
            return
        self._backlog.append(frame)
        if self._retry is None:
            self._retry = self._loop.call_later(BACKLOG_RETRY_S, self._retry_backlog)

    def _retry_backlog(self) -> None:
        self._retry = None
        self._service()

    def _flush_backlog(self, sock: zmq.Socket[bytes]) -> None:
        backlog = self._backlog
        while backlog:
            try:
                sock.send(backlog[0], _NOBLOCK)
            except zmq.Again:
                if self._retry is None:
                    self._retry = self._loop.call_later(BACKLOG_RETRY_S, self._retry_backlog)
                return
            backlog.popleft()
            self.frames_sent += 1

    # ---------------------------------------------------------------------------- receiving

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._service)

    def _service(self) -> None:
        """Reader callback (and scheduled drains): flush the backlog, drain to ``EAGAIN``."""
        self._scheduled = False
        sock = self._sock
        if sock is None:
            return
        self._in_pump = True
        try:
            self._pump(sock)
        except zmq.ZMQError as exc:
            self._fail(exc)
        finally:
            self._in_pump = False

    def _pump(self, sock: zmq.Socket[bytes]) -> None:
        recv = sock.recv
        while True:
            if self._backlog:
                self._flush_backlog(sock)
            frames: list[bytes] = []
            try:
                while len(frames) < MAX_FRAMES_PER_WAKEUP:
                    frames.append(recv(_NOBLOCK))
            except zmq.Again:
                pass
            if not frames:
                return  # reached EAGAIN having sent nothing since: the next edge will come
            self.frames_received += len(frames)
            self._on_frames(frames)
            if self._sock is None:
                return  # the handler closed us
            if len(frames) >= MAX_FRAMES_PER_WAKEUP:
                self._schedule()  # we stopped before EAGAIN: no edge will come, so call back
                return
            # The handler may have sent, which may have consumed the edge of newer frames.
            events = sock.getsockopt(_EVENTS)
            if not (isinstance(events, int) and events & _POLLIN):
                return

    def _fail(self, exc: zmq.ZMQError) -> None:
        error = TransportError(self.endpoint, f"socket failed: {exc}", exc.errno)
        logger.error("transport failed endpoint=%s error=%s", self.endpoint, exc)
        self.close()
        if self._on_error is not None:
            self._on_error(error)

    # ------------------------------------------------------------------------------ events

    def watch(
        self,
        on_connected: Callable[[bool], None],
        on_handshake_failed: Callable[[str, bool], None],
    ) -> None:
        """Report connection events (``credit_common.zmqmon.ConnectionWatch``):
        ``on_connected(reconnected)`` when the router can hear us again,
        ``on_handshake_failed(why, hangup)`` with the reason in words (the router does not
        accept our key, a CURVE/plaintext mismatch) and whether the far end only hung up
        (``credit_common.zmqmon.is_hangup``)."""
        sock = self._sock
        if sock is None or self._watch is not None:
            return
        self._watch = ConnectionWatch(sock, self.endpoint, on_connected, on_handshake_failed)
        self._watch.attach(self._loop)

    # ------------------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop reading, try the backlog one last time, close the socket and its context.

        Blocks for at most ``LINGER_MS`` while libzmq hands over the last queued frames.
        Idempotent.
        """
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        self._loop.remove_reader(self._fd)
        with contextlib.suppress(zmq.ZMQError):  # closing anyway; leftovers are logged below
            self._flush_backlog(sock)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._backlog:
            logger.warning(
                "transport closed with unsent frames endpoint=%s frames=%d",
                self.endpoint,
                len(self._backlog),
            )
            self._backlog.clear()
        sock.close(linger=LINGER_MS)
        self._ctx.term()
        logger.info(
            "transport closed endpoint=%s sent=%d received=%d dropped=%d",
            self.endpoint,
            self.frames_sent,
            self.frames_received,
            self.frames_dropped,
        )
