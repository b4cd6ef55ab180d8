"""Peer links: the router's side of one conversation with one worker or one producer.

A link is keyed by the peer's exact routing-id bytes (never a re-encoded string: libzmq's
generated ids are not UTF-8) and owns everything the conversation needs beyond the routing core
(h11's ``Connection`` is the model: one object per conversation, which knows its state and
what is still to be sent, in order):

* **the handshake**: a link is ``NEW`` until its hello is admitted, then ``JOINED``; a worker
  link that lost its name to a newer incarnation is ``FENCED`` (every later frame is answered
  with a ``Refusal``, so the stale process exits instead of taking its name back);
* **an ordered outbox**: every frame for the peer is queued here and handed to the transport
  in order; a frame the transport cannot take now (the peer is between connections, or not
  reading) stays at the head of the queue until it can. So a ``Welcome`` always precedes the
  first ``Dispatch``, control and credit messages keep their causal order, and the routing core
  never has to take back a dispatch it decided;
* **the acknowledged sequence** of a worker incarnation's completion log (``SeqWindow``), which
  de-duplicates completions *and* ``Recovered`` in one place: an outcome forwarded once is never
  forwarded again, however often the worker retransmits it.

No sockets here: the service owns the transport and calls ``flush(send)``.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final

__all__ = ["LinkState", "ProducerLink", "SeqWindow", "SeqWindows", "WorkerLink"]

OUTBOX_LIMIT: Final = 100_000
"""Frames a link may hold for a peer that does not take them. Beyond it the peer is treated as
unreachable (a worker is lost; a producer's oldest frames are dropped and counted)."""

Send = Callable[[bytes, bytes], bool]
"""``send(identity, frame) -> handed over?`` (the transport's ``RouterSocket.send``)."""


class LinkState(enum.Enum):
    """Where a peer's conversation stands."""

    NEW = "new"
    """Connected, no admitted hello yet."""
    JOINED = "joined"
    """Hello admitted."""
    FENCED = "fenced"
    """A worker incarnation whose name a newer incarnation took: refused from now on."""


class _Link:
    """Shared by both kinds: identity, state, the ordered outbox."""

    __slots__ = ("address", "identity", "last_seen", "outbox", "state")

    def __init__(self, identity: bytes, now: float) -> None:
        self.identity = identity
        self.state = LinkState.NEW
        self.last_seen = now
        self.address = "unknown address"
        self.outbox: deque[bytes] = deque()

    def send(self, frame: bytes, send: Send) -> bool:
        """Queue ``frame`` behind anything held and hand over what the transport takes.

        Returns whether everything queued (this frame included) was handed over.
        """
        outbox = self.outbox
        if not outbox:
            if send(self.identity, frame):
                return True
            outbox.append(frame)
            return False
        outbox.append(frame)
        return self.flush(send)

    def flush(self, send: Send) -> bool:
        """Hand over held frames in order until the transport refuses one.

        Returns whether the outbox is now empty.
        """
        outbox = self.outbox
        identity = self.identity
        while outbox:
            if not send(identity, outbox[0]):
                return False
            outbox.popleft()
        return True

    @property
    def overflowing(self) -> bool:
        """More frames held than ``OUTBOX_LIMIT``."""
        return len(self.outbox) > OUTBOX_LIMIT


class WorkerLink(_Link):
    """The conversation with one worker process (one routing id).

    ``name`` and ``incarnation`` come from its admitted hello.
    """

    __slots__ = ("after_welcome", "incarnation", "name", "revoked")

    def __init__(self, identity: bytes, now: float) -> None:
        super().__init__(identity, now)
        self.name = ""
        self.incarnation = ""
        self.after_welcome: list[bytes] = []
        """Frames held for a peer that has just said hello again: they go right after its
        ``Welcome`` (a connection never gets a ``Dispatch`` before its ``Welcome``)."""
        self.revoked = False
        """Sent credits to forget (a draining router's ``Cancel(revoked=True)``) and not yet
        confirmed by an ``InFlightReport``."""

    def __repr__(self) -> str:
        return (
            f"<WorkerLink {self.identity!r} {self.state.value} {self.name}/{self.incarnation} "
            f"held={len(self.outbox)}>"
        )


class ProducerLink(_Link):
    """The conversation with one producer process (one routing id).

    ``key`` (``name/incarnation``) is what the routing core knows the producer by: its
    credits, its ledger and its sessions.
    """

    __slots__ = ("incarnation", "key", "name", "understands")

    def __init__(self, identity: bytes, now: float) -> None:
        super().__init__(identity, now)
        self.name = ""
        self.incarnation = ""
        self.understands: frozenset[str] = frozenset()
        """Tags of post-version-1 messages it reads (``ProducerHello.understands``)."""
        self.key = ""

    def __repr__(self) -> str:
        held = len(self.outbox)
        return f"<ProducerLink {self.identity!r} {self.state.value} {self.key} held={held}>"


class SeqWindow:
    """The completion sequence numbers seen from one worker incarnation.

    A worker numbers its completions 1, 2, 3, … and resends every unacknowledged one, in order,
    after a re-hello (to the same router as ``Completion``, to a restarted one as
    ``Recovered``). Because one connection is ordered and a resend always starts again from the
    oldest unacknowledged entry, a number at or below the highest seen is a retransmission.
    """

    __slots__ = ("high",)

    def __init__(self) -> None:
        self.high = 0

    def fresh(self, seq: int) -> bool:
        """Whether ``seq`` is new (and remember it)."""
        if seq > self.high:
            self.high = seq
            return True
        return False


class SeqWindows:
    """``SeqWindow`` per worker incarnation, kept beyond the life of a link (a worker that is
    lost and comes back must not have its old completions forwarded again), bounded LRU."""

    def __init__(self, limit: int = 4_096) -> None:
        self._windows: OrderedDict[tuple[str, str], SeqWindow] = OrderedDict()
        self._limit = limit

    def get(self, name: str, incarnation: str) -> SeqWindow:
        """The window of ``name``'s ``incarnation`` (created empty)."""
        key = (name, incarnation)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = SeqWindow()
            if len(self._windows) > self._limit:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return window

    def __len__(self) -> int:
        return len(self._windows)
