"""One test per AIPerf 0.13.0 defect (docs/AIPERF.md §1 [A]–[E] and §3), each
proving credit-router does not have it."""

from __future__ import annotations

from protocol import Cancel, Completion, Status
from router_service.core.invariants import check_no_leak
from tests.router_service.core.harness import FORK, SPAWN, Harness


def fleet(n: int = 8, capacity: int = 64) -> Harness:
    h = Harness()
    for i in range(n):
        h.join(f"worker_{i:04d}", capacity=capacity)
    return h


def test_A_spawn_siblings_do_not_pile_onto_the_parent_worker() -> None:
    h = fleet()
    parent = h.send("parent", num_turns=3)
    subs = [
        h.send(f"sub{i}", parent_correlation_id="parent", branch_mode=SPAWN, num_turns=2)
        for i in range(8)
    ]
    assert len({h.where(s) for s in subs}) == 8, "8 SPAWN siblings landed on 8 workers"
    assert sum(h.where(s) == h.where(parent) for s in subs) <= 1


def test_B_spawn_children_stay_sticky_after_the_parent_ends() -> None:
    h = fleet()
    h.complete(h.send("parent", num_turns=2))
    subs = [
        h.send(f"sub{i}", parent_correlation_id="parent", branch_mode=SPAWN, num_turns=2)
        for i in range(8)
    ]
    h.complete(h.send("parent", turn_index=1, num_turns=2))  # parent's final turn: entry gone
    assert "parent" not in h.table.entries
    for s in subs:
        h.complete(s)
    for i, s in enumerate(subs):
        nxt = h.send(
            f"sub{i}", parent_correlation_id="parent", branch_mode=SPAWN, turn_index=1, num_turns=2
        )
        assert h.where(nxt) == h.where(s), "a SPAWN child's next turn went to another worker"
        h.complete(nxt)
    check_no_leak(h.core)


def test_C_nested_fork_grandchild_co_locates() -> None:
    """The last FORK child's own turn declares grandchildren: the shared entry must survive."""
    h = fleet()
    root = h.send("root", fork_count=1)  # single-turn root, one FORK child
    h.complete(root)
    child = h.send("child", parent_correlation_id="root", branch_mode=FORK, fork_count=1)
    h.complete(child)
    h.child_release("child")  # AIPerf released before the spawn and lost the entry here
    grandchild = h.send("grandchild", parent_correlation_id="child", branch_mode=FORK)
    assert grandchild.id not in h.outcomes, "the grandchild was not rejected"
    assert h.where(grandchild) == h.where(root) == h.where(child)
    h.complete(grandchild)
    h.child_release("grandchild")
    check_no_leak(h.core)


def test_D_fork_tree_is_leak_free() -> None:
    h = fleet()
    for t in range(64):
        r = h.send(f"r{t}", num_turns=2, fork_count=2)
        h.complete(r)
        kids = [
            h.send(f"r{t}k{i}", parent_correlation_id=f"r{t}", branch_mode=FORK, num_turns=2)
            for i in range(2)
        ]
        for k in kids:
            assert h.where(k) == h.where(r)
            h.complete(k)
        for i, _ in enumerate(kids):
            last = h.send(
                f"r{t}k{i}",
                parent_correlation_id=f"r{t}",
                branch_mode=FORK,
                turn_index=1,
                num_turns=2,
            )
            h.complete(last)
            h.child_release(f"r{t}k{i}")
        h.complete(h.send(f"r{t}", turn_index=1, num_turns=2))
    check_no_leak(h.core)


def test_E_duplicate_completion_is_dropped_and_counted() -> None:
    h = fleet(1)
    a = h.send("a")
    b = h.send("b")
    worker = h.core.workers[h.where(a)]
    done = Completion(seq=1, producer="p", credit_id=a.id, status=Status.COMPLETED)
    h.core.complete(worker.name, [done, done], h.now)
    h._collect()
    h.core.complete(worker.name, [done], h.now)  # a retransmit after reconnect
    h._collect()
    assert h.core.stats.duplicate_completions == 2
    assert worker.in_flight == 1, "b is still in flight: the duplicate did not subtract"
    assert b.id not in h.outcomes
    h.complete(b)
    check_no_leak(h.core)


def test_F_credit_to_a_vanished_worker_ends_with_an_outcome() -> None:
    """The transport reports EHOSTUNREACH (ROUTER_MANDATORY): the credit ends lost, at once."""
    h = fleet(2)
    c = h.send("x")
    h.core.worker_unreachable(h.where(c), h.now)
    h._collect()
    assert (h.outcome(c).status, h.outcome(c).reason) == (Status.LOST, "worker_lost")


def test_17_3_stranded_credits_are_reclaimed_from_a_dead_worker() -> None:
    h = Harness(heartbeat_interval_s=1.0, lost_after_s=5.0)
    h.join("a")
    h.join("b")
    c = h.send("x")
    alive = "b" if h.where(c) == "a" else "a"
    for _ in range(6):
        h.now += 1.0
        h.seen(alive)
        h.advance(0.0)
    assert (h.outcome(c).status, h.outcome(c).reason) == (Status.LOST, "worker_lost")
    assert alive in h.core.workers


def test_17_6_session_loss_fails_fast_or_migrates_by_policy() -> None:
    h = fleet(2)
    keep = h.send("keep", num_turns=3)
    move = h.send("move", num_turns=3, allow_migration=True)
    h.complete(keep)
    h.complete(move)
    for name in list(h.core.workers):
        if name in (h.where(keep), h.where(move)):
            h.core.worker_unreachable(name, h.now)
    h._collect()
    h.join("fresh")
    k2 = h.send("keep", turn_index=1, num_turns=3)
    m2 = h.send("move", turn_index=1, num_turns=3, allow_migration=True)
    assert (h.outcome(k2).status, h.outcome(k2).reason) == (Status.REJECTED, "session_lost")
    assert m2.id in h.sent_to
    assert h.core.stats.migrations == 1
    assert h.table.entries["move"].worker.name == h.where(m2)


def test_17_9_cancel_uses_producer_qualified_keys() -> None:
    """Two producers may both use credit id 1: cancelling one never touches the other."""
    h = fleet(1)
    mine = h.send("a")
    h.core.submit("other", [mine], h.now)  # same id, other producer
    h.core.cancel("other", [mine.id], h.now)
    fx = h.core.take_effects()
    assert [(w, m.producer, m.credit_ids) for w, m in fx.to_worker if isinstance(m, Cancel)] == [
        (h.where(mine), "other", [mine.id])
    ]
