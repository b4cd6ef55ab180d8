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
from typing import TYPE_CHECKING

import msgspec

from protocol.messages import Credit

if TYPE_CHECKING:
    from router_service.core.table import Entry

__all__ = ["LoadIndex", "Ticket", "Worker", "WorkerState"]


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


class Ticket(msgspec.Struct, eq=False):
    """The router's record of one credit that has no outcome yet (queued or in flight).

    A msgspec Struct rather than a slotted class: it is built once per credit and msgspec's
    constructor is ~40% cheaper. ``eq=False`` keeps identity hashing, so tickets live in sets.
    """

    producer: str
    credit: Credit
    submitted_at: float
    dispatched_at: float = -1.0
    """Negative while queued."""
    worker: Worker | None = None
    """The worker that holds it (in flight) or whose queue it waits in."""
    missed: bool = False
    """Missing from the worker's last in-flight report (first strike)."""
    booked: bool = False
    """Its entry book-keeping (docs/ROUTING.md §3) is done: it was dispatched once and handed
    back undelivered, so a second dispatch must not count it again."""

    def __repr__(self) -> str:
        where = self.worker.name if self.worker else "-"
        state = "queued" if self.dispatched_at < 0 else "in_flight"
        return f"<Ticket {self.producer}/{self.credit.id} {state} at {where}>"


class Worker:
    """One connected worker agent, as the router sees it."""

    __slots__ = (
        "capacity",
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
        "pending",
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
        self.tickets: set[Ticket] = set()
        """Credits in flight on it; ``len`` is its load."""
        self.sessions: dict[str, Entry] = {}
        """Sticky entries pinned to it, by their key."""
        self.sent = 0
        """Credits sent (a late joiner starts at the fleet mean)."""
        self.dispatched = 0
        """Credits dispatched to it since it joined (a true counter, for its metrics)."""
        self.outcomes: dict[str, int] = {}
        """Outcomes of credits dispatched to it, by status (for its metrics)."""
        self.seq = 0
        """Router-wide sequence number of its last dispatch (older = smaller = preferred)."""
        self.queue: deque[Ticket] = deque()
        """Credits of its sessions waiting for a free slot on it."""
        self.pending: dict[str, list[Credit]] = {}
        """Credits chosen for it since the effects were last taken, by producer."""
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
