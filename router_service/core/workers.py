"""Worker state and the least-loaded index.

No I/O in this module, no clock reads: time is passed in as ``now``.

The index answers "which worker gets a new session?" exactly as a brute-force scan would: the
worker with the smallest key ``(in_flight / capacity, live sessions, credits sent, last dispatch
sequence, join order)`` among the workers that accept new sessions (``docs/ROUTING.md`` §4).

It is a binary heap with *lazy* entries. A worker's key only grows when it is sent a credit (load,
sent and sequence all go up), and it is about to be picked again only if it is still the minimum,
so a send does no heap work: the entry becomes "stale-low" and is refreshed when it reaches the
top. A key only shrinks on a completion or a session ending; then a fresh entry is pushed and the
old one becomes garbage, recognised by identity (``worker.entry is not entry``). Garbage is
compacted when it outweighs the live entries, so memory stays O(workers). A pick is O(1) when the
top is valid and O(log n) otherwise, never a scan of all workers.
"""

from __future__ import annotations

import enum
import heapq
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from protocol.messages import Credit
from router_service.core.ticket import Ticket

if TYPE_CHECKING:
    from router_service.core.table import Entry

__all__ = ["LoadIndex", "Ticket", "TicketQueue", "Worker", "WorkerState"]


class WorkerState(enum.Enum):
    """Where a worker is in its life (``docs/ROUTING.md`` §6)."""

    ACTIVE = "active"
    """Takes new sessions and turns of its sessions."""
    SUSPECT = "suspect"
    """Missed heartbeats: gets nothing new; its credits wait for it until it is lost or back."""
    DRAINING = "draining"
    """No new sessions; turns of its live sessions still come to it."""
    GONE = "gone"
    """Lost or left; kept by nobody once its credits and sessions are accounted for."""


class TicketQueue:
    """A FIFO of waiting tickets whose removal from anywhere is O(1).

    Removal is lazy: a removed ticket's ``queue`` no longer names this queue, and it is skipped
    when it reaches the front. ``len`` counts the live tickets only, so queue limits count what
    really waits. Garbage is compacted when it outweighs the live tickets, so a producer that
    leaves with 40k + 40k interleaved queued credits costs O(credits), not O(credits^2).
    A ticket leaves a queue once, for good (``popleft``, ``remove`` or ``clear``).
    """

    __slots__ = ("_items", "live")

    def __init__(self) -> None:
        self._items: deque[Ticket] = deque()
        self.live = 0
        """Tickets waiting (``len``; the hot path reads the attribute, not the method)."""

    def __len__(self) -> int:
        return self.live

    def __bool__(self) -> bool:
        return self.live > 0

    def __iter__(self) -> Iterator[Ticket]:
        """The live tickets, front first."""
        return (t for t in self._items if t.queue is self)

    def append(self, ticket: Ticket) -> None:
        ticket.queue = self
        self._items.append(ticket)
        self.live += 1

    def peek(self) -> Ticket | None:
        """The live ticket at the front, or ``None``."""
        items = self._items
        while items:
            ticket = items[0]
            if ticket.queue is self:
                return ticket
            items.popleft()
        return None

    def popleft(self) -> Ticket:
        """Take the live ticket at the front (``IndexError`` if there is none)."""
        items = self._items
        while True:
            ticket = items.popleft()
            if ticket.queue is self:
                ticket.queue = None
                self.live -= 1
                return ticket

    def remove(self, ticket: Ticket) -> None:
        """Take ``ticket`` out wherever it is, in O(1) (amortised)."""
        assert ticket.queue is self, f"{ticket!r} does not wait in this queue"
        ticket.queue = None
        self.live -= 1
        items = self._items
        if len(items) > 2 * self.live + 32:
            self._items = deque(t for t in items if t.queue is self)

    def clear(self) -> list[Ticket]:
        """Take every live ticket out; returns them, front first."""
        live = [t for t in self._items if t.queue is self]
        for ticket in live:
            ticket.queue = None
        self._items.clear()
        self.live = 0
        return live

    def __repr__(self) -> str:
        return f"<TicketQueue live={self.live} held={len(self._items)}>"


class Worker:
    """One connected worker agent, as the router sees it."""

    __slots__ = (
        "capacity",
        "chunk",
        "chunk_producer",
        "closed_until",
        "dispatched",
        "drain_deadline",
        "draining",
        "entry",
        "incarnation",
        "labels",
        "last_report_at",
        "last_seen",
        "name",
        "order",
        "outcomes",
        "queue",
        "sent",
        "seq",
        "sessions",
        "state",
        "tickets",
    )

    def __init__(
        self,
        name: str,
        incarnation: str,
        capacity: int,
        labels: dict[str, str],
        order: int,
        now: float,
    ) -> None:
        self.name = name
        self.incarnation = incarnation
        self.capacity = capacity
        self.labels = labels
        self.order = order
        """Join order: the last tie-break, so picks are deterministic."""
        self.state = WorkerState.ACTIVE
        self.tickets: dict[Ticket, None] = {}
        """Credits in flight on it, in dispatch order; ``len`` is its load. (A dict, not a set:
        half the memory per credit, and a deterministic order when they end together.)"""
        self.sessions: dict[Entry, None] = {}
        """Sticky entries pinned to it (keys may repeat across producers, entries do not)."""
        self.sent = 0
        """Credits sent (a late joiner starts at the fleet mean)."""
        self.dispatched = 0
        """Credits dispatched to it since it joined (a true counter, for its metrics)."""
        self.outcomes: dict[str, int] = {}
        """Outcomes of credits dispatched to it, by status (for its metrics)."""
        self.seq = 0
        """Router-wide sequence number of its last dispatch (older = smaller = preferred)."""
        self.queue = TicketQueue()
        """Credits of its sessions waiting for a free slot on it."""
        self.chunk: list[Credit] | None = None
        """The open dispatch chunk in the effects being built: later credits of the same
        producer join it; any control message to this worker closes it (causal order)."""
        self.chunk_producer = ""
        """The producer of ``chunk``."""
        self.closed_until: float | None = None
        """The transport saw its connection close: it is lost at this time unless it speaks or
        says hello again first (``None``: not closed)."""
        self.last_seen = now
        self.last_report_at = now
        self.drain_deadline = 0.0
        self.draining = False
        """It announced (or was told) a drain: no new sessions, ever again."""
        self.entry: list[object] | None = None
        """Its live entry in the load index, or ``None`` when it takes no new sessions."""

    @property
    def in_flight(self) -> int:
        """Credits dispatched to it without an outcome."""
        return len(self.tickets)

    def key(self) -> tuple[float, int, int, int, int]:
        """Its place in the least-loaded order (smaller is preferred)."""
        return (
            len(self.tickets) / self.capacity,
            len(self.sessions),
            self.sent,
            self.seq,
            self.order,
        )

    def __repr__(self) -> str:
        return (
            f"<Worker {self.name} {self.state.value} in_flight={len(self.tickets)}/"
            f"{self.capacity} sessions={len(self.sessions)} queued={len(self.queue)}>"
        )


class LoadIndex:
    """Least-loaded choice among the workers that accept new sessions (see module docstring)."""

    __slots__ = ("_heap", "_live")

    def __init__(self) -> None:
        self._heap: list[list[object]] = []
        self._live = 0

    def add(self, worker: Worker) -> None:
        """Make ``worker`` eligible for new sessions (or refresh it after its key shrank)."""
        if worker.entry is None:
            self._live += 1
        entry: list[object] = [*worker.key(), worker]
        worker.entry = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * self._live + 16:
            self._compact()

    def discard(self, worker: Worker) -> None:
        """Stop offering ``worker`` for new sessions (its entry becomes garbage)."""
        if worker.entry is not None:
            worker.entry = None
            self._live -= 1

    def peek(self) -> Worker | None:
        """The worker a brute-force scan would choose, or ``None`` if there is none."""
        heap = self._heap
        while heap:
            entry = heap[0]
            worker: Worker = entry[5]  # type: ignore[assignment]
            if worker.entry is not entry:
                heapq.heappop(heap)
            elif entry[3] == worker.seq:
                # Every key *decrease* pushes a fresh entry, and every increase comes with a
                # dispatch, which bumps ``seq``: an unchanged ``seq`` means the key is current.
                return worker
            else:
                # Stale-low: the worker was sent credits since this entry was made.
                fresh: list[object] = [*worker.key(), worker]
                worker.entry = fresh
                heapq.heapreplace(heap, fresh)
        return None

    def __len__(self) -> int:
        return self._live

    def _compact(self) -> None:
        live = [e for e in self._heap if e[5].entry is e]  # type: ignore[attr-defined]
        heapq.heapify(live)
        self._heap = live
