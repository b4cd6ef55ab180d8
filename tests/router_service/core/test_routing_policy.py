"""``sticky=False`` (routing_policy ``least_loaded``): every credit is a new session.

The baseline ``credit-router run --compare`` measures stickiness against: no entry is ever made,
later turns and FORK children go to the least-loaded worker like first turns, and every credit
still ends exactly once with nothing left behind.
"""

from __future__ import annotations

from protocol import Status
from router_service.core.invariants import check_no_leak
from tests.router_service.core.harness import FORK, SPAWN, Harness


def _harness(**kwargs: object) -> Harness:
    h = Harness(sticky=False, **kwargs)
    for name in ("w0", "w1", "w2"):
        h.join(name, capacity=4)
    return h


def test_turns_of_one_session_follow_the_load_not_the_session() -> None:
    h = _harness()
    first = h.send("s", num_turns=3, fork_count=1)
    assert h.table.entries == {}
    busy = h.where(first)  # still running: the next turn of "s" goes elsewhere
    second = h.send("s", turn_index=1, num_turns=3)
    assert h.where(second) != busy
    child = h.send("k", parent_correlation_id="s", branch_mode=FORK)
    assert h.where(child) not in {busy, h.where(second)}  # least loaded: the idle third worker
    for c in (first, second, child):
        h.complete(c, session_ended=c is child)
    h.child_release("k")  # unknown to the table: counted, harmless
    assert h.core.stats.sticky_hits == 0
    assert h.core.stats.sticky_misses == 3
    assert h.table.entries == {}
    assert h.table.aliases == {}
    check_no_leak(h.core)


def test_fork_children_never_wait_for_a_parent_entry() -> None:
    h = _harness()
    orphan = h.send("k", parent_correlation_id="gone", branch_mode=FORK)
    assert orphan.id in h.sent_to  # sticky routing would reject it: parent_session_unavailable
    h.complete(orphan)
    assert h.outcome(orphan).status is Status.COMPLETED


def test_queued_credits_and_outcomes_stay_exactly_once() -> None:
    h = _harness()
    credits = [h.send(f"s{i}", num_turns=2) for i in range(14)]  # 12 slots: two wait
    assert len(h.sent_to) == 12
    assert len(h.core.queue) == 2
    spawn = h.send("sub", parent_correlation_id="s0", branch_mode=SPAWN, subagent_type="Explore")
    for c in credits[:3]:
        h.complete(c)
    assert spawn.id in h.sent_to
    assert not h.core.queue
    for c in [*credits[3:], spawn]:
        h.complete(c)
    assert {o.status for o in h.outcomes.values()} == {Status.COMPLETED}
    assert len(h.outcomes) == 15
    check_no_leak(h.core)
