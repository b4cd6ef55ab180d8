"""The sticky-session table: entries, FORK aliases and tombstones of lost sessions.

No I/O in this module, no clock reads: time is passed in as ``now``.

An entry pins a routing key to a worker. Its ``ref_count`` is always
``(0 if parent_final_seen else 1) + reserved + len(aliases)``: the own session while its final
turn has not been dispatched, one count per FORK child declared but not started (``reserved``),
and one per FORK descendant that has started and not ended (``aliases``). The entry is evicted
when that sum reaches zero, so a nested FORK (a child whose turn declares grandchildren) keeps the
shared entry alive by construction (``routing.md`` §3).

``entries`` is kept in least-recently-used order (a plain dict: Python keeps insertion order and a
refresh re-inserts the key at the end), so both safety nets — idle TTL and the ``max_sessions``
cap — evict from the front in O(evicted).

A tombstone remembers why a session's entry went away (worker lost, idle, capacity) so its next
credit can migrate or be rejected with that reason. Tombstones are bounded the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router_service.core.workers import Worker

__all__ = ["Entry", "SessionTable"]


class Entry:
    """``routing key -> {worker, ref_count, parent_final_seen, aliases, last_used}``."""

    __slots__ = (
        "aliases",
        "key",
        "last_used",
        "parent_final_seen",
        "ref_count",
        "reserved",
        "worker",
    )

    def __init__(self, key: str, worker: Worker, now: float) -> None:
        self.key = key
        self.worker = worker
        self.ref_count = 1
        self.parent_final_seen = False
        self.reserved = 0
        """FORK children declared and not yet started (or released)."""
        self.aliases: set[str] | None = None
        """Live FORK descendants that resolve to this entry (``None`` until the first: an empty
        set would cost 216 bytes on every session, most of which never fork)."""
        self.last_used = now

    def __repr__(self) -> str:
        return (
            f"<Entry {self.key} on {self.worker.name} ref={self.ref_count} "
            f"final_seen={self.parent_final_seen} reserved={self.reserved} "
            f"aliases={len(self.aliases or ())}>"
        )


class SessionTable:
    """Entries by own key, aliases of FORK descendants, and tombstones, with their bounds."""

    __slots__ = ("aliases", "entries", "max_sessions", "tombstones")

    def __init__(self, max_sessions: int) -> None:
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, Entry] = {}
        self.tombstones: dict[str, str] = {}
        """Key of a session whose entry went away -> the reason (oldest first)."""
        self.max_sessions = max_sessions

    def resolve(self, key: str) -> Entry | None:
        """The entry ``key`` routes to: its own, or the one it is a FORK alias of."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self.aliases.get(key)
        return entry

    def create(self, key: str, worker: Worker, now: float) -> Entry:
        """Pin a new own-keyed session to ``worker``."""
        entry = Entry(key, worker, now)
        self.entries[key] = entry
        worker.sessions[key] = entry
        self.tombstones.pop(key, None)
        return entry

    def touch(self, entry: Entry, now: float) -> None:
        """Mark ``entry`` used: it moves to the back of the eviction order."""
        entry.last_used = now
        entries = self.entries
        key = entry.key
        del entries[key]
        entries[key] = entry

    def add_alias(self, child: str, entry: Entry) -> None:
        """A FORK child has started on ``entry``: it now counts toward the entry's life."""
        if entry.aliases is None:
            entry.aliases = {child}
        else:
            entry.aliases.add(child)
        entry.ref_count += 1
        self.aliases[child] = entry

    def drop_alias(self, child: str, entry: Entry) -> None:
        """A FORK child session has ended (idempotent: only the first call counts)."""
        if entry.aliases is not None and child in entry.aliases:
            entry.aliases.discard(child)
            entry.ref_count -= 1
            del self.aliases[child]

    def remove(self, entry: Entry, reason: str | None) -> None:
        """Drop ``entry`` and its aliases; with a ``reason``, leave tombstones for its sessions."""
        del self.entries[entry.key]
        del entry.worker.sessions[entry.key]
        children = entry.aliases or ()
        aliases = self.aliases
        for child in children:
            del aliases[child]
        if reason is not None:
            tombstones = self.tombstones
            # Only sessions that may still send turns need a tombstone.
            if not entry.parent_final_seen:
                tombstones[entry.key] = reason
            for child in children:
                tombstones[child] = reason
            while len(tombstones) > self.max_sessions:
                del tombstones[next(iter(tombstones))]
        entry.aliases = None
        entry.ref_count = 0

    def oldest(self) -> Entry | None:
        """The least recently used entry."""
        for entry in self.entries.values():
            return entry
        return None
