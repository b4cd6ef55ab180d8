"""ZeroMQ socket monitors, read on the event loop: connection events and handshake failures in
words.

libzmq reports a refused CURVE key or a plaintext peer on a CURVE endpoint only as monitor
events with numeric codes (ZAP status 400, ``ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH``, …).
This module turns them into one sentence a person can act on, and finds the remote address of
an accepted connection (the monitor names only the local endpoint), so that both the router's
log and a refused peer's exit message say who and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Final

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = [
    "HANDSHAKE_FAILED",
    "ConnectionWatch",
    "Monitor",
    "handshake_failure",
    "is_hangup",
    "peer_address",
]

logger = logging.getLogger(__name__)

HANDSHAKE_FAILED: Final = (
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    | int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    | int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
)
"""Every kind of failed ZMTP handshake."""

_ZAP_STATUS: Final = {
    300: "the router's key check failed temporarily (ZAP 300)",
    400: "the router does not accept this CURVE key (not in its allowlist, or revoked)",
    500: "the router's key check failed (ZAP 500)",
}

_PROTOCOL: Final = {
    int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): (
        "security mechanism mismatch: one side uses CURVE and the other plaintext "
        "(give both the same --curve settings)"
    ),
    int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): (
        "CURVE handshake failed cryptographically: the router's public key given to this "
        "peer is not the router's"
    ),
}


def is_hangup(event: int) -> bool:
    """Whether a failed handshake was the far end hanging up without a reason (``NO_DETAIL``):
    a refusal, or no router behind a proxy, or a router dying: see ``credit_common.peer``."""
    return event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def handshake_failure(event: int, value: int, *, at_router: bool = False) -> str:
    """One sentence for a failed-handshake monitor event (``event``, its ``value``), as the
    connecting peer sees it, or as the router does (``at_router``)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return _ZAP_STATUS.get(value, f"authentication failed (ZAP status {value})")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        words = _PROTOCOL.get(value)
        if words is not None:
            return words
        if value & 0x10000000:
            return f"ZMTP protocol error in the handshake (code {value:#x})"
        return f"handshake failed (protocol error {value:#x})"
    if value in (errno.EPIPE, errno.ECONNRESET) and at_router:
        return (
            f"the peer closed the connection during the handshake ({os.strerror(value)}): it "
            "uses another security mechanism, or does not accept this router's key"
        )
    if value in (errno.EPIPE, errno.ECONNRESET):
        # The router hung up mid-handshake without saying why: what it does to a peer whose
        # security does not match its own, or whose key it will not check.
        return (
            f"the router closed the connection during the handshake ({os.strerror(value)}): "
            "a CURVE/plaintext mismatch, a key it does not accept, a wrong router public key, "
            "or no router behind a proxy"
        )
    return f"handshake failed ({os.strerror(value) if value > 0 else 'no detail'})"


def peer_address(fd: int) -> str:
    """``HOST:PORT`` of the remote end of connection ``fd``, or ``"unknown address"``.

    ``fd`` belongs to libzmq's I/O thread: it is duplicated, read and closed, never touched.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return "unknown address"
    try:
        with socket.socket(fileno=dup) as sock:
            name = sock.getpeername()
    except OSError:
        return "unknown address"
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(name) or "local socket"


EventHandler = Callable[[int, int, str], None]
"""Called with ``(event, value, endpoint)`` for each monitor event."""


class Monitor:
    """A socket's monitor, drained on the event loop.

    Args:
        sock: the monitored socket.
        events: the libzmq event mask.
        on_event: called with ``(event, value, endpoint)`` for each event.
    """

    def __init__(self, sock: zmq.Socket[bytes], events: int, on_event: EventHandler) -> None:
        self._sock = sock
        self._monitor: zmq.Socket[bytes] | None = sock.get_monitor_socket(events)
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int = self._monitor.getsockopt(zmq.FD)  # type: ignore[assignment]

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading events on ``loop``."""
        self._loop = loop
        loop.add_reader(self._fd, self._read)
        loop.call_soon(self._read)  # edge-triggered: read what came before registration

    def _read(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        while True:
            try:
                event = recv_monitor_message(monitor, int(zmq.NOBLOCK))
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed under us
                return
            endpoint = event.get("endpoint", b"")
            where = endpoint.decode("utf-8", "replace") if isinstance(endpoint, bytes) else ""
            try:
                self._on_event(int(event["event"]), int(event["value"]), where)
            except Exception:
                logger.exception("monitor event handler failed")

    def close(self) -> None:
        """Stop monitoring (before the socket closes)."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        monitor.close(0)


RECONNECT_AFTER_FAILURE_S: Final = 0.5
"""libzmq never reconnects after a failed handshake (a protocol error ends the session): the
watch does it, this long after."""


class ConnectionWatch:
    """A connecting socket's link to the router, as the peer session needs it.

    ``on_connected(reconnected)`` when the router can hear us again: the ZMTP handshake
    succeeded (not ``EVENT_CONNECTED``: with ``IMMEDIATE`` frames are handed over only once it
    is done). ``reconnected`` says whether a connection closed since the previous one was made:
    the monitor is a socket of its own, read whenever the loop gets to it, so the event of the
    very connection a welcome already came over may be read after that welcome, and must not be
    taken for a new connection (a peer would say hello again for nothing).
    ``on_handshake_failed(why, hangup)`` with the reason in words and whether it was a hang-up
    (``is_hangup``), after which the watch reconnects
    the socket itself, so that a refused key is tried again and the peer's count of failures
    in a row can reach its limit.

    Args:
        sock: the connecting socket (its owner closes it, after ``close()``).
        endpoint: where it connects.
        on_connected: see above.
        on_handshake_failed: see above.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        endpoint: str,
        on_connected: Callable[[bool], None] | None,
        on_handshake_failed: Callable[[str, bool], None] | None,
    ) -> None:
        self._sock = sock
        self._endpoint = endpoint
        self._on_connected = on_connected
        self._on_handshake_failed = on_handshake_failed
        self._closed_since = False
        """A connection closed since the last successful handshake."""
        events = int(zmq.EVENT_HANDSHAKE_SUCCEEDED) | int(zmq.EVENT_DISCONNECTED) | HANDSHAKE_FAILED
        self._monitor = Monitor(sock, events, self._on_event)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching on ``loop``."""
        self._loop = loop
        self._monitor.attach(loop)

    def _on_event(self, event: int, value: int, endpoint: str) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            reconnected, self._closed_since = self._closed_since, False
            if self._on_connected is not None:
                self._on_connected(reconnected)
        elif event == zmq.EVENT_DISCONNECTED:
            self._closed_since = True
        elif event & HANDSHAKE_FAILED:
            if self._on_handshake_failed is not None:
                self._on_handshake_failed(handshake_failure(event, value), is_hangup(event))
            if self._loop is not None and self._retry is None:
                self._retry = self._loop.call_later(RECONNECT_AFTER_FAILURE_S, self._reconnect)

    def _reconnect(self) -> None:
        self._retry = None
        with contextlib.suppress(zmq.ZMQError):  # the failed session may be gone already
            self._sock.disconnect(self._endpoint)
        with contextlib.suppress(zmq.ZMQError):
            self._sock.connect(self._endpoint)

    def close(self) -> None:
        """Stop watching (before the socket closes)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._loop = None
        self._monitor.close()
