"""The bugs the router fuzz found, each pinned by a deterministic test through the real
service's frame handlers. They were written as strict xfails and fixed in e59ff0c; these
tests keep them fixed.
"""

from __future__ import annotations

import pytest
import zmq

from protocol.codec import encode
from protocol.messages import (
    BranchMode,
    ChildRelease,
    Completion,
    Credit,
    EndSession,
    FirstToken,
    Goodbye,
    Hello,
    InFlightReport,
    Recovered,
    Status,
    Submit,
)
from router_service.core.invariants import check_invariants
from router_service.service import INVALID_LIMIT
from tests.fuzz.router_rig import ROUTER_INCARNATION, Rig

pytestmark = pytest.mark.integration

P = b"p/1"
Ctx = zmq.Context[zmq.Socket[bytes]]


def _submit(rig: Rig, credit: Credit) -> None:
    rig.service._on_producer_frames([(P, encode(Submit(credit=credit)))])


def _from_worker(rig: Rig, name: str, msg: object) -> None:
    rig.service._on_worker_frames([(name.encode(), encode(msg))])


def _done(cid: int, seq: int = 1) -> Completion:
    return Completion(seq=seq, producer="p/1", credit_id=cid, status=Status.COMPLETED)


def _holder(rig: Rig, cid: int) -> str:
    (name,) = [n for n, w in rig.core.workers.items() if any(t.credit.id == cid for t in w.tickets)]
    return name


async def test_queued_fork_child_whose_parent_moved_is_not_stranded(zmq_ctx: Ctx) -> None:
    """Was refill-fork-parent-moved: RouterCore._refill dispatches a queued FORK child to
    its old worker after its parent's entry was re-created on another worker; _book_fork's
    assert fails, the child is left in no queue and never gets an outcome."""
    rig = await Rig.start(zmq_ctx, {"a": 1, "b": 1}, [P])
    try:
        _submit(rig, Credit(id=1, x_correlation_id="r", num_turns=2, fork_count=1))
        holder = _holder(rig, 1)
        fork = BranchMode.FORK
        _submit(
            rig, Credit(id=2, x_correlation_id="k", parent_correlation_id="r", branch_mode=fork)
        )
        assert [t.credit.id for t in rig.core.workers[holder].queue] == [2]  # holder is full
        rig.service._on_producer_frames([(P, encode(EndSession(x_correlation_id="r")))])
        _submit(rig, Credit(id=3, x_correlation_id="r", num_turns=2))  # a new "r", elsewhere
        assert _holder(rig, 3) != holder
        _from_worker(rig, holder, _done(1))  # a slot opens on the holder: refill
        outcomes, _, _ = rig.read_producers()
        assert rig.service.invalid_messages.get("internal_error", 0) == 0
        check_invariants(rig.core)
        # Invariant 2 says an open credit is queued or in flight: it is not stranded.
        ended = {cid for (_, cid), _ in outcomes}
        assert 2 in ended or 2 in rig.core.ledgers["p/1"]
        assert 2 not in {t.credit.id for t in rig.core.workers[holder].tickets}
    finally:
        await rig.close()


async def test_fork_child_reusing_a_session_id_keeps_the_table_consistent(zmq_ctx: Ctx) -> None:
    """Was fork-id-collision: a FORK child whose x_correlation_id is an existing session's
    key becomes an alias of another entry, and that session's own FORK children now count
    as its kids: invariant 4 (and the alias pruning built on it) breaks."""
    rig = await Rig.start(zmq_ctx, {"a": 10}, [P])
    try:
        fork = BranchMode.FORK
        _submit(rig, Credit(id=1, x_correlation_id="s0", num_turns=2, fork_count=1))
        _submit(
            rig, Credit(id=2, x_correlation_id="k0", parent_correlation_id="s0", branch_mode=fork)
        )
        _submit(rig, Credit(id=3, x_correlation_id="r", num_turns=2, fork_count=1))
        check_invariants(rig.core)
        # A FORK child of "r" that says its own id is "s0" (a live session's key).
        _submit(
            rig, Credit(id=4, x_correlation_id="s0", parent_correlation_id="r", branch_mode=fork)
        )
        check_invariants(rig.core)
    finally:
        await rig.close()


async def test_recovered_naming_this_incarnation_is_not_a_second_outcome(zmq_ctx: Ctx) -> None:
    """Was recovered-current-incarnation: Recovered naming this router's own incarnation is
    forwarded like one from a restarted router, so a credit that already had its outcome
    gets a second one (RouterService ignores Recovered.router_incarnation)."""
    rig = await Rig.start(zmq_ctx, {"w": 1}, [P])
    try:
        _submit(rig, Credit(id=1, x_correlation_id="s"))
        _from_worker(rig, "w", _done(1, seq=1))
        outcomes, _, _ = rig.read_producers()
        assert [cid for (_, cid), _ in outcomes] == [1]
        again = Recovered(router_incarnation=ROUTER_INCARNATION, completions=[_done(1, seq=2)])
        _from_worker(rig, "w", again)
        outcomes, _, _ = rig.read_producers()
        assert outcomes == [], f"a second outcome for credit 1: {outcomes}"
    finally:
        await rig.close()


async def test_first_token_for_a_credit_not_yet_dispatched_is_dropped(zmq_ctx: Ctx) -> None:
    """Was first-token-before-dispatch: RouterCore.first_token forwards a FirstToken for a
    credit still queued on the reporting worker (it checks ticket.worker, not
    dispatched_at)."""
    rig = await Rig.start(zmq_ctx, {"w": 1}, [P])
    try:
        _submit(rig, Credit(id=1, x_correlation_id="s", num_turns=2))
        _submit(rig, Credit(id=2, x_correlation_id="s", turn_index=1, num_turns=2))
        assert [t.credit.id for t in rig.core.workers["w"].queue] == [2]  # waits: w is full
        _from_worker(rig, "w", FirstToken(producer="p/1", credit_id=2, ttft_s=0.1))
        _, tokens, _ = rig.read_producers()
        assert tokens == [], f"first token for a credit the worker was never sent: {tokens}"
    finally:
        await rig.close()


async def test_a_worker_cannot_release_another_workers_fork_child(zmq_ctx: Ctx) -> None:
    """Was child-release-any-worker: RouterCore.child_release ignores which worker sends
    it, so one worker can end another worker's FORK child (and evict its parent's entry)."""
    rig = await Rig.start(zmq_ctx, {"a": 2, "b": 2}, [P])
    try:
        fork = BranchMode.FORK
        _submit(rig, Credit(id=1, x_correlation_id="r", num_turns=2, fork_count=1))
        _submit(
            rig, Credit(id=2, x_correlation_id="k", parent_correlation_id="r", branch_mode=fork)
        )
        holder = _holder(rig, 2)
        other = "b" if holder == "a" else "a"
        _from_worker(rig, other, ChildRelease(x_correlation_id="k", producer=P.decode()))
        table = rig.core.table_of(P.decode())
        assert table is not None
        alias = table.aliases.get("k")
        assert alias is not None, "another worker ended the FORK child k"
        assert alias.live
    finally:
        await rig.close()


async def test_producer_garbage_does_not_count_against_a_worker(zmq_ctx: Ctx) -> None:
    """Was invalid-count-shared: RouterService._errors counts invalid frames per identity
    over both sockets, so garbage sent on the producer socket under a worker's name brings
    that worker closer to being cut off (and lost)."""
    rig = await Rig.start(zmq_ctx, {"w0": 1}, [P])
    try:
        half = INVALID_LIMIT // 2 + 10
        rig.service._on_producer_frames([(b"w0", b"\xc1")] * half)
        rig.service._on_worker_frames([(b"w0", b"\xc1")] * (INVALID_LIMIT - half + 1))
        assert "w0" in rig.core.workers, "w0 was cut off after fewer than the limit"
    finally:
        await rig.close()


async def test_a_worker_heard_after_goodbye_and_hello_in_one_wake_up(zmq_ctx: Ctx) -> None:
    """Was goodbye-hello-one-wake-up (make fuzz, hostile peers): a worker's Goodbye and a new
    Hello read in one wake-up. The core lost it and admitted it again, but the transport
    forgot its name at the end of the wake-up (the Goodbye's effect), so everything it said
    afterwards was answered ``unknown_worker``: its in-flight reports never reached the core
    and the credit dispatched to it after the Hello waited for a completion nobody heard."""
    rig = await Rig.start(zmq_ctx, {"a": 1}, [P])
    try:
        _submit(rig, Credit(id=1, x_correlation_id="r"))
        _submit(rig, Credit(id=2, x_correlation_id="s"))  # queued: "a" is full
        hello = Hello(name="a", incarnation="a-i0", protocol_version=1, capacity=1)
        rig.service._on_worker_frames([(b"a", encode(Goodbye())), (b"a", encode(hello))])
        assert _holder(rig, 2) == "a"  # dispatched to "a" after its hello
        # The first report only starts the judging (credit 2 may have been in transit); the
        # next two miss it: orphaned (docs/ROUTING.md §6).
        for _ in range(3):
            _from_worker(rig, "a", InFlightReport(credits={}))
        outcomes, _, _ = rig.read_producers()
        ended = {cid: (o.status, o.reason) for (_, cid), o in outcomes}
        assert ended == {1: (Status.LOST, "worker_left"), 2: (Status.LOST, "orphaned")}
        _submit(rig, Credit(id=3, x_correlation_id="t"))
        _from_worker(rig, "a", _done(3))
        outcomes, _, _ = rig.read_producers()
        assert [(cid, o.status) for (_, cid), o in outcomes] == [(3, Status.COMPLETED)]
        assert rig.service.invalid_messages.get("internal_error", 0) == 0
        check_invariants(rig.core)
    finally:
        await rig.close()


async def test_a_worker_that_adopts_is_indexed_with_its_adopted_load(zmq_ctx: Ctx) -> None:
    """Was adopt-before-index (make fuzz, hostile peers, with adoption drawn): the core put a
    new worker in its least-loaded index before adopting what its first hello listed, so the
    index ranked it empty while it was full (invariant 6), and new sessions went to it first,
    to wait there, while another worker had room."""
    rig = await Rig.start(zmq_ctx, {"a": 3}, [P])
    try:
        _submit(rig, Credit(id=1, x_correlation_id="r"))
        hello = Hello(
            name="ghost",
            incarnation="ghost-1",
            protocol_version=1,
            capacity=1,
            in_flight={"p/1": [100]},
        )
        _from_worker(rig, "ghost", hello)
        assert rig.core.stats.adopted == 1
        check_invariants(rig.core)
        _submit(rig, Credit(id=2, x_correlation_id="s"))
        assert _holder(rig, 2) == "a"
    finally:
        await rig.close()
