"""Workers come and go (docs/ROUTING.md §4, §5, §6): choice, queueing, liveness, loss, drains."""

from __future__ import annotations

import pytest

from protocol import Cancel, Drain, EndSession, Refusal, Status, Welcome
from router_service.core.invariants import check_no_leak
from router_service.core.workers import WorkerState
from tests.router_service.core.harness import FORK, SPAWN, Harness


def test_hello_with_another_version_is_refused_naming_both() -> None:
    h = Harness()
    assert not h.join("w", protocol_version=99)
    ((name, msg),) = h.to_worker
    assert name == "w"
    assert isinstance(msg, Refusal)
    assert "1" in msg.reason
    assert "99" in msg.reason
    assert (msg.router_version, msg.peer_version) == (1, 99)
    assert "w" not in h.core.workers


def test_welcome_tells_the_worker_the_beat() -> None:
    h = Harness(heartbeat_interval_s=0.5)
    h.join("w")
    assert isinstance(h.to_worker[0][1], Welcome)
    assert h.to_worker[0][1].heartbeat_interval_s == 0.5


def test_weighted_capacity_least_loaded() -> None:
    h = Harness()
    h.join("big", capacity=8)
    h.join("small", capacity=2)
    placed = [h.where(h.send(f"s{i}")) for i in range(10)]
    assert placed.count("big") == 8
    assert placed.count("small") == 2


def test_ties_prefer_fewer_sessions_then_fewer_sent() -> None:
    h = Harness()
    h.join("a")
    h.join("b")
    first = h.send("sticky", num_turns=3)  # a gets a live session
    h.complete(first)
    assert h.where(first) == "a"
    nxt = h.send("fresh")  # equal load: b has fewer sessions
    assert h.where(nxt) == "b"
    h.complete(nxt)
    # Now a: 1 session, 1 sent; b: 0 sessions, 1 sent -> b again (sessions first).
    assert h.where(h.send("fresh2")) == "b"


def test_late_joiner_starts_at_the_fleet_mean() -> None:
    h = Harness()
    h.join("a")
    h.join("b")
    for i in range(20):
        h.complete(h.send(f"s{i}"))
    h.join("late")
    assert h.core.workers["late"].sent == 10
    placed = [h.where(h.send(f"t{i}")) for i in range(3)]
    assert placed[0] == "late"  # equal load: fewest sessions all round, then sent... late ties
    assert set(placed) == {"a", "b", "late"}


def test_queue_when_full_then_dispatch_on_completion() -> None:
    h = Harness(queue_limit=1)
    h.join("w", capacity=1)
    a = h.send("a")
    b = h.send("b")
    c = h.send("c")
    assert b.id not in h.sent_to
    assert h.outcome(c).reason == "queue_full"
    assert h.outcome(c).status is Status.REJECTED
    h.complete(a)
    assert h.where(b) == "w"


def test_sticky_turn_waits_for_its_full_worker() -> None:
    h = Harness(worker_queue_limit=1)
    h.join("a", capacity=1)
    h.join("b", capacity=1)
    t0 = h.send("s", num_turns=3)
    h.complete(t0)
    other = h.send("other")  # fills b
    blocker = h.send("s2")  # queued globally: both full? a is free -> goes to a
    assert h.where(blocker) == h.where(t0)
    t1 = h.send("s", turn_index=1, num_turns=3)
    assert t1.id not in h.sent_to, "hard affinity: waits for its worker"
    overflow = h.send("s", turn_index=2, num_turns=3)  # duplicate turn: per-worker queue full
    assert h.outcome(overflow).reason == "queue_full"
    h.complete(other)  # b frees: t1 must still not go there
    assert t1.id not in h.sent_to
    h.complete(blocker)
    assert h.where(t1) == h.where(t0)


def test_cancel_queued_ends_at_router_and_dispatched_goes_to_worker() -> None:
    h = Harness()
    h.join("w", capacity=1)
    running = h.send("a")
    queued = h.send("b")
    h.cancel(queued, running)
    assert h.outcome(queued).status is Status.CANCELLED
    assert running.id not in h.outcomes
    cancels = [m for _, m in h.to_worker if isinstance(m, Cancel)]
    assert cancels == [Cancel(producer="p", credit_ids=[running.id])]
    h.complete(running, Status.CANCELLED)
    assert h.outcome(running).status is Status.CANCELLED


def test_suspect_after_three_silent_beats_and_lost_after_grace() -> None:
    h = Harness(heartbeat_interval_s=1.0, lost_after_s=10.0)
    h.join("quiet")
    h.join("chatty")
    c = h.send("s", num_turns=2)
    assert h.where(c) == "quiet"
    for _ in range(4):
        h.now += 1.0
        h.seen("chatty")
        h.advance(0.0)
    assert h.core.workers["quiet"].state is WorkerState.SUSPECT
    assert h.where(h.send("new")) == "chatty", "a suspect gets no new sessions"
    h.now += 1.0
    h.seen("quiet")  # any message brings it back
    assert h.core.workers["quiet"].state is WorkerState.ACTIVE
    for _ in range(11):
        h.now += 1.0
        h.seen("chatty")
        h.advance(0.0)
    assert "quiet" not in h.core.workers
    assert (h.outcome(c).status, h.outcome(c).reason) == (Status.LOST, "worker_lost")
    nxt = h.send("s", turn_index=1, num_turns=2)
    assert h.outcome(nxt).reason == "session_lost"


def test_a_late_loop_blames_nobody() -> None:
    h = Harness(heartbeat_interval_s=1.0, lost_after_s=5.0)
    h.join("w")
    h.advance(30.0)  # the router itself was frozen for 30 s
    assert "w" in h.core.workers
    assert h.core.workers["w"].state is WorkerState.ACTIVE
    assert h.core.stats.loop_stalls == 1


def test_same_incarnation_reconnecting_keeps_everything() -> None:
    h = Harness()
    h.join("w", incarnation="x")
    c = h.send("s", num_turns=2)
    h.join("w", incarnation="x", in_flight={"p": [c.id]})
    assert c.id not in h.outcomes
    assert h.table.entries["s"].worker.name == "w"
    h.complete(c)
    assert h.outcome(c).status is Status.COMPLETED


def test_new_incarnation_is_a_new_worker_and_the_old_one_is_lost() -> None:
    h = Harness()
    h.join("w", incarnation="old")
    c = h.send("s", num_turns=2)
    h.closed("w")  # the old process is gone (a live holder would keep its name)
    h.join("w", incarnation="new")
    assert (h.outcome(c).status, h.outcome(c).reason) == (Status.LOST, "worker_lost")
    assert h.core.workers["w"].incarnation == "new"
    assert h.outcome(h.send("s", turn_index=1, num_turns=2)).reason == "session_lost"


def test_orphan_needs_two_missing_reports() -> None:
    h = Harness()
    h.join("w")
    c = h.send("s")
    h.now = 1.0
    h.core.worker_report("w", {}, h.now)  # dispatched before the previous report? no: too new
    h.now = 2.0
    h.core.worker_report("w", {}, h.now)  # first strike
    h._collect()
    assert c.id not in h.outcomes
    h.now = 3.0
    h.core.worker_report("w", {}, h.now)  # second strike
    h._collect()
    assert (h.outcome(c).status, h.outcome(c).reason) == (Status.LOST, "orphaned")
    h.complete(c, worker="w")  # a late completion is a duplicate
    assert h.core.stats.duplicate_completions == 1


def test_reported_credit_clears_its_strike() -> None:
    h = Harness()
    h.join("w")
    c = h.send("s")
    for t, held in [(1.0, {}), (2.0, {}), (3.0, {"p": [c.id]}), (4.0, {})]:
        h.now = t
        h.core.worker_report("w", held, h.now)
        h._collect()
    assert c.id not in h.outcomes


def test_drain_takes_no_new_sessions_but_serves_its_own() -> None:
    h = Harness()
    h.join("a")
    h.join("b")
    s = h.send("s", num_turns=2)
    h.complete(s)
    assert h.core.drain_worker(h.where(s), 30.0, h.now)
    h._collect()
    assert isinstance(h.to_worker[-1][1], Drain)
    other = "b" if h.where(s) == "a" else "a"
    assert h.where(h.send("new")) == other
    assert h.where(h.send("s", turn_index=1, num_turns=2)) == h.where(s)


def test_drain_deadline_expires() -> None:
    h = Harness(heartbeat_interval_s=1.0, lost_after_s=3.0)
    h.join("w")
    c = h.send("s")
    h.core.worker_draining("w", 2.0, h.now)
    for _ in range(6):
        h.now += 1.0
        h.seen("w")
        h.advance(0.0)
    assert (h.outcome(c).status, h.outcome(c).reason) == (Status.LOST, "worker_lost")


def test_goodbye_ends_sessions_with_worker_left() -> None:
    h = Harness()
    h.join("w")
    h.complete(h.send("s", num_turns=2))
    h.core.worker_left("w", h.now)
    h._collect()
    h.join("x")
    assert h.outcome(h.send("s", turn_index=1, num_turns=2)).reason == "session_lost"
    assert h.core.stats.evictions["worker_left"] == 1


def test_a_hello_in_the_goodbyes_batch_keeps_the_name_mapped() -> None:
    """The transport forgets a departed worker's name when it applies the batch's effects; a
    hello later in the same batch admitted the name again, so it must not be forgotten."""
    for same_incarnation in (True, False):
        h = Harness()
        h.join("w")
        h.core.worker_left("w", h.now)
        h.core.worker_left("x", h.now)  # (not a worker: nothing to forget)
        assert h.core.worker_hello(
            "w",
            incarnation="i1" if same_incarnation else "i2",
            protocol_version=1,
            capacity=8,
            labels={},
            in_flight={},
            now=h.now,
        )
        fx = h.core.take_effects()
        assert fx.disconnect == []
        assert [d.name for d in fx.departed] == ["w"]
        assert any(n == "w" and isinstance(m, Welcome) for n, m in fx.to_worker)
        h.core.worker_left("w", h.now)
        assert h.core.take_effects().disconnect == ["w"]


def test_queued_credits_of_a_lost_worker_migrate_or_fail() -> None:
    h = Harness()
    h.join("a", capacity=1)
    h.complete(h.send("keep", num_turns=3))
    h.complete(h.send("move", num_turns=3, allow_migration=True))
    h.send("busy")  # fills a
    t1 = h.send("keep", turn_index=1, num_turns=3)
    m1 = h.send("move", turn_index=1, num_turns=3, allow_migration=True)
    assert t1.id not in h.sent_to
    assert m1.id not in h.sent_to
    h.join("b", capacity=1)
    assert m1.id not in h.sent_to, "hard affinity: still waiting for a"
    h.core.worker_unreachable("a", h.now)
    h._collect()
    assert (h.outcome(t1).status, h.outcome(t1).reason) == (Status.REJECTED, "session_lost")
    assert h.where(m1) == "b"
    assert h.core.stats.migrations == 1


def test_idle_sessions_expire_and_are_counted() -> None:
    h = Harness(session_idle_ttl_s=60.0)
    h.join("w")
    h.complete(h.send("s", num_turns=3))
    h.now = 61.0
    h.seen("w")
    h.advance(0.0)
    assert "s" not in h.table.entries
    assert h.core.stats.evictions["idle"] == 1
    assert EndSession(x_correlation_id="s", reason="idle", producer="p") in [
        m for _, m in h.to_worker
    ]
    assert h.outcome(h.send("s", turn_index=1, num_turns=3)).reason == "session_expired"
    m = h.send("s2", turn_index=1, num_turns=3, allow_migration=True)
    assert m.id in h.sent_to  # never seen: treated as new


def test_max_sessions_evicts_least_recently_used() -> None:
    h = Harness(max_sessions=2)
    h.join("w")
    for s in ("a", "b"):
        h.complete(h.send(s, num_turns=3))
    h.complete(h.send("a", turn_index=1, num_turns=3))  # a is now most recent
    h.complete(h.send("c", num_turns=3))
    assert set(h.table.entries) == {"a", "c"}
    assert h.core.stats.evictions["capacity"] == 1
    assert h.outcome(h.send("b", turn_index=1, num_turns=3)).reason == "session_evicted"


def test_soft_affinity_rehomes_only_migratable_sessions() -> None:
    h = Harness(soft_affinity_gap=0.5)
    h.join("a", capacity=4)
    h.complete(h.send("s", num_turns=3, allow_migration=True))
    h.complete(h.send("q", num_turns=3))
    for i in range(3):
        h.send(f"p{i}", num_turns=2)  # a is 3/4 loaded
    h.join("b", capacity=4)
    nxt = h.send("s", turn_index=1, num_turns=3, allow_migration=True)
    assert h.where(nxt) == "b"
    assert h.core.stats.rehomes == 1
    assert ("a", EndSession(x_correlation_id="s", reason="rehomed", producer="p")) in h.to_worker
    # A session that does not allow migration never moves (hard affinity).
    assert h.where(h.send("q", turn_index=1, num_turns=3)) == "a"


def test_spawn_affinity_prefers_the_parents_worker_when_not_overloaded() -> None:
    h = Harness(spawn_affinity_slack=0.5)
    h.join("a", capacity=8)
    h.join("b", capacity=8)
    p = h.send("parent", num_turns=3)
    sub = h.send("sub", parent_correlation_id="parent", branch_mode=SPAWN, num_turns=2)
    assert h.where(sub) == h.where(p)


@pytest.mark.parametrize("status", [Status.FAILED, Status.CANCELLED])
def test_failed_declaring_turn_releases_its_reservations(status: Status) -> None:
    h = Harness()
    h.join("w")
    c = h.send("root", fork_count=2)
    h.complete(c, status)
    check_no_leak(h.core)


def test_fork_child_waiting_for_a_lost_parent_worker_is_rejected() -> None:
    h = Harness()
    h.join("w", capacity=1)
    h.complete(h.send("root", num_turns=2, fork_count=1))
    h.send("busy")
    kid = h.send("kid", parent_correlation_id="root", branch_mode=FORK)
    assert kid.id not in h.sent_to
    h.core.worker_unreachable("w", h.now)
    h._collect()
    assert h.outcome(kid).status is Status.REJECTED


def test_shutdown_ends_every_credit() -> None:
    h = Harness()
    h.join("w", capacity=1)
    a = h.send("a")
    b = h.send("b")
    h.core.shutdown(h.now)
    h._collect()
    assert (h.outcome(a).status, h.outcome(b).status) == (Status.LOST, Status.REJECTED)


def test_queue_timeout_ends_waiting_credits() -> None:
    h = Harness(queue_timeout_s=5.0)
    h.join("w", capacity=1)
    running = h.send("a")
    waiting = h.send("b")
    h.now = 4.0
    h.seen("w")
    h.advance(0.0)
    assert waiting.id not in h.outcomes
    h.now = 6.0
    h.seen("w")
    h.advance(0.0)
    assert (h.outcome(waiting).status, h.outcome(waiting).reason) == (
        Status.REJECTED,
        "queue_timeout",
    )
    assert running.id not in h.outcomes
