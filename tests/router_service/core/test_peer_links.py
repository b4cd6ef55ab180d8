"""Issue 9 at the core tier: sessions per producer, causal order to each worker, closed
connections, identity fencing, and the session edges (scenario numbers in each test's name)."""

from __future__ import annotations

from protocol import Cancel, Credit, EndSession, Refusal, Status, Welcome
from router_service.core.invariants import check_no_leak
from router_service.core.workers import WorkerState
from tests.router_service.core.harness import FORK, Harness

A = "alice/inc-1"
B = "bob/inc-1"


def two_workers(**kw: object) -> Harness:
    h = Harness(**kw)
    h.join("w0")
    h.join("w1")
    return h


def ends(h: Harness) -> list[tuple[str, str, str]]:
    """Every EndSession the core sent: (worker, producer, session)."""
    return [
        (w, m.producer, m.x_correlation_id) for w, m in h.to_worker if isinstance(m, EndSession)
    ]


# ----------------------------------------------------------------- item 12: sessions per producer


def test_12_another_producers_end_session_leaves_mine_alone() -> None:
    h = two_workers()
    mine = h.send("s", producer=A, num_turns=3)
    h.complete(mine, producer=A)
    h.end_session("s", producer=B)  # B never had a session "s"
    assert ends(h) == [], "B's EndSession reached a worker"
    nxt = h.send("s", producer=A, turn_index=1, num_turns=3)
    assert h.sent_to_by[A, nxt.id] == h.sent_to_by[A, mine.id], "A's session moved"
    assert h.core.sessions.tables[A].entries["s"].ref_count == 1


def test_12_same_ids_in_two_producers_are_two_sessions() -> None:
    h = two_workers()
    a0 = h.send("s", producer=A, num_turns=2)
    b0 = h.send("s", producer=B, num_turns=2)
    assert h.sent_to_by[A, a0.id] != h.sent_to_by[B, b0.id], "B's turn 0 joined A's session"
    h.complete(a0, producer=A)
    h.complete(b0, producer=B)
    # B's final turn ends B's session only; A's worker is told nothing.
    b1 = h.send("s", producer=B, turn_index=1, num_turns=2)
    assert h.sent_to_by[B, b1.id] == h.sent_to_by[B, b0.id]
    assert "s" in h.core.sessions.tables[A].entries
    assert "s" not in h.core.sessions.tables[B].entries
    a1 = h.send("s", producer=A, turn_index=1, num_turns=2)
    assert h.sent_to_by[A, a1.id] == h.sent_to_by[A, a0.id]
    h.complete(a1, producer=A)
    h.complete(b1, producer=B)
    check_no_leak(h.core)


def test_12_release_and_child_release_are_per_producer() -> None:
    h = two_workers()
    root = h.send("root", producer=A, fork_count=2)
    h.complete(root, producer=A)
    h.release("root", 2, producer=B)  # not B's: nothing happens
    entry = h.core.sessions.tables[A].entries["root"]
    assert entry.reserved == 2
    kid = h.send("kid", producer=A, parent_correlation_id="root", branch_mode=FORK)
    h.complete(kid, producer=A)
    home = h.sent_to_by[A, kid.id]
    h.child_release("kid", worker=home, producer=B)  # same child id, another producer
    assert h.core.sessions.tables[A].aliases["kid"].live, "B's ChildRelease ended A's child"
    assert h.core.stats.unknown_child_releases == 1
    h.child_release("kid", producer=A)
    h.release("root", 1, producer=A)
    assert ends(h) == [(home, A, "root")], "the worker is told whose session to drop"
    check_no_leak(h.core)


def test_12_fork_parent_resolves_within_the_producer() -> None:
    h = two_workers()
    h.complete(h.send("root", producer=A, num_turns=2, fork_count=1), producer=A)
    kid = h.send("kid", producer=B, parent_correlation_id="root", branch_mode=FORK)
    assert h.by_producer[B, kid.id].reason == "parent_session_unavailable"


def test_12_producer_gone_ends_everything_it_had() -> None:
    h = Harness()
    h.join("w0", capacity=3)
    root = h.send("s", producer=A, num_turns=3, fork_count=1)
    h.complete(root, producer=A)
    kid = h.send("kid", producer=A, parent_correlation_id="s", branch_mode=FORK, num_turns=2)
    singles = [h.send(f"q{i}", producer=A) for i in range(5)]
    running = [c for c in singles if (A, c.id) in h.sent_to_by]
    queued = [c for c in singles if (A, c.id) not in h.sent_to_by]
    assert (len(running), len(queued)) == (2, 3)
    other = h.send("s", producer=B, num_turns=2)  # B's session of the same id waits
    h.producer_gone(A)
    assert [h.by_producer[A, q.id].status for q in queued] == [Status.CANCELLED] * 3
    assert A not in h.core.sessions.tables, "the gone producer's sessions are left"
    assert sorted(ends(h)) == [("w0", A, "kid"), ("w0", A, "s")]
    (cancel,) = [m for _, m in h.to_worker if isinstance(m, Cancel)]
    assert (cancel.producer, sorted(cancel.credit_ids)) == (
        A,
        sorted(c.id for c in [kid, *running]),
    )
    # What is still in flight ends with its completion; invariants hold meanwhile.
    h.complete(kid, producer=A, status=Status.CANCELLED, session_ended=True)
    for c in running:
        h.complete(c, producer=A, status=Status.CANCELLED)
    assert "s" in h.core.sessions.tables[B].entries, "B's session of the same id went too"
    h.complete(other, producer=B)
    h.complete(h.send("s", producer=B, turn_index=1, num_turns=2), producer=B)
    check_no_leak(h.core)


def test_12_a_producer_that_never_ends_its_sessions_leaks_nothing_once_gone() -> None:
    h = two_workers()
    for i in range(4):
        c = h.send(f"s{i}", producer=A, num_turns=5, fork_count=2)
        h.complete(c, producer=A)
    h.complete(
        h.send("k", producer=A, parent_correlation_id="s0", branch_mode=FORK, num_turns=3),
        producer=A,
    )
    assert h.core.sessions.live == 4
    h.producer_gone(A)
    h.advance(1.0)
    assert h.core.sessions.live == 0
    check_no_leak(h.core)


def test_18_cancelling_a_leaving_producers_queue_is_linear() -> None:
    """Scenario 18: 40k + 40k interleaved queued credits; each cancel is O(1)."""
    h = Harness(queue_limit=100_000)
    h.join("w0", capacity=1)
    credits_a = [Credit(id=i, x_correlation_id=f"a{i}") for i in range(40_000)]
    credits_b = [Credit(id=i, x_correlation_id=f"b{i}") for i in range(40_000)]
    for i in range(0, 40_000, 1000):
        h.core.submit(A, credits_a[i : i + 1000], h.now)
        h.core.submit(B, credits_b[i : i + 1000], h.now)
    h.core.take_effects()
    assert len(h.core.queue) == 79_999
    h.core.producer_gone(A, h.now)
    fx = h.core.take_effects()
    assert len(fx.outcomes[A]) == 39_999
    assert len(h.core.queue) == 40_000
    # The live count drives the queue limit: freed room is usable at once.
    assert sum(1 for _ in h.core.queue) == 40_000
    assert len(h.core.queue._items) <= 2 * 40_000 + 32, "cancelled tickets are compacted"


# ------------------------------------------------------------ scenario 1: causal order to workers


def test_1_welcome_precedes_the_first_dispatch_to_a_joiner() -> None:
    h = Harness()
    waiting = [h.send(f"s{i}") for i in range(3)]  # no worker yet: they wait
    assert not h.sent_to
    h.join("w0")
    items = [item for w, item in h.sends if w == "w0"]
    assert isinstance(items[0], Welcome), f"first thing w0 gets: {items[0]!r}"
    assert items[1] == ("p", waiting)


def test_1_control_messages_keep_their_place_between_dispatches() -> None:
    h = Harness()
    h.join("w0", capacity=4)
    h.core.take_effects()
    first = h.send("s", num_turns=2)
    h.complete(first)
    h.core.take_effects()
    # One batch: final turn dispatched, then the producer ends the session, then another credit.
    final = Credit(id=100, x_correlation_id="s", turn_index=1, num_turns=2)
    h.core.submit("p", [final], h.now)
    h.core.cancel("p", [final.id], h.now)
    later = Credit(id=101, x_correlation_id="t")
    h.core.submit("p", [later], h.now)
    fx = h.core.take_effects()
    kinds = [
        "dispatch" if isinstance(item, tuple) else type(item).__name__ for _, item in fx.to_worker
    ]
    assert kinds == ["dispatch", "Cancel", "dispatch"], kinds
    assert fx.to_worker[0][1] == ("p", [final])
    assert fx.to_worker[2][1] == ("p", [later])
    h.submitted += 2  # credits submitted behind the harness's back
    h.complete(final, status=Status.CANCELLED, worker="w0")
    h.complete(later, worker="w0")


def test_1_consecutive_dispatches_of_one_producer_coalesce() -> None:
    h = Harness()
    h.join("w0", capacity=8)
    h.core.take_effects()
    h.core.submit("p", [Credit(id=i, x_correlation_id=f"s{i}") for i in range(3)], h.now)
    h.core.submit(A, [Credit(id=9, x_correlation_id="x")], h.now)
    h.core.submit("p", [Credit(id=5, x_correlation_id="y")], h.now)
    fx = h.core.take_effects()
    chunks = [(p, [c.id for c in cs]) for _, (p, cs) in fx.to_worker]  # type: ignore[misc]
    assert chunks == [("p", [0, 1, 2]), (A, [9]), ("p", [5])]


# ------------------------------------------------ scenarios 19 and 13: a closed connection


def test_19_closed_connection_makes_the_worker_suspect_then_lost_after_the_grace() -> None:
    h = two_workers(closed_grace_s=1.0, lost_after_s=5.0)
    c = h.send("s")
    home = h.where(c)
    h.closed(home)
    assert h.core.workers[home].state is WorkerState.SUSPECT
    fresh = h.send("t")
    assert h.where(fresh) != home, "a closed worker got a new credit"
    assert c.id not in h.outcomes, "its credits stay dispatched during the grace"
    h.now += 0.9
    h.seen("w0" if home == "w1" else "w1")
    h.advance(0.0)
    assert home in h.core.workers
    h.advance(0.2)  # 1.1 s after the close, far below the 5 s silence timeout
    assert home not in h.core.workers
    assert (h.outcome(c).status, h.outcome(c).reason) == (Status.LOST, "worker_lost")


def test_19_a_closed_worker_that_says_hello_again_keeps_everything() -> None:
    h = two_workers(closed_grace_s=1.0)
    c = h.send("s", num_turns=2)
    home = h.where(c)
    h.closed(home)
    h.now += 0.5
    h.join(home, incarnation="i1", in_flight={"p": [c.id]})
    h.advance(1.0)
    assert h.core.workers[home].state is WorkerState.ACTIVE
    h.complete(c)
    assert h.where(h.send("s", turn_index=1, num_turns=2)) == home


def test_19_a_closed_worker_that_speaks_again_is_back() -> None:
    h = two_workers(closed_grace_s=1.0)
    c = h.send("s")
    home = h.where(c)
    h.closed(home)
    h.now += 0.5
    h.seen(home)
    h.advance(2.0)
    assert h.core.workers[home].state is WorkerState.ACTIVE
    h.complete(c)


def test_13_a_final_turn_is_never_rerouted_as_a_new_session() -> None:
    """The final turn's worker's connection closes: the turn stays with its worker (the peer
    link holds the frame); it is never re-sent elsewhere as a fresh session."""
    h = two_workers(closed_grace_s=1.0)
    first = h.send("s", num_turns=2)
    h.complete(first)
    home = h.where(first)
    final = h.send("s", turn_index=1, num_turns=2)
    assert h.where(final) == home
    h.closed(home)
    h.advance(0.5)
    assert final.id not in h.outcomes
    assert h.sent_to[final.id] == home
    h.advance(0.6)
    assert (h.outcome(final).status, h.outcome(final).reason) == (Status.LOST, "worker_lost")
    assert h.core.stats.sticky_misses == 1, "the final turn was routed as a new session"


# --------------------------------------------------------- scenarios 6 and 7: identity fencing


def refusal(h: Harness) -> Refusal:
    msg = h.to_worker[-1][1]
    assert isinstance(msg, Refusal)
    assert h.core.last_refusal == msg
    return msg


def test_6_second_live_holder_of_a_name_is_refused_and_the_holder_keeps_everything() -> None:
    h = Harness()
    h.join("w", incarnation="one")
    c = h.send("s", num_turns=3)
    assert not h.join("w", incarnation="two")
    msg = refusal(h)
    assert msg.code == "name_in_use"
    assert "'one'" in msg.reason
    assert "'two'" in msg.reason
    assert "'w'" in msg.reason
    assert h.core.stats.refusals_by_code["name_in_use"] == 1
    worker = h.core.workers["w"]
    assert (worker.incarnation, worker.state) == ("one", WorkerState.ACTIVE)
    assert c.id not in h.outcomes, "the holder's credits were touched"
    # The same holder draining is still live: still refused.
    h.core.worker_draining("w", 30.0, h.now)
    assert not h.join("w", incarnation="two")
    assert refusal(h).code == "name_in_use"
    h.complete(c)


def test_7_a_superseded_incarnation_is_fenced() -> None:
    h = Harness(heartbeat_interval_s=1.0, lost_after_s=10.0)
    h.join("w", incarnation="old")
    c = h.send("s")
    for _ in range(4):
        h.advance(1.0)  # silent for 3 beats: suspect (SIGSTOP)
    assert h.core.workers["w"].state is WorkerState.SUSPECT
    assert h.join("w", incarnation="new"), "a new incarnation replaces a suspect holder"
    assert h.outcome(c).status is Status.LOST
    assert not h.join("w", incarnation="old"), "the resumed old process took its name back"
    msg = refusal(h)
    assert msg.code == "superseded"
    assert "'old'" in msg.reason
    assert "'new'" in msg.reason
    assert h.core.workers["w"].incarnation == "new"
    # Even after the new one is gone, the old one stays fenced.
    h.core.worker_left("w", h.now)
    h._collect()
    assert not h.join("w", incarnation="old")
    assert h.core.stats.refusals_by_code["superseded"] == 2


def test_7_an_incarnation_lost_and_replaced_while_away_is_fenced_too() -> None:
    h = Harness(heartbeat_interval_s=1.0, lost_after_s=5.0)
    h.join("w", incarnation="old")
    for _ in range(6):
        h.advance(1.0)  # lost by silence
    assert "w" not in h.core.workers
    assert h.join("w", incarnation="new")
    assert not h.join("w", incarnation="old")
    assert refusal(h).code == "superseded"


def test_6_refusal_codes_for_version_and_capacity() -> None:
    h = Harness()
    assert not h.join("w", protocol_version=99)
    assert refusal(h).code == "version_mismatch"
    assert not h.join("w", capacity=0)
    assert refusal(h).code == "invalid_capacity"
    assert h.core.stats.refusals_by_code == {
        "version_mismatch": 1,
        "invalid_capacity": 1,
        "name_in_use": 0,
        "superseded": 0,
    }
    assert h.join("w")
    assert h.core.last_refusal is None


def test_6_the_superseded_record_is_bounded() -> None:
    h = Harness()
    for i in range(50):
        h.join("w", incarnation=f"i{i}")
        h.closed("w")
    assert len(h.core._superseded["w"]) <= 8


# ------------------------------------------------- scenario 14: a cancelled queued FORK child


def fork_parent_on_a_full_worker(h: Harness) -> tuple[Credit, Credit]:
    """A single-turn root that declared one FORK child, on a worker now full."""
    h.join("w0", capacity=1)
    root = h.send("root", fork_count=1)
    h.complete(root)
    blocker = h.send("blocker")
    assert h.where(blocker) == "w0"
    return root, blocker


def test_14_cancelled_queued_fork_child_gives_its_reservation_back() -> None:
    h = Harness()
    _, blocker = fork_parent_on_a_full_worker(h)
    kid = h.send("kid", parent_correlation_id="root", branch_mode=FORK, num_turns=2)
    assert kid.id not in h.sent_to, "the child waits for its parent's worker"
    h.cancel(kid)
    assert h.outcome(kid).status is Status.CANCELLED
    assert "root" not in h.table.entries, "the parent entry leaked until the idle TTL"
    assert not h.table.aliases
    h.complete(blocker)
    check_no_leak(h.core)


def test_14_cancelled_queued_later_turn_of_a_fork_child_holds_nothing_extra() -> None:
    h = Harness()
    h.join("w0", capacity=1)
    root = h.send("root", fork_count=1)
    h.complete(root)
    kid = h.send("kid", parent_correlation_id="root", branch_mode=FORK, num_turns=3)
    h.complete(kid)
    blocker = h.send("blocker")
    later = h.send("kid", parent_correlation_id="root", branch_mode=FORK, turn_index=1, num_turns=3)
    assert later.id not in h.sent_to
    h.cancel(later)
    entry = h.table.entries["root"]
    assert entry.ref_count == 1, "only the child's own live count remains"
    h.end_session("kid")  # the producer gives the child up
    assert "root" not in h.table.entries
    h.complete(blocker)
    check_no_leak(h.core)


# --------------------------------------------- scenario 15: the idle TTL and running turns


def test_15_a_session_with_a_running_turn_is_never_idle() -> None:
    h = Harness(session_idle_ttl_s=10.0, heartbeat_interval_s=1.0, lost_after_s=100.0)
    h.join("w0")
    t0 = h.send("s", num_turns=3)
    h.complete(t0)
    t1 = h.send("s", turn_index=1, num_turns=3)
    for _ in range(25):  # the turn runs 25 s, 2.5 idle TTLs
        h.seen("w0")
        h.advance(1.0)
    assert "s" in h.table.entries, "evicted as idle while its turn ran"
    h.complete(t1)
    for _ in range(8):  # idle for 8 s after the completion: within the TTL
        h.seen("w0")
        h.advance(1.0)
    t2 = h.send("s", turn_index=2, num_turns=3)
    assert h.where(t2) == "w0", h.outcomes.get(t2.id)
    assert h.core.stats.evictions["idle"] == 0
    h.complete(t2)
    check_no_leak(h.core)


def test_15_idle_counts_from_the_completion() -> None:
    h = Harness(session_idle_ttl_s=10.0, heartbeat_interval_s=1.0, lost_after_s=100.0)
    h.join("w0")
    t0 = h.send("s", num_turns=3)
    for _ in range(6):
        h.seen("w0")
        h.advance(1.0)
    h.complete(t0)  # at t=6: idle from here
    for _ in range(9):
        h.seen("w0")
        h.advance(1.0)
    assert "s" in h.table.entries, "evicted 9 s after its last activity (TTL 10 s)"
    for _ in range(2):
        h.seen("w0")
        h.advance(1.0)
    assert "s" not in h.table.entries, "not evicted 11 s after its last activity"
    assert h.core.stats.evictions["idle"] == 1
    assert h.outcome(h.send("s", turn_index=1, num_turns=3)).reason == "session_expired"


# ------------------------------------------------ scenario 17: a turn 0 retry after a loss


def test_17_turn_0_retry_after_its_worker_died_is_a_new_session() -> None:
    h = two_workers()
    t0 = h.send("s", num_turns=3)  # allow_migration is False
    home = h.where(t0)
    h.core.worker_unreachable(home, h.now)
    h._collect()
    assert h.outcome(t0).status is Status.LOST
    retry = h.send("s", num_turns=3)
    assert retry.id in h.sent_to, h.outcomes.get(retry.id)
    assert h.where(retry) != home
    assert h.core.stats.migrations == 0, "a fresh start is not a migration"
    h.complete(retry)
    h.complete(h.send("s", turn_index=1, num_turns=3))
    h.complete(h.send("s", turn_index=2, num_turns=3))
    check_no_leak(h.core)


def test_17_only_turn_0_and_only_without_history() -> None:
    h = two_workers()
    # A later turn after the loss of a session that never completed a turn: still lost.
    a0 = h.send("a", num_turns=3)
    h.core.worker_unreachable(h.where(a0), h.now)
    h._collect()
    a1 = h.send("a", turn_index=1, num_turns=3)
    assert h.outcome(a1).reason == "session_lost"
    h.join("w2")
    # A turn 0 retry of a session whose turn 0 completed (history existed): still lost.
    b0 = h.send("b", num_turns=3)
    h.complete(b0)
    b1 = h.send("b", turn_index=1, num_turns=3)
    h.core.worker_unreachable(h.where(b1), h.now)
    h._collect()
    again = h.send("b", num_turns=3)
    assert h.outcome(again).reason == "session_lost"


# ---------------------------------------- scenario 2: a draining router revokes what it ended


def test_2_shutdown_revokes_in_flight_credits_at_their_workers() -> None:
    h = Harness()
    h.join("w0", capacity=2)
    h.join("w1", capacity=2)
    running = [h.send(f"s{i}") for i in range(4)]
    queued = h.send("q")
    h.core.submit(B, [Credit(id=77, x_correlation_id="b")], h.now)  # queued behind
    h.submitted += 1
    h.core.shutdown(h.now)
    fx = h.core.take_effects()
    revokes = {
        (w, m.producer, tuple(sorted(m.credit_ids)))
        for w, m in fx.to_worker
        if isinstance(m, Cancel)
    }
    by_worker: dict[str, list[int]] = {}
    for c in running:
        by_worker.setdefault(h.where(c), []).append(c.id)
    assert revokes == {(w, "p", tuple(sorted(ids))) for w, ids in by_worker.items()}
    assert all(m.revoked for _, m in fx.to_worker if isinstance(m, Cancel))
    statuses = {o.credit_id: (o.status, o.reason) for o in fx.outcomes["p"]}
    assert statuses[queued.id] == (Status.REJECTED, "router_shutdown")
    for c in running:
        assert statuses[c.id] == (Status.LOST, "router_shutdown")


def test_2_revocation_comes_after_the_dispatch_it_revokes() -> None:
    h = Harness()
    h.join("w0")
    h.core.take_effects()
    h.core.submit("p", [Credit(id=1, x_correlation_id="s")], h.now)
    h.core.shutdown(h.now)
    fx = h.core.take_effects()
    assert fx.to_worker[0] == ("w0", ("p", [Credit(id=1, x_correlation_id="s")]))
    assert fx.to_worker[1] == ("w0", Cancel(producer="p", credit_ids=[1], revoked=True))


# ------------------------------------------ scenario 21: the fuzz's least-loaded disagreement


def test_21_a_queued_new_session_whose_session_got_an_entry_goes_to_its_worker() -> None:
    """``make fuzz``: two workers of capacity 1, both full; turns 0 and 1 of one session
    wait in the global queue. Turn 0 leaves first (its entry pins the session to w0); turn 1
    used to go to whichever worker freed a slot next, removing w0's entry behind the index's
    back (the index kept w0's old key: invariant 6) and running past its history (8)."""
    h = Harness()
    h.join("w0", capacity=1)
    h.join("w1", capacity=1)
    a = h.send("a")
    b = h.send("b")
    s0 = h.send("s", num_turns=2)
    # (allow_migration: a later turn of a session with no entry yet may start one; without
    # it, it would end ``rejected: session_unknown`` at once, as after a router restart.)
    s1 = h.send("s", turn_index=1, num_turns=2, allow_migration=True)
    h.complete(a)  # s0 -> w0
    assert h.where(s0) == "w0"
    h.complete(b)  # the harness checks invariants 1-6 and 8 after each call
    assert s1.id not in h.sent_to, "the final turn ran on w1, past its history on w0"
    h.complete(s0)
    assert h.where(s1) == "w0"
    h.complete(s1)
    check_no_leak(h.core)
