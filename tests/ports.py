"""Loopback ports for tests that start servers and processes."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback TCP port nobody listens on now (a stdlib probe: the port is released as the
    probe closes, unlike a libzmq socket's, whose listener closes later in its I/O thread)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
