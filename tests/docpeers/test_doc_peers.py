"""A worker and a producer written from docs/PROTOCOL.md alone, against the real router process.

The peers (doc_worker.py, doc_producer.py) use raw pyzmq and msgspec.msgpack on plain lists;
the project's code is used only to start ``credit-router serve`` (router_process.py). So these
tests check the document as much as the router: a peer that follows it must work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.docpeers import wire
from tests.docpeers.doc_producer import GAVE_UP, DocProducer
from tests.docpeers.doc_worker import DocWorker
from tests.docpeers.router_process import RouterProcess
from tests.ports import free_port

pytestmark = pytest.mark.integration

HEARTBEAT_S = 0.2
ROUTER_FLAGS = (
    "--heartbeat-interval-s",
    str(HEARTBEAT_S),
    "--inflight-report-interval-s",
    "0.5",
    "--drain-deadline-s",
    "0.3",
)
# §6.1 leaves the grace to the producer (the bundled client: 30 s); short here to keep tests fast.
RECOVERY_GRACE_S = 2.0
# The protocol behaviour "with rules 2 and 3 a worker is back within about a second of a router
# restart" (§5.6, §6.1): a bound on a behaviour, not a speed target; measured values are printed.
REJOIN_BOUND_S = 1.0


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Cluster:
    def __init__(self, tmp_path: Path) -> None:
        self.workers_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.producers_endpoint = f"ipc://{tmp_path / 'producers.ipc'}"
        self.routers: list[RouterProcess] = []
        self.peers: list[DocWorker | DocProducer] = []

    def router(self, *extra: str, wait: bool = True) -> RouterProcess:
        router = RouterProcess(
            self.workers_endpoint, self.producers_endpoint, *ROUTER_FLAGS, *extra
        )
        self.routers.append(router)
        router.launch()
        return router.wait_ready() if wait else router

    def worker(self, name: str, **kwargs: Any) -> DocWorker:
        worker = DocWorker(self.workers_endpoint, name, **kwargs).start()
        self.peers.append(worker)
        return worker

    def producer(self, name: str) -> DocProducer:
        producer = DocProducer(self.producers_endpoint, name, recovery_grace_s=RECOVERY_GRACE_S)
        self.peers.append(producer.start())
        return producer

    def close(self) -> None:
        for peer in self.peers:
            peer.stop()
        for router in self.routers:
            router.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def welcomed_by(peer: DocWorker | DocProducer, incarnation: str) -> float | None:
    for entry in peer.log.welcomes:
        if entry[1] == incarnation:
            return entry[0]
    return None


def result_of(outcome: list[Any]) -> dict[str, Any]:
    decoded = msgspec.msgpack.decode(outcome[-1])
    assert isinstance(decoded, dict)
    return decoded


def assert_one_outcome_each(producer: DocProducer, ids: list[int]) -> None:
    assert not producer.log.duplicates, f"second outcomes: {producer.log.duplicates}"
    assert not producer.log.strays, f"outcomes for credits never submitted: {producer.log.strays}"
    missing = [i for i in ids if i not in producer.outcomes]
    assert not missing, f"credits without an outcome: {missing}"


def run_sessions(
    producer: DocProducer, first_id: int, sessions: list[str], turns: int
) -> list[int]:
    """Each session's turns one after another (a turn waits for its predecessor's outcome)."""
    ids: list[int] = []
    for turn in range(turns):
        batch = []
        for n, session in enumerate(sessions):
            credit_id = first_id + n * turns + turn
            producer.submit(wire.credit(credit_id, session, turn_index=turn, num_turns=turns))
            batch.append(credit_id)
        assert producer.wait_outcomes(batch, 10), f"no outcomes for {batch}"
        ids += batch
    return ids


# -- 1. credits run, one outcome each, sessions sticky and per producer ------------------------


def test_doc_producer_credits_run_on_doc_workers_with_one_outcome_each(cluster: Cluster) -> None:
    cluster.router()
    workers = [cluster.worker("gpu-1"), cluster.worker("gpu-2")]
    alice, bob = cluster.producer("alice"), cluster.producer("bob")
    peers: list[DocWorker | DocProducer] = [*workers, alice, bob]
    wait_for(lambda: all(p.welcomed for p in peers), what="welcomes")

    # Both producers use the same session ids: sessions are per producer (§5.3).
    sessions = [f"sess-{n}" for n in range(6)]
    alice_ids = run_sessions(alice, 100, sessions, turns=3)
    bob_ids = run_sessions(bob, 100, sessions, turns=3)

    for producer, ids in ((alice, alice_ids), (bob, bob_ids)):
        assert_one_outcome_each(producer, ids)
        for n, _session in enumerate(sessions):
            outcomes = [producer.outcomes[100 + n * 3 + turn] for turn in range(3)]
            assert [o[1] for o in outcomes] == ["completed"] * 3
            ran_on = {o[3] for o in outcomes}
            assert len(ran_on) == 1, f"{producer.name} session {n} moved: {ran_on}"
            # the history the worker held before each turn: this producer's turns only
            assert [result_of(o)["history"] for o in outcomes] == [[], [0], [0, 1]]
    used = {alice.outcomes[i][3] for i in alice_ids} | {bob.outcomes[i][3] for i in bob_ids}
    assert used == {"gpu-1", "gpu-2"}, "the least-loaded choice should use both workers"
    for peer in peers:
        assert peer.log.bad_frames == 0
        assert peer.log.unknown_tags == 0
    assert alice.log.first_tokens == len(alice_ids)


def test_fork_children_run_on_their_parents_doc_worker_from_its_history(cluster: Cluster) -> None:
    cluster.router()
    workers = [cluster.worker("gpu-1"), cluster.worker("gpu-2")]
    producer = cluster.producer("bench")
    wait_for(lambda: all(w.welcomed for w in workers) and producer.welcomed, what="welcomes")
    ids = []
    for tree in range(4):  # enough trees that least-loaded alone would spread the children
        parent = f"agent-{tree}"
        base = 100 * tree
        producer.submit(wire.credit(base, parent, num_turns=2, fork_count=2))
        assert producer.wait_outcomes([base], 5)
        for child in (1, 2):
            producer.submit(
                wire.credit(
                    base + child,
                    f"{parent}-fork-{child}",
                    parent_correlation_id=parent,
                    root_correlation_id=parent,
                    branch_mode="fork",
                    agent_depth=1,
                )
            )
        assert producer.wait_outcomes([base + 1, base + 2], 5)
        producer.submit(wire.credit(base + 3, parent, turn_index=1, num_turns=2))
        assert producer.wait_outcomes([base + 3], 5)
        tree_ids = [base, base + 1, base + 2, base + 3]
        ids += tree_ids
        outcomes = [producer.outcomes[i] for i in tree_ids]
        assert [o[1] for o in outcomes] == ["completed"] * 4
        assert len({o[3] for o in outcomes}) == 1, f"tree {tree} spread: {outcomes}"
        # §5.3: a FORK child starts from a copy of its parent's history
        assert [result_of(o)["history"] for o in outcomes] == [[], [0], [0], [0]]
    assert_one_outcome_each(producer, ids)


def test_doc_producer_cancel_reaches_the_doc_worker_and_ends_once(cluster: Cluster) -> None:
    cluster.router()
    worker = cluster.worker("gpu-1")
    producer = cluster.producer("bench")
    wait_for(lambda: worker.welcomed and producer.welcomed, what="welcomes")

    # CancelCredits on a dispatched credit → Cancel → Completion(cancelled) → one outcome.
    slow = msgspec.msgpack.encode({"sleep_s": 30.0})
    producer.submit(wire.credit(1, "long", num_turns=2, payload=slow))
    wait_for(lambda: worker.holding == 1, what="the dispatch")
    producer.cancel([1])
    assert producer.wait_outcomes([1], 5)
    assert producer.outcomes[1][1:3] == ["cancelled", "cancelled"]
    assert worker.holding == 0

    # cancel_after_s: the worker's own abort, passed through as it reported it (§5.3, §7).
    producer.submit(wire.credit(2, "hasty", cancel_after_s=0.01, payload=slow))
    assert producer.wait_outcomes([2], 5)
    assert producer.outcomes[2][1:3] == ["cancelled", "client_disconnect"]
    assert_one_outcome_each(producer, [1, 2])


def test_a_doc_worker_that_leaves_finishes_its_credits_and_gets_no_new_sessions(
    cluster: Cluster,
) -> None:
    cluster.router()
    leaving, staying = cluster.worker("gpu-1", exec_s=0.3), cluster.worker("gpu-2")
    producer = cluster.producer("bench")
    wait_for(lambda: leaving.welcomed and staying.welcomed and producer.welcomed, what="welcomes")
    producer.submit(wire.credit(1, "old", num_turns=2))
    producer.submit(wire.credit(2, "other", num_turns=2))
    wait_for(lambda: leaving.holding == 1, what="a credit on gpu-1")
    leaving.leave(deadline_s=5.0)  # §5.5: Draining, finish, Goodbye
    wait_for(lambda: leaving.log.left, 5, "Goodbye")
    assert producer.wait_outcomes([1, 2], 5)
    fresh = list(range(10, 16))
    for credit_id in fresh:
        producer.submit(wire.credit(credit_id, f"new-{credit_id}"))
    assert producer.wait_outcomes(fresh, 5)
    assert_one_outcome_each(producer, [1, 2, *fresh])
    assert {producer.outcomes[i][1] for i in (1, 2)} == {"completed"}
    assert {producer.outcomes[i][3] for i in fresh} == {"gpu-2"}


def test_end_session_reaches_the_doc_worker_with_the_sessions_producer(cluster: Cluster) -> None:
    cluster.router()
    worker = cluster.worker("gpu-1")
    producer = cluster.producer("bench")
    wait_for(lambda: worker.welcomed and producer.welcomed, what="welcomes")
    producer.submit(wire.credit(2, "chat", num_turns=3))
    assert producer.wait_outcomes([2], 5)
    producer.end_session("chat")
    wait_for(lambda: any(s == "chat" for _p, s in worker.log.ended_sessions), 5, "EndSession")
    (dispatch_producer, _credit_id) = worker.log.dispatched[-1]
    assert worker.log.ended_sessions == [(dispatch_producer, "chat")]
    assert worker.session_count() == 0, "the session's history was dropped"
    assert_one_outcome_each(producer, [2])


def test_stale_incarnation_is_rejected_unrun_and_runs_when_submitted_again(
    cluster: Cluster,
) -> None:
    cluster.router()
    worker = cluster.worker("gpu-1")
    producer = cluster.producer("bench")
    wait_for(lambda: worker.welcomed and producer.welcomed, what="welcomes")
    # A frame tagged with a router incarnation that is gone (§6): answered, never run.
    producer.submit(wire.credit(7, "s-7"), tag="r-gone")
    producer.submit(wire.credit(8, "s-8"))
    assert producer.wait_outcomes([7, 8], 5)
    assert producer.log.stale_resubmits == [7]
    assert [producer.outcomes[i][1] for i in (7, 8)] == ["completed", "completed"]
    assert worker.log.dispatched.count((worker.log.dispatched[0][0], 7)) == 1
    assert_one_outcome_each(producer, [7, 8])


def test_a_frozen_doc_worker_that_wakes_up_adds_no_second_outcome(cluster: Cluster) -> None:
    cluster.router("--lost-after-s", "0.8")
    worker = cluster.worker("gpu-1")
    producer = cluster.producer("bench")
    wait_for(lambda: worker.welcomed and producer.welcomed, what="welcomes")
    worker.gate.clear()
    producer.submit(wire.credit(1, "s", num_turns=2))
    wait_for(lambda: worker.holding == 1, what="the dispatch")
    worker.frozen.set()  # silent past the grace: lost (§5.2)
    assert producer.wait_outcomes([1], 5)
    assert producer.outcomes[1][1:3] == ["lost", "worker_lost"]
    worker.gate.set()
    worker.frozen.clear()  # it wakes, completes the credit, is told unknown_worker, rejoins
    wait_for(lambda: len(worker.log.welcomes) >= 2, 5, "the worker to rejoin")
    assert worker.log.welcomes[-1][2] is False, "the router held nothing of it (resumed=false)"
    wait_for(lambda: worker.unacknowledged() == 0, 5, "the late completion to be acknowledged")
    assert [c[1:] for c in worker.log.completed] == [(1, "completed")]
    producer.submit(wire.credit(2, "s", turn_index=1, num_turns=2))
    producer.submit(wire.credit(3, "fresh"))
    assert producer.wait_outcomes([2, 3], 5)
    assert producer.outcomes[2][1:3] == ["rejected", "session_lost"]  # §7
    assert producer.outcomes[3][1] == "completed"
    assert_one_outcome_each(producer, [1, 2, 3])


def test_refusal_name_mismatch_is_final(cluster: Cluster) -> None:
    cluster.router()
    liar = cluster.worker("gpu-1", routing_name="gpu-9")  # routing id gpu-9/…, hello name gpu-1
    wait_for(lambda: liar.log.refusal is not None, what="refusal")
    assert liar.log.refusal is not None
    assert liar.log.refusal[0] == "name_mismatch"
    assert not liar.log.welcomes


def test_refusal_name_in_use_for_a_second_live_incarnation(cluster: Cluster) -> None:
    cluster.router()
    holder = cluster.worker("gpu-2")
    wait_for(lambda: holder.welcomed, what="the holder's welcome")
    twin = cluster.worker("gpu-2")  # a second process with the same name: a new incarnation
    wait_for(lambda: twin.log.refusal is not None or bool(twin.log.welcomes), what="an answer")
    assert twin.log.refusal is not None
    assert twin.log.refusal[0] == "name_in_use"
    assert holder.log.refusal is None, "the live holder keeps its name"


# -- 2. router restarts --------------------------------------------------------------------------


def _restart_scenario(cluster: Cluster, how: str) -> None:
    old = cluster.router()
    worker = cluster.worker("gpu-1", capacity=4)
    producer = cluster.producer("bench")
    wait_for(lambda: worker.welcomed and producer.welcomed, what="welcomes")

    # Warm up: the pair works.
    before = run_sessions(producer, 0, ["warm-0", "warm-1"], turns=2)

    # Hold 4 credits on the worker (its capacity) and 3 more queued in the router.
    worker.gate.clear()
    held, queued = list(range(10, 14)), list(range(14, 17))
    for credit_id in held + queued:
        producer.submit(wire.credit(credit_id, f"s-{credit_id}"))
    wait_for(lambda: worker.holding == 4, what="4 credits on the worker")
    time.sleep(0.1)  # the 3 others reach the router's queue

    down_at = time.monotonic()
    if how == "kill":
        old.kill()
    else:
        assert old.terminate() == 0
        assert producer.wait_outcomes(held + queued, 5)
        wait_for(lambda: len(worker.log.revoked) == 4, 5, "Cancel(revoked)")
        # §5.5: the router ended what it held and told the worker to forget it.
        assert [producer.outcomes[i][1:3] for i in held] == [["lost", "router_shutdown"]] * 4
        assert [producer.outcomes[i][1:3] for i in queued] == [["rejected", "router_shutdown"]] * 3
        assert sorted(i for _p, i in worker.log.revoked) == held
    new = cluster.router(wait=False)  # on the same endpoints, at once
    launched_s = time.monotonic() - down_at
    # Credits submitted in the gap, tagged with the old incarnation: each either died with the
    # connection (the producer gives up after the grace) or reaches the new router, which
    # answers stale_incarnation, and is submitted again there (§6, §6.1).
    gap = list(range(20, 23))
    for credit_id in gap:
        producer.submit(wire.credit(credit_id, f"s-{credit_id}"))
    new.wait_ready()
    assert new.ready_at is not None
    assert new.incarnation is not None
    wait_for(
        lambda: (
            welcomed_by(worker, new.incarnation or "") is not None
            and welcomed_by(producer, new.incarnation or "") is not None
        ),
        5,
        "welcomes from the new router",
    )
    worker_s = (welcomed_by(worker, new.incarnation) or 0) - new.ready_at
    producer_s = (welcomed_by(producer, new.incarnation) or 0) - new.ready_at
    print(
        f"\n{how}: new router launched {launched_s:.3f} s after the old one went down,"
        f" ready {new.ready_at - down_at:.3f} s after;"
        f" worker welcomed {worker_s:.3f} s, producer {producer_s:.3f} s after it was ready"
    )
    assert worker_s < REJOIN_BOUND_S
    assert producer_s < REJOIN_BOUND_S

    worker.gate.set()  # the held credits finish now, under the new router
    after = run_sessions(producer, 30, ["new-0", "new-1"], turns=2)
    everything = before + held + queued + gap + after
    assert producer.wait_outcomes(everything, RECOVERY_GRACE_S + 10)
    assert_one_outcome_each(producer, everything)
    for credit_id in before + after:
        assert producer.outcomes[credit_id][1] == "completed", producer.outcomes[credit_id]
    gap_ends = [tuple(producer.outcomes[i][1:3]) for i in gap]
    print(f"gap credits: {gap_ends}; stale_incarnation resubmits: {producer.log.stale_resubmits}")
    for credit_id, end in zip(gap, gap_ends, strict=True):
        assert end == GAVE_UP or (
            end[0] == "completed" and credit_id in producer.log.stale_resubmits
        )
    if how == "kill":
        # §5.6/§6.1: the held credits come back through Recovered, forwarded once
        assert [producer.outcomes[i][1] for i in held] == ["completed"] * 4
        assert {seq for _inc, seq in worker.log.recovered_sent} >= set(range(5, 9))
        assert all(inc == old.incarnation for inc, _seq in worker.log.recovered_sent)
        # the queued ones died with the old router: the producer gives up on them (§6.1)
        assert [tuple(producer.outcomes[i][1:3]) for i in queued] == [GAVE_UP] * 3
    else:
        # revoked credits are never reported again, not even as Recovered (§5.4)
        assert worker.log.recovered_sent == []
        assert not [c for c in worker.log.completed if c[1] in held]
    assert not producer.log.after_give_up


def test_router_kill9_restart_doc_peers_rejoin_and_every_credit_ends_once(cluster: Cluster) -> None:
    _restart_scenario(cluster, "kill")


def test_router_sigterm_restart_doc_peers_rejoin_and_every_credit_ends_once(
    cluster: Cluster,
) -> None:
    _restart_scenario(cluster, "term")


def test_capacity_across_a_router_restart_is_as_documented(cluster: Cluster) -> None:
    """PROTOCOL.md §5.1: a new router incarnation does not know the credits its predecessor
    dispatched, nor their load, so it may send up to ``capacity`` new ones while they finish
    (a worker queues what it cannot run): at most twice the capacity is held, and every credit
    still ends once."""
    old = cluster.router()
    worker = cluster.worker("gpu-1", capacity=2)
    producer = cluster.producer("bench")
    wait_for(lambda: worker.welcomed and producer.welcomed, what="welcomes")
    worker.gate.clear()
    for credit_id in (0, 1):
        producer.submit(wire.credit(credit_id, f"s-{credit_id}"))
    wait_for(lambda: worker.holding == 2, what="2 credits on the worker")
    old.kill()
    new = cluster.router()
    wait_for(
        lambda: (
            welcomed_by(worker, new.incarnation or "") is not None
            and welcomed_by(producer, new.incarnation or "") is not None
        ),
        5,
        "welcomes from the new router",
    )
    most = 0
    for credit_id in (10, 11):
        producer.submit(wire.credit(credit_id, f"s-{credit_id}"))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        most = max(most, worker.holding)
        time.sleep(0.01)
    worker.gate.set()
    assert producer.wait_outcomes([0, 1, 10, 11], 10)
    assert_one_outcome_each(producer, [0, 1, 10, 11])
    assert most <= 4, f"{most} credits held at once on a worker of capacity 2"
