"""The router's record of one credit that has no outcome yet (``Ticket``).

A module of its own so that ``make compile`` leaves it interpreted: mypyc builds a msgspec
``Struct`` subclass without its class keywords, which loses ``eq=False`` (identity hashing, so
tickets are dict keys), and identity written as Python ``__hash__``/``__eq__`` would cost a call
on every dict operation of the interpreted build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from protocol.messages import Credit

if TYPE_CHECKING:
    from router_service.core.table import Entry
    from router_service.core.workers import TicketQueue, Worker

__all__ = ["Ticket"]


class Ticket(msgspec.Struct, eq=False):
    """The router's record of one credit that has no outcome yet (queued or in flight).

    A msgspec Struct rather than a slotted class: it is built once per credit and msgspec's
    constructor is ~40% cheaper. ``eq=False`` keeps identity hashing, so tickets are dict keys.
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
    entry: Entry | None = None
    """In flight: the sticky entry its dispatch was booked on (it keeps that entry busy, so the
    idle TTL never evicts a session with a turn running), else ``None``."""
    queue: TicketQueue | None = None
    """Queued: the queue it waits in (``None`` once it left it)."""
    adopted: bool = False
    """Dispatched by a predecessor router and taken over from a worker's ``Hello`` (its
    ``credit`` holds only the id); the worker does not list it in in-flight reports."""

    def __repr__(self) -> str:
        where = self.worker.name if self.worker else "-"
        state = "queued" if self.dispatched_at < 0 else "in_flight"
        return f"<Ticket {self.producer}/{self.credit.id} {state} at {where}>"
