"""Errors of the worker agent, one small hierarchy that carries data.

Foreign errors are mapped at the boundary where they appear: ``zmq.ZMQError`` becomes a
``TransportError`` inside ``worker_agent.transport`` and nowhere else, and a router's
``Refusal`` becomes a ``RefusedError`` raised by ``WorkerAgent.serve()`` after a clean
shutdown. ``retriable`` tells a caller (the CLI, a supervisor) whether starting again as-is can
help.
"""

from __future__ import annotations

__all__ = ["RefusedError", "TransportClosedError", "TransportError", "WorkerError"]


class WorkerError(Exception):
    """Base of every error the worker agent raises."""

    retriable: bool = False
    """Whether trying again unchanged may succeed."""


class TransportError(WorkerError):
    """The ZeroMQ socket failed (bad endpoint, context terminated, an unexpected errno).

    Attributes:
        endpoint: the router endpoint the socket talks to.
        errno: the ZeroMQ/OS error number, when there is one.
    """

    retriable = True

    def __init__(self, endpoint: str, problem: str, errno: int | None = None) -> None:
        self.endpoint = endpoint
        self.errno = errno
        super().__init__(f"transport to {endpoint}: {problem}")


class TransportClosedError(TransportError):
    """A frame was sent on a transport that is already closed."""

    retriable = False


class RefusedError(WorkerError):
    """The router refused this worker's ``Hello``; do not retry as-is (PROTOCOL.md §5.1).

    Attributes:
        reason: the router's words.
        router_version: the router's protocol version.
        peer_version: the version this worker announced.
    """

    def __init__(self, reason: str, router_version: int, peer_version: int) -> None:
        self.reason = reason
        self.router_version = router_version
        self.peer_version = peer_version
        super().__init__(
            f"refused by the router: {reason} (router protocol {router_version}, "
            f"worker protocol {peer_version})"
        )
