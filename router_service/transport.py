"""Every ZeroMQ decision of the router and the producer client, each with its reason.

The rest of the code sees ``send(identity, frame) -> bool`` and a callback that receives the
frames of one wake-up as a list; sockets never leave this module, and ``zmq.ZMQError`` never
reaches the service or the core.

How the sockets are driven (measured on this project's benchmarks): not with
``zmq.asyncio`` awaits (a per-message await costs ~50 µs here), but with ``loop.add_reader`` on
the socket's ``FD`` and a non-blocking drain in the callback, with fixed-shape ``recv`` calls and
plain-int flags (pyzmq's multipart sugar and IntFlag arithmetic cost ~4.5 µs a message). The FD
is edge-triggered, so the callback always drains to ``EAGAIN`` (or reschedules itself when it
stops early for fairness), drains once right after registration, and re-checks ``POLLIN``
after sending, since a send can consume the edge.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Final

import zmq

from credit_common.zmqmon import (
    HANDSHAKE_FAILED,
    ConnectionWatch,
    Monitor,
    handshake_failure,
    peer_address,
)
from router_service.security import ZAP_DOMAIN

__all__ = ["Curve", "DealerSocket", "RouterSocket", "TransportError"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- constants
NOBLOCK: Final = int(zmq.NOBLOCK)
"""Plain int: IntFlag arithmetic on the hot path costs ~0.6 µs per use on Python 3.11."""
SNDMORE_NOBLOCK: Final = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
POLLIN: Final = int(zmq.POLLIN)
EVENTS: Final = int(zmq.EVENTS)
RCVMORE: Final = int(zmq.RCVMORE)
_SEND: Final = zmq.backend.Socket.send
"""pyzmq's compiled ``send``, called on our sockets directly: the ``zmq.Socket.send`` wrapper
(a Python method that inspects its arguments for ``Frame``/``copy``/``track`` cases we never
use) costs ~0.35 µs more per call, and every message to a peer is two calls."""

ROUTER_MANDATORY: Final = 1
"""A send to an identity that is not connected raises EHOSTUNREACH instead of vanishing
(libzmq's default is a silent drop: AIPerf's defect [F]). The service ends that worker's
credits as lost at once."""
ROUTER_HANDOVER: Final = 1
"""A peer that reconnects (same process, same routing id) takes over its routing identity at
once instead of being refused until the old TCP connection dies. Different processes never
share a routing id (``NAME/INCARNATION``), so this never lets one process take another's
place; names are arbitrated by the hello (a second live holder is refused)."""
SNDHWM: Final = 100_000
"""Frames queued per peer. Credits are packed one frame per worker per loop turn and a worker's
in-flight count is bounded by its capacity, so reaching this means the peer stopped reading:
with ROUTER_MANDATORY the send raises EAGAIN and the peer is treated as unreachable (zguide
ch. 8: a full queue is fatal for that peer, never for the router). Never 0 (unbounded)."""
RCVHWM: Final = 100_000
"""Inbound frames queued per peer before libzmq stops reading its TCP socket (back-pressure)."""
LINGER_MS: Final = 1_000
"""Bounded wait for queued frames on close: outcomes get out at shutdown, a dead peer cannot
hang it."""
MAXMSGSIZE: Final = 16 * 1024 * 1024
"""A frame larger than this disconnects the peer (a credit is ~150 bytes; batches are bounded)."""
HEARTBEAT_IVL_MS: Final = 1_000
HEARTBEAT_TIMEOUT_MS: Final = 5_000
HEARTBEAT_TTL_MS: Final = 5_000
"""ZMTP PING/PONG detects dead hosts and half-open TCP in seconds. It cannot see a frozen
process (libzmq's I/O thread still answers), so application heartbeats stay the authority."""
TCP_KEEPALIVE_IDLE_S: Final = 60
RECONNECT_IVL_MS: Final = 100
RECONNECT_IVL_MAX_MS: Final = 500
"""Connecting sockets back off exponentially up to this: short, so that a restarted router has
its peers back within about a second (reconnecting to one loopback or LAN address is cheap)."""
MAX_DRAIN: Final = 2_048
"""Frames handled per wake-up before yielding to the loop, so timers (heartbeats, liveness)
are never starved by a busy socket."""


class TransportError(Exception):
    """A socket could not be set up (bind/connect failed)."""


Frames = list[tuple[bytes, bytes]]
"""``(identity, payload)`` pairs received in one wake-up."""


def _common_options(sock: zmq.Socket[bytes]) -> None:
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAXMSGSIZE)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)


class _Driven:
    """Reader-callback plumbing shared by both socket kinds."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._scheduled = False
        self._recheck_scheduled = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering frames on ``loop``."""
        self._loop = loop
        loop.add_reader(self._fd, self._on_readable)
        # Edge-triggered: frames that arrived before registration raise no edge.
        loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        self._scheduled = False
        more = self._drain()
        if more:
            self._reschedule()

    def _drain(self) -> bool:
        raise NotImplementedError

    def _reschedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._on_readable)

    def _sent(self) -> None:
        """Called after every send: a send may consume the read edge (the FD is shared by
        both directions), so look for pending input once the current callback is done."""
        if not self._recheck_scheduled and self._loop is not None:
            self._recheck_scheduled = True
            self._loop.call_soon(self.recheck)

    def recheck(self) -> None:
        """Look for input that arrived without raising an edge, and read it."""
        self._recheck_scheduled = False
        try:
            events: int = self._sock.getsockopt(EVENTS)  # type: ignore[assignment]
            if events & POLLIN:
                self._reschedule()
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        """Stop reading and close the socket (bounded linger)."""
        monitor: Monitor | None = getattr(self, "_monitor", None)
        if monitor is not None:
            monitor.close()
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None
        self._sock.close()


class Curve:
    """CURVE server keys plus the rule that binds a connection's routing identity to its key.

    Args:
        public: the router's Z85 public key.
        secret: the router's Z85 secret key.
        allowed: the names keys are bound to right now (the ZAP handler sets each
            connection's ``User-Id`` to its key's name); a frame from a name no longer in it is
            dropped (a key removed by a reload is cut off at once).
        owner: maps a routing identity to the name that must own it (workers: the identity
            itself; producers: the part before ``/``).
    """

    def __init__(
        self,
        public: bytes,
        secret: bytes,
        allowed: Callable[[], set[str]],
        owner: Callable[[bytes], str],
    ) -> None:
        self.public = public
        self.secret = secret
        self.allowed = allowed
        self.owner = owner


class RouterSocket(_Driven):
    """A bound ROUTER socket: receives ``(identity, payload)``, sends to an identity.

    Args:
        ctx: the process's one ZeroMQ context.
        endpoint: where to bind (``tcp://HOST:PORT``, ``tcp://HOST:0`` for any port, ``ipc://…``).
        on_frames: called with the frames of each wake-up (and nothing else on the loop runs
            in between, so the callee sees a consistent batch).
        on_malformed: called with the identity of a peer that sent a message of the wrong
            shape (not exactly one payload frame); the message is dropped.
        curve: encrypt and authenticate (see ``Curve``); ``None`` for plaintext.
        on_auth_failure: called with ``(who, why)`` — the peer's address (or routing id)
            and the reason in words — for each frame dropped because its key does not own its
            routing identity, and for each failed handshake (a key not in the allowlist, a
            plaintext peer on a CURVE endpoint).
        on_disconnect: called with the routing identity of a peer whose connection closed.
            The identity may have reconnected meanwhile (a send to it tells).
        on_unauthorized: called with ``(identity, why)`` for each frame dropped because its
            key does not own its routing identity (the handshake passed, so the peer can be
            answered, and told why).

    Raises:
        TransportError: the endpoint cannot be bound — in use, or an ``ipc://`` path that a
            live process is serving (a second router must not silently take it over).
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        on_frames: Callable[[Frames], None],
        on_malformed: Callable[[bytes], None],
        *,
        curve: Curve | None = None,
        on_auth_failure: Callable[[str, str], None] | None = None,
        on_disconnect: Callable[[bytes], None] | None = None,
        on_unauthorized: Callable[[bytes, str], None] | None = None,
    ) -> None:
        _claim_ipc_path(endpoint)
        sock = ctx.socket(zmq.ROUTER)
        _common_options(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, ROUTER_MANDATORY)
        if curve is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret)
            sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
            # No handover under CURVE: a listed key must not take over another's identity
            # while it is connected (its frames would be dropped, but it would receive).
            sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        else:
            sock.setsockopt(zmq.ROUTER_HANDOVER, ROUTER_HANDOVER)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise TransportError(f"cannot bind {endpoint}: {exc}") from exc
        self.endpoint: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        """The bound address (with the real port when ``:0`` was asked)."""
        super().__init__(sock)
        self._on_frames = on_frames
        self._on_malformed = on_malformed
        self._curve = curve
        self._on_auth_failure = on_auth_failure
        self._on_disconnect = on_disconnect
        self._on_unauthorized = on_unauthorized
        self._fds: dict[int, bytes] = {}
        """Connection fd -> the identity seen on it. Learned from the first frame of each
        identity (``SRCFD``; the one frame per peer read with ``copy=False``), so a closed
        connection is noticed at once instead of after the silence timeout."""
        self._fd_of: dict[bytes, int] = {}
        self._accepted: dict[int, str] = {}
        """Accepted connection fd -> remote address (until it is verified or closes)."""
        self._failure: str | None = None
        """The last failed handshake, reported with its connection's address when it closes."""
        self._monitor: Monitor | None = Monitor(
            sock,
            int(zmq.EVENT_ACCEPTED) | int(zmq.EVENT_DISCONNECTED) | HANDSHAKE_FAILED,
            self._on_event,
        )
        self.bytes_in = 0
        self.bytes_out = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering frames and connection events on ``loop``."""
        super().attach(loop)
        if self._monitor is not None:
            self._monitor.attach(loop)

    def _on_event(self, event: int, value: int, endpoint: str) -> None:
        if event == zmq.EVENT_ACCEPTED:
            self._accepted[value] = peer_address(value)
        elif event == zmq.EVENT_DISCONNECTED:
            address = self._accepted.pop(value, None)
            identity = self._fds.pop(value, None)
            if identity is not None:
                if self._fd_of.get(identity) == value:
                    del self._fd_of[identity]
                if self._on_disconnect is not None:
                    self._on_disconnect(identity)
            elif self._failure is not None:
                why, self._failure = self._failure, None
                if self._on_auth_failure is not None:
                    self._on_auth_failure(address or "unknown address", why)
        elif event & HANDSHAKE_FAILED:
            self._failure = handshake_failure(event, value, at_router=True)

    def _learn_fd(self, identity: bytes, frame: zmq.Frame) -> None:
        fd: int = frame.get(zmq.SRCFD)
        self._fds[fd] = identity
        self._fd_of[identity] = fd
        self._accepted.pop(fd, None)

    def peer_address(self, identity: bytes) -> str:
        """The remote address of ``identity``'s connection, or ``"unknown address"``."""
        fd = self._fd_of.get(identity)
        return peer_address(fd) if fd is not None else "unknown address"

    def _verified(self, identity: bytes, frame: zmq.Frame) -> bool:
        """Under CURVE: does this frame's key own its routing identity (and still count)?"""
        curve = self._curve
        assert curve is not None
        user = frame.get("User-Id")
        if not user or user not in curve.allowed() or curve.owner(identity) != user:
            who = identity.decode("utf-8", "replace")
            why = (
                f"the key of {user!r} may not speak as {who!r}"
                if user and user in curve.allowed()
                else f"the key of {user or 'an unknown peer'!r} is no longer allowed"
            )
            if self._on_auth_failure is not None:
                fd = frame.get(zmq.SRCFD)
                self._on_auth_failure(f"{peer_address(fd)} ({who})", why)
            if self._on_unauthorized is not None:
                self._on_unauthorized(identity, why)
            return False
        if identity not in self._fd_of:
            self._learn_fd(identity, frame)
        return True

    def _drain(self) -> bool:
        recv = self._sock.recv
        get = self._sock.getsockopt
        frames: Frames = []
        nbytes = 0
        more = True
        curve = self._curve is not None
        known = self._fd_of
        try:
            for _ in range(MAX_DRAIN):
                identity = recv(NOBLOCK)
                if curve:
                    # The frame object carries the authenticated key's User-Id (costs ~1 µs a
                    # frame, paid only under CURVE; frames are batches, so per credit it is
                    # small).
                    frame = recv(NOBLOCK, copy=False)
                    payload = frame.bytes
                elif identity not in known:
                    # A peer's first frame tells which connection it came on (SRCFD), so the
                    # monitor's "disconnected" can name the peer. Later frames pay nothing.
                    frame = recv(NOBLOCK, copy=False)
                    payload = frame.bytes
                    self._learn_fd(identity, frame)
                else:
                    payload = recv(NOBLOCK)
                nbytes += len(payload)
                if get(RCVMORE):
                    # A DEALER sends exactly one frame; anything else is dropped whole.
                    while get(RCVMORE):
                        recv(NOBLOCK)
                    self._on_malformed(identity)
                    continue
                if curve and not self._verified(identity, frame):
                    continue
                frames.append((identity, payload))
        except zmq.Again:
            more = False
        except zmq.ZMQError as exc:  # pragma: no cover - closed under us
            logger.warning("recv failed on %s: %s", self.endpoint, exc)
            more = False
        self.bytes_in += nbytes
        if frames:
            self._on_frames(frames)
        return more

    def send(self, identity: bytes, frame: bytes) -> bool:
        """Send ``frame`` to ``identity``. False if the peer is gone or not reading."""
        sock = self._sock
        try:
            _SEND(sock, identity, SNDMORE_NOBLOCK)
            _SEND(sock, frame, NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: not connected (ROUTER_MANDATORY). EAGAIN: its queue is full.
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("send to %r failed: %s", identity, exc)
            self._sent()  # a failed send touches the socket too: it can eat the read edge
            return False
        self.bytes_out += len(frame)
        self._sent()
        return True


class DealerSocket(_Driven):
    """A connecting DEALER socket with a chosen routing identity (producer client side).

    Args:
        ctx: the process's one ZeroMQ context.
        endpoint: the router's address.
        identity: the routing id the router will see.
        on_frames: called with the payloads of each wake-up.
        curve: ``(server public, own public, own secret)`` Z85 keys to encrypt and
            authenticate, or ``None`` for plaintext.
        on_connected: called when a connection to the router is (re-)established, with
            whether one closed since the previous (``ConnectionWatch``).
        on_handshake_failed: called with the reason in words when a handshake fails (the
            router does not accept our key, or one side uses CURVE and the other not) and
            whether the far end only hung up (``credit_common.zmqmon.is_hangup``).
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        identity: bytes,
        on_frames: Callable[[list[bytes]], None],
        curve: tuple[bytes, bytes, bytes] | None = None,
        *,
        on_connected: Callable[[bool], None] | None = None,
        on_handshake_failed: Callable[[str, bool], None] | None = None,
    ) -> None:
        sock = ctx.socket(zmq.DEALER)
        _common_options(sock)
        if curve is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, curve[0])
            sock.setsockopt(zmq.CURVE_PUBLICKEY, curve[1])
            sock.setsockopt(zmq.CURVE_SECRETKEY, curve[2])
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        # Do not queue frames toward a router that is not there: a hello sent into the void
        # would be delivered late and stale; the client retries instead.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise TransportError(f"cannot connect to {endpoint}: {exc}") from exc
        super().__init__(sock)
        self.endpoint = endpoint
        self._on_payloads = on_frames
        self._watch = ConnectionWatch(sock, endpoint, on_connected, on_handshake_failed)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering frames and connection events on ``loop``."""
        super().attach(loop)
        self._watch.attach(loop)

    def close(self) -> None:
        """Stop watching the connection, then close the socket (bounded linger)."""
        self._watch.close()
        super().close()

    def _drain(self) -> bool:
        recv = self._sock.recv
        payloads: list[bytes] = []
        more = True
        try:
            for _ in range(MAX_DRAIN):
                payloads.append(recv(NOBLOCK))
        except zmq.Again:
            more = False
        except zmq.ZMQError as exc:  # pragma: no cover - closed under us
            logger.warning("recv failed on %s: %s", self.endpoint, exc)
            more = False
        if payloads:
            self._on_payloads(payloads)
        return more

    def send(self, frame: bytes) -> bool:
        """Send one frame to the router. False if no connection can take it now."""
        try:
            _SEND(self._sock, frame, NOBLOCK)
        except zmq.ZMQError:
            self._sent()  # a failed send touches the socket too: it can eat the read edge
            return False
        self._sent()
        return True


def _claim_ipc_path(endpoint: str) -> None:
    """Refuse an ``ipc://`` path that a live process serves; remove a stale one.

    libzmq's bind on an existing path silently unlinks it and takes over, so a second router
    started by mistake would steal the producers of the first, which would still look healthy.

    Raises:
        TransportError: a live process accepts connections on the path.
    """
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint.removeprefix("ipc://")
    if path in ("", "*") or not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens: a stale file left by a process that died. Remove it and go on.
        try:
            os.unlink(path)
            logger.info("removed a stale socket file %s", path)
        except FileNotFoundError:
            pass
        return
    except OSError as exc:
        if exc.errno in (errno.ENOTSOCK, errno.EACCES, errno.EPERM):
            raise TransportError(f"cannot bind {endpoint}: {os.strerror(exc.errno)}") from None
        return
    finally:
        probe.close()
    raise TransportError(
        f"cannot bind {endpoint}: another process is serving it (a router already running?); "
        "stop it or choose another endpoint"
    )
