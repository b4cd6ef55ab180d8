"""The sticky-session tables: entries, FORK alias nodes and tombstones of lost sessions.

No I/O in this module, no clock reads: time is passed in as ``now``.

A session belongs to the producer that started it (``docs/ROUTING.md`` §1): its key is
``(producer, x_correlation_id)``. Each producer has its own ``SessionTable`` (entries, aliases,
tombstones), found in ``Sessions.tables`` by the producer key, so another producer's credits,
``EndSession``, ``ReleaseReservation`` or ``ChildRelease`` with the same id never reach it. One
table per producer rather than tuple or concatenated keys: an entry costs one pointer more (its
``table``), not a tuple or a longer string per session, and a leaving producer's sessions are
found without a scan of everyone's.

An entry pins a routing key (a root or SPAWN session) to a worker. The FORK tree hanging off it
is a set of *nodes*: the entry itself and one ``Alias`` per FORK descendant, each knowing its
parent node. A node holds reservations (FORK children its turns declared and that have not
started), and an alias is *live* while its session can still send turns. The entry's
``ref_count`` is always::

    (0 if parent_final_seen else 1) + reservations of all its nodes + live aliases

and the entry is evicted when it reaches zero (``docs/ROUTING.md`` §3). An alias stays
resolvable for as long as its session is live, holds reservations, or has aliases below it: a
grandchild's turns route through its parent's id, so AIPerf's nested-FORK hazard (the last
child releases before its own children start, and they lose the entry) cannot happen here.

``entries`` is kept in least-recently-used order (a plain dict keeps insertion order, and a
refresh re-inserts the key at the end), so both safety nets — idle TTL and the ``max_sessions``
cap — evict from the front in O(evicted).

A tombstone remembers why a session's entry went away (worker lost, idle, capacity) so that its
next credit migrates or is rejected with that reason. Tombstones are bounded the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router_service.core.workers import Worker

__all__ = ["NO_HISTORY", "Alias", "Entry", "SessionTable", "Sessions"]

NO_HISTORY = "/no_history"
"""Suffix of a tombstone whose session never completed a turn on the worker that was lost: no
history of it exists anywhere, so a retry of its turn 0 starts it afresh (``docs/ROUTING.md``
§3)."""


class Entry:
    """``routing key -> {worker, ref_count, parent_final_seen, aliases, last_used}``."""

    __slots__ = (
        "aliases",
        "busy",
        "has_history",
        "key",
        "last_used",
        "parent_final_seen",
        "ref_count",
        "reserved",
        "table",
        "worker",
    )

    def __init__(self, key: str, table: SessionTable, worker: Worker, now: float) -> None:
        self.key = key
        self.table = table
        """The producer's table it lives in."""
        self.worker = worker
        self.ref_count = 1
        self.parent_final_seen = False
        self.reserved = 0
        """FORK children this entry's own turns declared and that have not started."""
        self.aliases: set[str] | None = None
        """Its FORK descendants' ids (``None`` until the first: an empty set would cost 216
        bytes on every session, and most sessions never fork)."""
        self.last_used = now
        """Last activity: a dispatch or a completion of one of its credits."""
        self.busy = 0
        """Credits booked on it that are in flight: while any is, it is never idle."""
        self.has_history = False
        """A credit booked on it completed: its worker holds history of the session."""

    def __repr__(self) -> str:
        return (
            f"<Entry {self.table.producer}:{self.key} on {self.worker.name} ref={self.ref_count} "
            f"final_seen={self.parent_final_seen} reserved={self.reserved} "
            f"aliases={len(self.aliases or ())} busy={self.busy}>"
        )


class Alias:
    """A FORK descendant of an entry: how its id (and its children's turns) find the entry."""

    __slots__ = ("entry", "kids", "live", "parent", "reserved")

    def __init__(self, entry: Entry, parent: str) -> None:
        self.entry = entry
        self.parent = parent
        """The parent node's id: the entry's key or another alias."""
        self.live = True
        """Its session may still send turns."""
        self.reserved = 0
        """FORK children its turns declared and that have not started."""
        self.kids = 0
        """Aliases whose parent is this one."""

    def __repr__(self) -> str:
        return (
            f"<Alias of {self.entry.key} parent={self.parent} live={self.live} "
            f"reserved={self.reserved} kids={self.kids}>"
        )


class Sessions:
    """Every producer's ``SessionTable``, and the bounds they share."""

    __slots__ = ("live", "max_sessions", "tables")

    def __init__(self, max_sessions: int) -> None:
        self.tables: dict[str, SessionTable] = {}
        """By producer key (``name/incarnation``)."""
        self.max_sessions = max_sessions
        self.live = 0
        """Live entries over all tables (the ``max_sessions`` cap counts these)."""

    def table(self, producer: str) -> SessionTable:
        """``producer``'s table, made on first use."""
        table = self.tables.get(producer)
        if table is None:
            table = self.tables[producer] = SessionTable(producer, self)
        return table

    def oldest(self) -> Entry | None:
        """The least recently used entry over all producers (O(producers))."""
        best: Entry | None = None
        for table in self.tables.values():
            entry = table.oldest()
            if entry is not None and (best is None or entry.last_used < best.last_used):
                best = entry
        return best

    @property
    def aliases(self) -> int:
        """Live FORK aliases over all tables."""
        return sum(len(t.aliases) for t in self.tables.values())

    @property
    def fork_holds(self) -> int:
        """Counts held by FORK trees over all tables."""
        return sum(t.fork_holds for t in self.tables.values())

    def __len__(self) -> int:
        return self.live


class SessionTable:
    """One producer's entries by own key, FORK alias nodes, and tombstones, with their bounds."""

    __slots__ = ("aliases", "entries", "fork_holds", "producer", "sessions", "tombstones")

    def __init__(self, producer: str, sessions: Sessions) -> None:
        self.producer = producer
        """The producer key the sessions belong to (sent to workers in ``EndSession``)."""
        self.sessions = sessions
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, Alias] = {}
        self.tombstones: dict[str, str] = {}
        """Key of a session whose entry went away -> the reason (oldest first)."""
        self.fork_holds = 0
        """Counts held by FORK trees over all entries (reservations + live children): a
        gauge kept incrementally, so a scrape never walks the table."""

    @property
    def max_sessions(self) -> int:
        return self.sessions.max_sessions

    def resolve(self, key: str) -> Entry | None:
        """The entry ``key`` routes to: its own, or the one it is a FORK alias of."""
        entry = self.entries.get(key)
        if entry is None:
            alias = self.aliases.get(key)
            if alias is not None:
                return alias.entry
        return entry

    def create(self, key: str, worker: Worker, now: float) -> Entry:
        """Pin a new own-keyed session to ``worker``."""
        entry = Entry(key, self, worker, now)
        self.entries[key] = entry
        worker.sessions[entry] = None
        self.sessions.live += 1
        self.tombstones.pop(key, None)
        return entry

    def touch(self, entry: Entry, now: float) -> None:
        """Mark ``entry`` used: it moves to the back of the eviction order."""
        entry.last_used = now
        entries = self.entries
        key = entry.key
        del entries[key]
        entries[key] = entry

    def end_own(self, entry: Entry) -> bool:
        """The entry's own session has ended (its final turn went out, or the producer ended
        it): its own count goes, once. Returns whether nothing holds the entry any more."""
        if not entry.parent_final_seen:
            entry.parent_final_seen = True
            entry.ref_count -= 1
        return entry.ref_count == 0

    def reserve(self, entry: Entry, node: str, count: int) -> None:
        """Node ``node`` (the entry key or an alias) declares ``count`` FORK children."""
        alias = self.aliases.get(node) if node != entry.key else None
        if alias is not None:
            alias.reserved += count
        else:
            entry.reserved += count
        entry.ref_count += count
        self.fork_holds += count

    def unreserve(self, entry: Entry, node: str, count: int) -> int:
        """Give back up to ``count`` of ``node``'s reservations; returns how many were held."""
        alias = self.aliases.get(node) if node != entry.key else None
        if alias is not None:
            n = min(count, alias.reserved)
            alias.reserved -= n
            entry.ref_count -= n
            self.fork_holds -= n
            self._prune(node, alias)
        else:
            n = min(count, entry.reserved)
            entry.reserved -= n
            entry.ref_count -= n
            self.fork_holds -= n
        return n

    def start_child(self, entry: Entry, parent: str, child: str) -> bool:
        """FORK ``child`` of node ``parent`` starts: it takes one of the parent's reservations.

        Returns False if the parent had none left (an undeclared child, counted by the caller;
        it is admitted all the same, with a count of its own).
        """
        alias = Alias(entry, parent)
        self.aliases[child] = alias
        if entry.aliases is None:
            entry.aliases = {child}
        else:
            entry.aliases.add(child)
        entry.ref_count += 1
        self.fork_holds += 1
        above = self.aliases.get(parent)
        if above is not None:
            above.kids += 1  # before the claim below, so the parent is not pruned meanwhile
        declared = self.unreserve(entry, parent, 1) == 1
        return declared

    def end_child(self, child: str) -> Entry | None:
        """FORK ``child``'s session ended (idempotent). Returns its entry if it was live."""
        alias = self.aliases.get(child)
        if alias is None or not alias.live:
            return None
        alias.live = False
        alias.entry.ref_count -= 1
        self.fork_holds -= 1
        self._prune(child, alias)
        return alias.entry

    def _prune(self, key: str, alias: Alias) -> None:
        """Drop ``alias`` and then its ancestors while nothing can route through them any more."""
        aliases = self.aliases
        while not alias.live and not alias.reserved and not alias.kids:
            del aliases[key]
            assert alias.entry.aliases is not None
            alias.entry.aliases.discard(key)
            key = alias.parent
            above = aliases.get(key)
            if above is None:
                return
            above.kids -= 1
            alias = above

    def remove(self, entry: Entry, reason: str | None, *, lost: bool = False) -> None:
        """Drop ``entry`` and its aliases; with a ``reason``, leave tombstones for its sessions.

        ``lost``: its worker is gone, so an own session that never completed a turn has no
        history anywhere (its tombstone says so, ``NO_HISTORY``).
        """
        del self.entries[entry.key]
        del entry.worker.sessions[entry]
        self.sessions.live -= 1
        children = entry.aliases or ()
        aliases = self.aliases
        live = []
        released = entry.reserved
        for child in children:
            alias = aliases.pop(child)
            released += alias.reserved + alias.live
            if alias.live:
                live.append(child)
        self.fork_holds -= released
        if reason is not None:
            tombstones = self.tombstones
            # Only sessions that may still send turns need a tombstone.
            if not entry.parent_final_seen:
                fresh = lost and not entry.has_history
                tombstones[entry.key] = reason + NO_HISTORY if fresh else reason
            for child in live:
                tombstones[child] = reason
            while len(tombstones) > self.max_sessions:
                del tombstones[next(iter(tombstones))]
        entry.aliases = None
        entry.ref_count = 0  # the mark of a removed entry: a live one always holds >= 1

    def oldest(self) -> Entry | None:
        """The least recently used entry."""
        for entry in self.entries.values():
            return entry
        return None

    def __contains__(self, key: str) -> bool:
        return key in self.entries or key in self.aliases
