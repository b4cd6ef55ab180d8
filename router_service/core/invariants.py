"""The invariants of ``docs/ROUTING.md`` §7, checkable after any event (tests and fuzzing use this).

``check_invariants(core)`` raises ``AssertionError`` naming the first broken invariant.
It walks the whole state, so it is for tests, never for the hot path.
"""

from __future__ import annotations

from router_service.core.router import RouterCore
from router_service.core.workers import WorkerState

__all__ = ["check_invariants", "check_no_leak"]


def check_invariants(
    core: RouterCore, *, submitted: int | None = None, outcomes: int | None = None
) -> None:
    """Assert invariants 1–6 of ``docs/ROUTING.md`` §7 (and the table's own bookkeeping).

    Args:
        core: the router to check.
        submitted: credits the test submitted (distinct keys), if it counts them.
        outcomes: outcomes the test received, if it counts them.
    """
    table = core.table
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
    # 2. submitted = outcomes + in flight + queued; queued credits are exactly the queues' content.
    waiting = list(core.queue) + [t for w in workers.values() for t in w.queue]
    assert len(waiting) == len(set(map(id, waiting))), "I2: a credit is queued twice"
    assert {id(t) for t in waiting} == {id(t) for t in queued}, "I2: queues != queued tickets"
    emitted = sum(core.stats.outcomes.values())
    assert core.stats.submitted == emitted + len(tickets), (
        f"I2: submitted {core.stats.submitted} != outcomes {emitted} + open {len(tickets)}"
    )
    if submitted is not None:
        assert submitted == core.stats.submitted, f"I2: core counted {core.stats.submitted}"
    if outcomes is not None:
        assert outcomes == emitted, f"I2: received {outcomes} outcomes, core emitted {emitted}"
    # 3. ref_count >= 0; no entry with ref_count 0 and parent_final_seen; the count adds up.
    for key, entry in table.entries.items():
        assert entry.key == key, f"I3: {entry!r} filed under {key}"
        assert entry.ref_count >= 0, f"I3: negative {entry!r}"
        assert not (entry.ref_count == 0 and entry.parent_final_seen), f"I3: dead {entry!r}"
        nodes = [table.aliases[k] for k in entry.aliases or ()]
        own = 0 if entry.parent_final_seen else 1
        expected = own + entry.reserved + sum(a.reserved + a.live for a in nodes)
        assert entry.ref_count == expected, f"I3: {entry!r} should count {expected}"
        assert entry.reserved >= 0, f"I3: {entry!r} reserved < 0"
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
    # 5. A worker's live-session count equals the entries pinned to it.
    for name, worker in workers.items():
        pinned = {k for k, e in table.entries.items() if e.worker is worker}
        assert set(worker.sessions) == pinned, f"I5: {name} sessions != pinned entries"
        assert worker.state is not WorkerState.GONE, f"I5: gone worker {name} still listed"
    for entry in table.entries.values():
        assert entry.worker.name in workers, f"I5: {entry!r} pinned to a gone worker"
    # 6. The min-load index agrees with a brute-force scan.
    eligible = [w for w in workers.values() if w.state is WorkerState.ACTIVE]
    expected_best = min(eligible, key=lambda w: w.key()) if eligible else None
    assert len(core.index) == len(eligible), f"I6: index has {len(core.index)} of {len(eligible)}"
    got = core.index.peek()
    assert got is expected_best, f"I6: index picks {got!r}, scan picks {expected_best!r}"


def check_no_leak(core: RouterCore) -> None:
    """Invariant 7: once every session has ended, nothing is left behind."""
    assert not core.table.entries, f"I7: entries left: {list(core.table.entries.values())[:5]}"
    assert not core.table.aliases, f"I7: aliases left: {list(core.table.aliases)[:5]}"
    for name, worker in core.workers.items():
        assert not worker.sessions, f"I7: {name} still counts {len(worker.sessions)} sessions"
        assert not worker.tickets, f"I7: {name} still holds {len(worker.tickets)} credits"
    assert not any(core.ledgers.values()), "I7: credits without an outcome"
