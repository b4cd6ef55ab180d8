"""systemd's readiness protocol (``Type=notify``) without a dependency.

``notify("READY=1")`` sends one datagram to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``,
which systemd sets for services with ``Type=notify`` (sd_notify(3)). A leading ``@`` names a
socket in the abstract namespace. Outside systemd the variable is unset and ``notify`` does
nothing and returns ``False``, so callers never need to know how they were started.

Rules: the send never blocks the event loop (the socket is non-blocking: a full queue loses the
message rather than stalling the router) and never raises; a failure is logged once per call at
WARNING and reported as ``False``. Several assignments may go in one message, one per line
(``"STOPPING=1\\nSTATUS=draining"``).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Final

__all__ = ["READY", "STOPPING", "notify", "status"]

logger = logging.getLogger(__name__)

READY: Final = "READY=1"
"""Startup finished: the sockets are bound and the HTTP endpoints listen."""
STOPPING: Final = "STOPPING=1"
"""Shutdown began (the drain)."""


def status(text: str) -> str:
    """A ``STATUS=`` assignment for ``text`` (one line: newlines would start a new assignment)."""
    return "STATUS=" + " ".join(text.splitlines())


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's notification socket.

    Args:
        state: newline-separated ``KEY=VALUE`` assignments, as sd_notify(3) defines them.

    Returns:
        ``True`` if the datagram was sent; ``False`` when not started by systemd with a
        notification socket (``$NOTIFY_SOCKET`` unset or of a kind we do not speak) or when
        the send failed.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte instead of the '@'.
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        # e.g. "vsock:CID:PORT" (systemd 253+, for VMs): not a socket this daemon will meet.
        logger.warning("NOTIFY_SOCKET of an unsupported kind: %s", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(target)
            sock.send(state.encode("utf-8"))
    except OSError as exc:
        logger.warning("sd_notify %r to %s failed: %s", state, address, exc)
        return False
    return True
