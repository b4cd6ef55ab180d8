"""A restarted router takes over what its predecessor dispatched (newcomer finding 1).

A worker's first hello to a router lists the credits it still runs for the router that
dispatched them. A router that restarted has no record of them: it adopts each (a ticket on
that worker, counted against its capacity), tells the producer (``ProducerAdopted``), and
gives each exactly one outcome — its recovered completion, or ``lost: worker_lost`` with the
worker. Before, the producer gave such a credit up after its recovery grace (30 s) even while
it ran, and its real completion was dropped as late.
"""

from __future__ import annotations

from protocol import Cancel, Completion, Credit, ErrorReport, ProducerAdopted, Status
from tests.router_service.core.harness import Harness


def _done(cid: int, producer: str = "p", seq: int = 1) -> Completion:
    return Completion(seq=seq, producer=producer, credit_id=cid, status=Status.COMPLETED)


def _recovered(h: Harness, *done: Completion, worker: str = "w") -> None:
    """``worker`` sends ``done`` as completions of an earlier router's credits."""
    h.core.recovered(worker, list(done), h.now)
    h._collect()


def test_a_restarted_router_adopts_what_a_worker_still_runs_and_ends_it_once() -> None:
    h = Harness()
    h.join("w", capacity=3, in_flight={"p": [7, 8], "q": [9]})
    assert h.core.stats.adopted == 3
    told = {
        (key, tuple(m.credit_ids)) for key, m in h.to_producer if isinstance(m, ProducerAdopted)
    }
    assert told == {("p", (7, 8)), ("q", (9,))}
    assert len(h.core.workers["w"].tickets) == 3  # counted against its capacity (3): full
    c = h.send("new")
    assert c.id not in h.sent_to  # it waits: the worker's slots are taken by what it runs
    _recovered(h, _done(7))
    assert (h.outcome_of("p", 7).status, h.outcome_of("p", 7).worker) == (Status.COMPLETED, "w")
    # Its submission and dispatch happened at the old router: no latency is made up for it.
    assert h.outcome_of("p", 7).submit_to_dispatch_s is None
    assert h.outcome_of("p", 7).dispatch_to_outcome_s is None
    assert h.core.stats.dispatch_to_outcome_s.count == 0
    _recovered(h, _done(7, seq=2))  # a repeat (another seq) is no second outcome
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
    _recovered(h, _done(7))
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
    _recovered(h, _done(7))
    assert h.outcome_of("p", 7).status is Status.COMPLETED


def test_credits_this_router_knows_are_never_adopted() -> None:
    h = Harness()
    h.join("a")
    c = h.send("s")
    assert h.sent_to[c.id] == "a"
    h.join("b", in_flight={"p": [c.id]})  # (a confused worker claims a's credit)
    assert h.core.stats.adopted == 0
    assert not any(isinstance(m, ProducerAdopted) for _, m in h.to_producer)


# ------------------------------------------------ what a confused or hostile hello may claim


def _adopted_told(h: Harness) -> dict[str, list[int]]:
    told: dict[str, list[int]] = {}
    for key, m in h.to_producer:
        if isinstance(m, ProducerAdopted):
            told.setdefault(key, []).extend(m.credit_ids)
    return told


def test_a_claimed_id_never_makes_its_producers_own_submission_fail_or_take_its_outcome() -> None:
    """A worker's first hello claims ids producer ``p`` has not used yet. ``p`` then submits
    them: each submission is its own credit (no ``duplicate_credit``), and the claims end
    silently, so no outcome of theirs reaches ``p`` as the new credit's — not when the
    claiming worker is lost, nor when it reports them completed."""
    h = Harness()
    h.join("liar", capacity=2, in_flight={"p": [1, 2]})
    h.join("w", capacity=4)
    assert h.core.stats.adopted == 2
    genuine = h.send("s")  # id 1: the liar's first claim
    assert genuine.id == 1
    assert not any(isinstance(m, ErrorReport) for _, m in h.to_producer)
    assert h.core.stats.adoptions_displaced == 1
    assert h.where(genuine) == "w"  # (the least loaded: the liar still holds its claim 2)
    # The liar "completes" the claimed id: not the genuine credit's outcome.
    claimed = Completion(seq=9, producer="p", credit_id=1, status=Status.FAILED, reason="lie")
    _recovered(h, claimed, worker="liar")
    assert ("p", 1) not in h.by_producer
    assert h.core.stats.misdirected_completions == 1
    h.core.worker_unreachable("liar", h.now)  # its other claim (2) ends here, once
    h._collect()
    assert (h.outcome_of("p", 2).status, h.outcome_of("p", 2).reason) == (
        Status.LOST,
        "worker_lost",
    )
    assert ("p", 1) not in h.by_producer
    h.complete(genuine)
    assert (h.outcome(genuine).status, h.outcome(genuine).worker) == (Status.COMPLETED, "w")
    # id 2 ended as the claim's: the producer (which never had it) may still submit a credit 2.
    h.core.submit("p", [Credit(id=2, x_correlation_id="t")], h.now)
    h.submitted += 1
    fx = h.core.take_effects()
    assert [c.id for _, item in fx.to_worker if isinstance(item, tuple) for c in item[1]] == [2]


def test_a_hello_adopts_no_more_than_the_capacity_it_declares() -> None:
    # A worker runs at most its capacity: a hello listing more (bounded by the frame size
    # only, millions of ids) cannot make the router hold a ticket for each.
    h = Harness()
    h.join("w", capacity=2, in_flight={"p": [1, 2, 3], "q": [4, 5]})
    assert h.core.stats.adopted == 2
    assert h.core.stats.adoptions_refused == 3
    assert sum(len(ids) for ids in _adopted_told(h).values()) == 2
    assert len(h.core.workers["w"].tickets) == 2


def test_the_record_of_ended_adopted_credits_is_bounded() -> None:
    h = Harness()
    h.core._adopted_ended_kept = 3
    for i in range(5):
        h.join("w", capacity=2, incarnation=f"i{i}", in_flight={"p": [10 * i, 10 * i + 1]})
        h.core.worker_left("w", h.now)
        h._collect()
    assert h.core.stats.adopted == 10
    assert len(h.core._adopted_ended) == 3
    assert list(h.core._adopted_ended) == [("p", 31), ("p", 40), ("p", 41)]  # the newest


# ----------------------------------------------------------- one outcome, whatever happens


def test_an_adopted_credit_ends_once_when_its_worker_says_goodbye_and_hello_again() -> None:
    # Goodbye and a hello of the same incarnation, read in one wake-up: the credit ends
    # lost: worker_left once, and the hello does not adopt it again.
    h = Harness()
    h.join("w", in_flight={"p": [7]})
    h.core.worker_left("w", h.now)
    h.core.worker_hello(
        "w",
        incarnation="i1",
        protocol_version=h.core.protocol_version,
        capacity=8,
        labels={},
        in_flight={"p": [7]},
        now=h.now,
    )
    h._collect()
    assert (h.outcome_of("p", 7).status, h.outcome_of("p", 7).reason) == (
        Status.LOST,
        "worker_left",
    )
    assert h.core.stats.adopted == 1
    assert not h.core.workers["w"].tickets
    _recovered(h, _done(7))
    assert h.core.stats.duplicate_completions == 1


def test_an_adopted_credit_ends_once_when_a_new_incarnation_replaces_its_worker() -> None:
    h = Harness()
    h.join("w", in_flight={"p": [7]})
    h.closed("w")  # suspect: a new incarnation may replace it
    h.join("w", incarnation="i2", in_flight={"p": [7]})  # (a new process cannot run it)
    assert (h.outcome_of("p", 7).status, h.outcome_of("p", 7).reason) == (
        Status.LOST,
        "worker_lost",
    )
    assert h.core.stats.adopted == 1
    assert not h.core.workers["w"].tickets


def test_a_completion_of_an_adopted_credit_is_its_one_outcome_whatever_frame_carries_it() -> None:
    # A confused worker sends it as a plain Completion (not Recovered); a repeat as Recovered
    # is still a duplicate, never forwarded as a second outcome.
    h = Harness()
    h.join("w", in_flight={"p": [7]})
    h.core.complete("w", [_done(7)], h.now)
    h._collect()
    assert h.outcome_of("p", 7).status is Status.COMPLETED
    _recovered(h, _done(7, seq=2))
    assert (h.core.stats.recovered, h.core.stats.duplicate_completions) == (0, 1)


def test_shutdown_ends_adopted_credits_once_and_revokes_them() -> None:
    h = Harness()
    h.join("w", in_flight={"p": [7]})
    h.core.shutdown(h.now)
    h._collect()
    assert (h.outcome_of("p", 7).status, h.outcome_of("p", 7).reason) == (
        Status.LOST,
        "router_shutdown",
    )
    revoked = [m for _, m in h.to_worker if isinstance(m, Cancel) and m.revoked]
    assert [(m.producer, m.credit_ids) for m in revoked] == [("p", [7])]
    _recovered(h, _done(7))
    assert h.core.stats.duplicate_completions == 1


def test_a_worker_that_adopts_is_ranked_by_its_load_with_the_adopted_credits() -> None:
    # The least-loaded index must see the adopted credits (invariant 6, checked by the
    # harness after each call): a new credit goes to the worker with the lower load.
    h = Harness()
    h.join("a", capacity=4)
    h.send("s1")
    h.join("b", capacity=4, in_flight={"p": [100, 101, 102]})
    assert h.where(h.send("s2")) == "a"
