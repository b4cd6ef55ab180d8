"""docs/ROUTING.md §2–§3 row by row, and the seed PR's test plan (ai-dynamo/aiperf#966)."""

from __future__ import annotations

import pytest

from protocol import EndSession, Status
from router_service.core.invariants import check_no_leak
from tests.router_service.core.harness import FORK, SPAWN, Harness


@pytest.fixture
def h() -> Harness:
    h = Harness()
    for name in ("w0", "w1", "w2", "w3"):
        h.join(name)
    return h


def test_single_turn_root_allocates_nothing(h: Harness) -> None:
    c = h.send("solo")
    assert h.table.entries == {}
    assert all(not w.sessions for w in h.core.workers.values())
    h.complete(c)
    assert h.outcome(c).status is Status.COMPLETED
    check_no_leak(h.core)


def test_multi_turn_session_is_sticky_and_final_turn_pops_the_entry(h: Harness) -> None:
    workers = set()
    for turn in range(4):
        c = h.send("s", turn_index=turn, num_turns=4)
        workers.add(h.where(c))
        if turn < 3:
            assert h.table.entries["s"].ref_count == 1
        h.complete(c)
    assert len(workers) == 1
    assert "s" not in h.table.entries
    check_no_leak(h.core)


def test_new_sessions_spread_least_loaded(h: Harness) -> None:
    first = [h.send(f"s{i}", num_turns=3) for i in range(4)]
    assert sorted(h.where(c) for c in first) == ["w0", "w1", "w2", "w3"]


def test_refcount_register_and_release(h: Harness) -> None:
    """Seed PR: a declaring turn registers one count per FORK child; releases bring it back."""
    root = h.send("root", num_turns=2, fork_count=2)
    entry = h.table.entries["root"]
    assert (entry.ref_count, entry.reserved) == (3, 2)
    h.complete(root)
    kids = [h.send(f"k{i}", parent_correlation_id="root", branch_mode=FORK) for i in range(2)]
    assert {h.where(k) for k in kids} == {h.where(root)}
    assert (entry.ref_count, entry.reserved, entry.aliases) == (3, 0, {"k0", "k1"})
    for k in kids:
        h.complete(k)
        h.child_release(k.x_correlation_id)
    assert entry.ref_count == 1
    h.child_release("k0")  # idempotent by child id
    assert entry.ref_count == 1
    h.complete(h.send("root", turn_index=1, num_turns=2))
    check_no_leak(h.core)


def test_eviction_only_when_count_is_zero_and_parent_final_seen(h: Harness) -> None:
    root = h.send("root", num_turns=1, fork_count=1)  # final turn that forks
    entry = h.table.entries["root"]
    assert entry.parent_final_seen
    assert entry.ref_count == 1
    h.complete(root)
    kid = h.send("kid", parent_correlation_id="root", branch_mode=FORK, num_turns=2)
    h.complete(kid)
    assert "root" in h.table.entries  # the child still holds it
    kid2 = h.send("kid", parent_correlation_id="root", branch_mode=FORK, turn_index=1, num_turns=2)
    assert h.where(kid2) == h.where(root)
    h.complete(kid2)
    assert "root" in h.table.entries  # a child's final turn never touches the parent
    h.child_release("kid")
    check_no_leak(h.core)


def test_final_turn_with_forks_keeps_the_entry(h: Harness) -> None:
    h.complete(h.send("root", num_turns=2))
    last = h.send("root", turn_index=1, num_turns=2, fork_count=3)
    entry = h.table.entries["root"]
    assert entry.parent_final_seen
    assert entry.ref_count == 3
    h.complete(last)
    h.release("root", 3)
    check_no_leak(h.core)


def test_missing_parent_rejects_fork_child(h: Harness) -> None:
    c = h.send("orphan", parent_correlation_id="never-was", branch_mode=FORK)
    assert h.outcome(c).status is Status.REJECTED
    assert h.outcome(c).reason == "parent_session_unavailable"
    assert c.id not in h.sent_to


def test_dag_child_final_turn_leaves_parent_untouched(h: Harness) -> None:
    h.complete(h.send("root", num_turns=3, fork_count=1))
    entry = h.table.entries["root"]
    before = (entry.ref_count, entry.parent_final_seen)
    kid = h.send("kid", parent_correlation_id="root", branch_mode=FORK)  # single-turn: final
    h.complete(kid)
    assert (entry.ref_count, entry.parent_final_seen) == before
    # A SPAWN child's final turn does not touch the parent either.
    spawn = h.send("sub", parent_correlation_id="root", branch_mode=SPAWN, num_turns=2)
    h.complete(spawn)
    assert (entry.ref_count, entry.parent_final_seen) == before


@pytest.mark.parametrize("kind", ["Explore", "Codex Subagent"])
def test_subagent_type_accepted_on_spawn(h: Harness, kind: str) -> None:
    h.send("root", num_turns=2)
    c = h.send("sub", parent_correlation_id="root", branch_mode=SPAWN, subagent_type=kind)
    h.complete(c)
    assert h.outcome(c).status is Status.COMPLETED
    assert h.outcome(c).subagent_type == kind


def test_subagent_type_rejected_on_fork(h: Harness) -> None:
    h.send("root", num_turns=2, fork_count=1)
    c = h.send("kid", parent_correlation_id="root", branch_mode=FORK, subagent_type="Explore")
    assert h.outcome(c).status is Status.REJECTED
    assert h.outcome(c).reason.startswith("invalid_credit:")
    assert "SPAWN" in h.outcome(c).reason


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"turn_index": 3, "num_turns": 3}, "turn_index"),
        ({"num_turns": 0}, "turn_index"),
        ({"fork_count": -1}, "fork_count"),
        ({"branch_mode": FORK}, "parent_correlation_id"),
    ],
)
def test_invalid_credits_are_rejected_with_the_problem(h: Harness, fields, needle) -> None:
    c = h.send("x", **fields)
    assert h.outcome(c).status is Status.REJECTED
    assert needle in h.outcome(c).reason


def test_empty_correlation_id_is_rejected(h: Harness) -> None:
    c = h.send("")
    assert "x_correlation_id" in h.outcome(c).reason


def test_spawn_children_are_own_keyed_and_spread(h: Harness) -> None:
    root = h.send("root", num_turns=2)
    subs = [
        h.send(f"sub{i}", parent_correlation_id="root", branch_mode=SPAWN, num_turns=3)
        for i in range(3)
    ]
    assert len({h.where(s) for s in subs}) == 3  # not piled on the parent's worker
    assert h.where(root) not in {h.where(s) for s in subs}
    for s in subs:
        assert h.table.entries[s.x_correlation_id].worker.name == h.where(s)


def test_fork_under_spawn_co_locates(h: Harness) -> None:
    h.send("root", num_turns=2)
    sub = h.send("sub", parent_correlation_id="root", branch_mode=SPAWN, num_turns=2, fork_count=1)
    kid = h.send("kid", parent_correlation_id="sub", branch_mode=FORK)
    assert h.where(kid) == h.where(sub)


def test_release_of_unused_reservation(h: Harness) -> None:
    c = h.send("root", fork_count=2)  # single-turn root that declares two children
    h.complete(c)
    assert h.table.entries["root"].ref_count == 2
    h.release("root", 5)  # more than reserved: only the reserved count is given back
    check_no_leak(h.core)


def test_producer_ends_a_session_early(h: Harness) -> None:
    c = h.send("s", num_turns=10)
    h.complete(c)
    h.end_session("s")
    ends = [(w, m.x_correlation_id) for w, m in h.to_worker if isinstance(m, EndSession)]
    assert ends == [(h.where(c), "s")]  # the worker is told, so it can drop the history
    check_no_leak(h.core)


def test_undeclared_fork_child_is_counted_not_leaked(h: Harness) -> None:
    h.complete(h.send("root", num_turns=2))
    kid = h.send("kid", parent_correlation_id="root", branch_mode=FORK)
    assert h.core.stats.undeclared_forks == 1
    assert h.where(kid) == h.table.entries["root"].worker.name
    h.complete(kid)
    h.child_release("kid")
    h.complete(h.send("root", turn_index=1, num_turns=2))
    check_no_leak(h.core)


def test_submit_to_dispatch_delay_is_measured(h: Harness) -> None:
    h2 = Harness()
    h2.join("only", capacity=1)
    a = h2.send("a")
    b = h2.send("b")
    h2.now = 2.5
    h2.complete(a)
    h2.now = 3.0
    h2.complete(b)
    assert h2.outcome(a).submit_to_dispatch_s == 0.0
    assert h2.outcome(b).submit_to_dispatch_s == pytest.approx(2.5)
    assert h2.outcome(b).dispatch_to_outcome_s == pytest.approx(0.5)


def test_session_ended_completion_releases_a_fork_child(h: Harness) -> None:
    """The acked completion carries the release too (a ChildRelease may die with a link)."""
    h.complete(h.send("root", fork_count=1))
    kid = h.send("kid", parent_correlation_id="root", branch_mode=FORK)
    h.complete(kid, session_ended=True)
    check_no_leak(h.core)
    h.child_release("kid")  # the message arriving as well changes nothing
    check_no_leak(h.core)


def test_worker_is_told_when_released_reservations_free_a_parent(h: Harness) -> None:
    root = h.send("root", fork_count=2)  # final turn: the worker keeps history for the kids
    h.complete(root)
    h.release("root", 2)
    assert (
        h.where(root),
        EndSession(x_correlation_id="root", reason="released", producer="p"),
    ) in h.to_worker
