"""A restarted router takes over what its predecessor dispatched (newcomer finding 1).

A worker's first hello to a router lists the credits it still runs for the router that
dispatched them. A router that restarted has no record of them: it adopts each (a ticket on
that worker, counted against its capacity), tells the producer (``ProducerAdopted``), and
gives each exactly one outcome — its recovered completion, or ``lost: worker_lost`` with the
worker. Before, the producer gave such a credit up after its recovery grace (30 s) even while
it ran, and its real completion was dropped as late.
"""

from __future__ import annotations

from protocol import Completion, ProducerAdopted, Status
from tests.router_service.core.harness import Harness


def _done(cid: int, producer: str = "p", seq: int = 1) -> Completion:
    return Completion(seq=seq, producer=producer, credit_id=cid, status=Status.COMPLETED)


def test_a_restarted_router_adopts_what_a_worker_still_runs_and_ends_it_once() -> None:
    h = Harness()
    h.join("w", capacity=2, in_flight={"p": [7, 8], "q": [9]})
    assert h.core.stats.adopted == 3
    told = {
        (key, tuple(m.credit_ids)) for key, m in h.to_producer if isinstance(m, ProducerAdopted)
    }
    assert told == {("p", (7, 8)), ("q", (9,))}
    assert len(h.core.workers["w"].tickets) == 2 + 1  # counted against its capacity (2): full
    c = h.send("new")
    assert c.id not in h.sent_to  # it waits: the worker's slots are taken by what it runs
    h.core.recovered("w", [_done(7)], h.now)
    h._collect()
    assert (h.outcome_of("p", 7).status, h.outcome_of("p", 7).worker) == (Status.COMPLETED, "w")
    # Its submission and dispatch happened at the old router: no latency is made up for it.
    assert h.outcome_of("p", 7).submit_to_dispatch_s is None
    assert h.outcome_of("p", 7).dispatch_to_outcome_s is None
    assert h.core.stats.dispatch_to_outcome_s.count == 0
    h.core.recovered("w", [_done(7, seq=2)], h.now)  # a repeat (another seq) is no second outcome
    h._collect()
    assert h.core.stats.duplicate_completions == 1


def test_adopted_credits_end_lost_with_their_worker_and_a_late_completion_is_dropped() -> None:
    h = Harness()
    h.join("w", in_flight={"p": [7]})
    h.core.worker_unreachable("w", h.now)
    h._collect()
    assert (h.outcome_of("p", 7).status, h.outcome_of("p", 7).reason) == (
        Status.LOST,
        "worker_lost",
    )
    # The same process comes back and its completion arrives: the credit already ended here.
    h.join("w", in_flight={"p": [7]})
    assert h.core.stats.adopted == 1  # not adopted again: this router knew this incarnation
    h.core.recovered("w", [_done(7)], h.now)
    h._collect()
    assert h.core.stats.recovered == 0


def test_adopted_credits_are_not_judged_by_in_flight_reports() -> None:
    # The worker reports the credits of the router that welcomed it last: not the adopted ones.
    h = Harness()
    h.join("w", in_flight={"p": [7]})
    for _ in range(3):
        h.advance(1.0)
        h.core.worker_report("w", {}, h.now)
        h._collect()
    assert ("p", 7) not in h.by_producer
    h.core.recovered("w", [_done(7)], h.now)
    h._collect()
    assert h.outcome_of("p", 7).status is Status.COMPLETED


def test_credits_this_router_knows_are_never_adopted() -> None:
    h = Harness()
    h.join("a")
    c = h.send("s")
    assert h.sent_to[c.id] == "a"
    h.join("b", in_flight={"p": [c.id]})  # (a confused worker claims a's credit)
    assert h.core.stats.adopted == 0
    assert not any(isinstance(m, ProducerAdopted) for _, m in h.to_producer)
