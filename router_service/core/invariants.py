"""The invariants of ``docs/ROUTING.md`` §7, checkable after any event (tests and fuzzing use this).

``check_invariants(core)`` raises ``AssertionError`` naming the first broken invariant.
It walks the whole state, so it is for tests, never for the hot path. ``HistoryWitness``
checks invariant 8 from outside the core: it watches what the core tells workers.
"""

from __future__ import annotations

from collections.abc import Mapping

from protocol.messages import BranchMode, Credit
from router_service.core.router import Effects, RouterCore
from router_service.core.table import SessionTable
from router_service.core.workers import Ticket, Worker, WorkerState

__all__ = ["HistoryWitness", "check_invariants", "check_no_leak"]


def check_invariants(
    core: RouterCore, *, submitted: int | None = None, outcomes: int | None = None
) -> None:
    """Assert invariants 1–6 of ``docs/ROUTING.md`` §7 (and the tables' own bookkeeping).

    Args:
        core: the router to check.
        submitted: credits the test submitted (distinct keys), if it counts them.
        outcomes: outcomes the test received, if it counts them.
    """
    workers = core.workers
    # 1. Sum over workers of in-flight = dispatched credits without an outcome.
    tickets = [t for ledger in core.ledgers.values() for t in ledger.values()]
    dispatched = [t for t in tickets if t.dispatched_at >= 0]
    queued = [t for t in tickets if t.dispatched_at < 0]
    in_flight = sum(len(w.tickets) for w in workers.values())
    assert in_flight == len(dispatched), (
        f"I1: in-flight {in_flight} != dispatched {len(dispatched)}"
    )
    for t in dispatched:
        assert t.worker is not None, f"I1: {t!r} has no worker"
        assert t.worker.name in workers, f"I1: {t!r} on a gone worker"
        assert t in t.worker.tickets, f"I1: {t!r} missing from its worker"
        assert t.queue is None, f"I1: {t!r} is in flight and queued"
    # 2. submitted = outcomes + in flight + queued; queued credits are exactly the queues' content.
    queues = [core.queue, *(w.queue for w in workers.values())]
    waiting = [t for q in queues for t in q]
    assert len(waiting) == len(set(map(id, waiting))), "I2: a credit is queued twice"
    assert {id(t) for t in waiting} == {id(t) for t in queued}, "I2: queues != queued tickets"
    for q in queues:
        assert len(q) == sum(1 for _ in q), f"I2: {q!r} counts its live tickets wrong"
    for t in core.queue:
        assert t.worker is None, f"I2: {t!r} in the global queue names a worker"
    for w in workers.values():
        for t in w.queue:
            assert t.worker is w, f"I2: {t!r} in {w.name}'s queue names another worker"
    emitted = sum(core.stats.outcomes.values())
    # (Adopted credits were submitted to a predecessor router; they end here all the same,
    # except those their producer's own submission of the id displaced: they end unreported.)
    stats = core.stats
    accepted = stats.submitted + stats.adopted - stats.adoptions_displaced
    assert accepted == emitted + len(tickets), (
        f"I2: submitted {stats.submitted} + adopted {stats.adopted} - displaced "
        f"{stats.adoptions_displaced} != outcomes {emitted} + open {len(tickets)}"
    )
    for t in tickets:
        if t.adopted:
            assert t.dispatched_at >= 0, f"I2: adopted {t!r} is not in flight"
            assert t.entry is None, f"I2: adopted {t!r} is booked on a session"
    if submitted is not None:
        assert submitted == core.stats.submitted, f"I2: core counted {core.stats.submitted}"
    if outcomes is not None:
        assert outcomes == emitted, f"I2: received {outcomes} outcomes, core emitted {emitted}"
    _check_sessions(core, dispatched)
    _check_index(core)


def _check_sessions(core: RouterCore, dispatched: list[Ticket]) -> None:
    """Invariants 3–5 over every producer's table."""
    workers = core.workers
    live = 0
    for producer, table in core.sessions.tables.items():
        assert table.producer == producer, f"I3: {producer}'s table says {table.producer}"
        _check_table(table, workers)
        live += len(table.entries)
    assert core.sessions.live == live, f"I3: {core.sessions.live} live entries counted, {live}"
    # An entry is busy exactly while credits booked on it are in flight.
    busy: dict[int, int] = {}
    for t in dispatched:
        if t.entry is not None and t.entry.ref_count:
            busy[id(t.entry)] = busy.get(id(t.entry), 0) + 1
    for table in core.sessions.tables.values():
        for entry in table.entries.values():
            assert entry.busy == busy.get(id(entry), 0), f"I3: {entry!r} busy != {busy}"
    # 5. A worker's live-session count equals the entries pinned to it.
    for name, worker in workers.items():
        pinned = {
            id(e)
            for t in core.sessions.tables.values()
            for e in t.entries.values()
            if e.worker is worker
        }
        assert {id(e) for e in worker.sessions} == pinned, f"I5: {name} sessions != pinned"
        assert worker.state is not WorkerState.GONE, f"I5: gone worker {name} still listed"
        if worker.closed_until is not None:
            assert worker.state is WorkerState.SUSPECT, f"I5: closed {name} is not suspect"


def _check_index(core: RouterCore) -> None:
    """Invariant 6: the min-load index agrees with a brute-force scan."""
    workers = core.workers
    eligible = [w for w in workers.values() if w.state is WorkerState.ACTIVE]
    expected_best = min(eligible, key=lambda w: w.key()) if eligible else None
    assert len(core.index) == len(eligible), f"I6: index has {len(core.index)} of {len(eligible)}"
    got = core.index.peek()
    assert got is expected_best, f"I6: index picks {got!r}, scan picks {expected_best!r}"


def _check_table(table: SessionTable, workers: Mapping[str, Worker]) -> None:
    """Invariants 3 and 4 within one producer's table."""
    # 3. ref_count >= 0; no entry with ref_count 0 and parent_final_seen; the count adds up.
    for key, entry in table.entries.items():
        assert entry.key == key, f"I3: {entry!r} filed under {key}"
        assert entry.table is table, f"I3: {entry!r} names another table"
        assert entry.ref_count >= 1, f"I3: {entry!r} is live with nothing holding it"
        nodes = [table.aliases[k] for k in entry.aliases or ()]
        own = 0 if entry.parent_final_seen else 1
        expected = own + entry.reserved + sum(a.reserved + a.live for a in nodes)
        assert entry.ref_count == expected, f"I3: {entry!r} should count {expected}"
        assert entry.reserved >= 0, f"I3: {entry!r} reserved < 0"
        assert entry.worker.name in workers, f"I5: {entry!r} pinned to a gone worker"
        assert workers[entry.worker.name] is entry.worker, f"I5: {entry!r} on a replaced worker"
        assert entry in entry.worker.sessions, f"I5: {entry!r} not listed by its worker"
    # 4. Every alias points to a live entry; an entry's aliases are exactly its FORK descendants
    #    that can still route: live, holding reservations, or with aliases below them.
    for child, alias in table.aliases.items():
        entry = alias.entry
        assert table.entries.get(entry.key) is entry, f"I4: alias {child} -> dead {entry!r}"
        assert child in (entry.aliases or ()), f"I4: alias {child} not listed by {entry!r}"
        assert alias.live or alias.reserved or alias.kids, f"I4: {child} {alias!r} is dead"
        assert alias.reserved >= 0, f"I4: {child} {alias!r} reserved < 0"
        assert alias.parent == entry.key or table.aliases.get(alias.parent) is not None, (
            f"I4: {child}'s parent {alias.parent} cannot route"
        )
        kids = sum(1 for a in table.aliases.values() if a.parent == child)
        assert alias.kids == kids, f"I4: {child} counts {alias.kids} kids, has {kids}"
    holds = sum(e.reserved for e in table.entries.values()) + sum(
        a.reserved + a.live for a in table.aliases.values()
    )
    assert table.fork_holds == holds, f"I3: fork_holds {table.fork_holds} != {holds}"
    listed = sum(len(e.aliases or ()) for e in table.entries.values())
    assert listed == len(table.aliases), f"I4: {listed} listed aliases != {len(table.aliases)}"


def check_no_leak(core: RouterCore) -> None:
    """Invariant 7: once every session has ended, nothing is left behind."""
    for producer, table in core.sessions.tables.items():
        assert not table.entries, (
            f"I7: {producer}'s entries left: {list(table.entries.values())[:5]}"
        )
        assert not table.aliases, f"I7: {producer}'s aliases left: {list(table.aliases)[:5]}"
    assert core.sessions.live == 0, f"I7: {core.sessions.live} entries counted"
    for name, worker in core.workers.items():
        assert not worker.sessions, f"I7: {name} still counts {len(worker.sessions)} sessions"
        assert not worker.tickets, f"I7: {name} still holds {len(worker.tickets)} credits"
    assert not any(core.ledgers.values()), "I7: credits without an outcome"


class HistoryWitness:
    """Invariant 8, watched from outside: a non-first turn of a session, and every FORK child,
    is dispatched to the worker that holds its history, or ends with an explicit outcome
    (rejected, or migrated and counted) — never silently elsewhere.

    The witness remembers, per ``(producer, session)``, the worker incarnation its turns were
    dispatched to (a FORK child's first turn inherits its parent's). Feed it every ``Effects``
    (``observe``) right after the core produced them. A dispatch elsewhere must be paid for by
    a counted migration or re-home (``stats.migrations`` + ``stats.rehomes``) not yet used.
    """

    def __init__(self) -> None:
        self.holder: dict[tuple[str, str], tuple[str, str]] = {}
        """``(producer, session)`` -> ``(worker name, incarnation)`` holding its history."""
        self.paid = 0
        """Migrations and re-homes already matched to a dispatch elsewhere."""
        self.checked = 0
        """Dispatches the witness judged (a test can assert it judged something)."""

    def observe(self, core: RouterCore, fx: Effects) -> None:
        """Check every dispatch in ``fx`` (call before the next core call)."""
        if not core.sticky:
            return
        for name, item in fx.to_worker:
            if not isinstance(item, tuple):
                continue
            producer, credits = item
            worker = core.workers.get(name)
            assert worker is not None, f"I8: dispatch to unknown worker {name}"
            here = (name, worker.incarnation)
            for credit in credits:
                self._dispatched(core, producer, credit, here)

    def _dispatched(
        self, core: RouterCore, producer: str, credit: Credit, here: tuple[str, str]
    ) -> None:
        key = (producer, credit.x_correlation_id)
        fork = credit.branch_mode is BranchMode.FORK
        if fork and key not in self.holder:
            parent = (producer, credit.parent_correlation_id or "")
            expected = self.holder.get(parent)
            assert expected is not None, f"I8: FORK child {key} ran without a known parent"
        elif credit.turn_index > 0 or fork:
            expected = self.holder.get(key)
        else:
            expected = None  # a first turn goes anywhere
        if expected is not None:
            self.checked += 1
            if expected != here:
                budget = core.stats.migrations + core.stats.rehomes - self.paid
                assert budget > 0, (
                    f"I8: {key} turn {credit.turn_index} ran on {here}, its history is on "
                    f"{expected}, and no migration was counted"
                )
                self.paid += 1
        self.holder[key] = here
