"""Issue 9 at the pair tier: each numbered scenario of the peer-links issue, with the real
router service, worker agents and producer clients in one process (``tests/pair/rig.py``).

Every test checks the promise, not just the absence of a crash: each credit ends exactly once
(counted at the producer, through ``RouterClient.stream()``), and no later turn runs without
its history.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocol import PROTOCOL_VERSION
from protocol.codec import decode_router_to_producer, decode_router_to_worker
from protocol.messages import (
    BranchMode,
    Completion,
    Credit,
    Dispatch,
    DispatchBatch,
    ErrorReport,
    Hello,
    Outcome,
    OutcomeBatch,
    ProducerHello,
    ProducerWelcome,
    Refusal,
    Status,
    SubmitBatch,
    Welcome,
)
from router_service.transport import TransportError
from tests.pair.rig import Rig, Scripted, credits, until
from worker_agent.errors import RefusedError

pytestmark = pytest.mark.integration


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    try:
        yield rig
    finally:
        await rig.close()


def _once(outcomes: dict[int, list[Outcome]], ids: range | list[int]) -> None:
    """Every credit of ``ids`` has exactly one outcome."""
    counts = {cid: len(outcomes.get(cid, [])) for cid in ids}
    assert all(n == 1 for n in counts.values()), {c: n for c, n in counts.items() if n != 1}


async def _settle(seconds: float = 0.3) -> None:
    """Give late frames (a second outcome, if any were coming) time to arrive."""
    await asyncio.sleep(seconds)


# --------------------------------------------------------------------- joins and restarts


async def test_s01_a_worker_joining_while_credits_wait_gets_its_welcome_first(rig: Rig) -> None:
    """Scenario 1: credits wait in the router before any worker exists; the worker that joins
    gets its Welcome before the first Dispatch and runs them (none ends lost: orphaned)."""
    await rig.start_router()
    producer = await rig.producer()
    for c in credits(range(1, 9)):
        await producer.submit(c)
    await asyncio.sleep(0.05)  # they wait: no worker yet
    worker = await rig.start_worker("w", capacity=4)
    outcomes = await producer.all_done()
    assert [o.status for o in outcomes] == [Status.COMPLETED] * 8
    assert worker.agent.stats.credits_before_welcome == 0


async def test_s01_a_raw_worker_sees_welcome_before_dispatch(rig: Rig) -> None:
    """Scenario 1, frame by frame: the first frame after the hello is the Welcome."""
    await rig.start_router()
    producer = await rig.producer()
    await producer.submit(Credit(id=1, x_correlation_id="s"))
    await asyncio.sleep(0.05)
    raw = Scripted(rig.ctx, rig.worker_endpoint, b"raw/i1")
    raw.send(Hello(name="raw", incarnation="i1", protocol_version=PROTOCOL_VERSION, capacity=2))
    first = await raw.recv(decode_router_to_worker)
    assert isinstance(first, Welcome)
    dispatch = await raw.expect(decode_router_to_worker, Dispatch | DispatchBatch)
    assert dispatch is not None
    raw.close()


async def test_s02_router_crash_every_credit_ends_once(tmp_path: Path) -> None:
    """Scenario 2 (kill -9): credits in flight come back through Recovered, forwarded once;
    credits the dead router only had queued end once, after the client's grace."""
    rig = Rig(tmp_path, hold=True)
    try:
        await rig.start_router()
        worker = await rig.start_worker("w", capacity=2)
        await rig.joined("w")
        producer = await rig.producer(recovery_grace_s=0.5)
        for c in credits(range(1, 7)):
            await producer.submit(c)
        await until(lambda: not (len(worker.executor.started) < 2))
        await rig.crash_router()
        await rig.start_router()
        await rig.joined("w")
        worker.executor.release(*worker.executor.started)  # the two in flight finish now
        outcomes = await producer.all_done()
        await _settle()
        _once(producer.outcomes, range(1, 7))
        by_id = {o.credit_id: o for o in outcomes}
        for cid in worker.executor.started[:2]:
            assert by_id[cid].status is Status.COMPLETED  # recovered, forwarded once
        assert producer.client.unmatched_outcomes == 0
    finally:
        await rig.close()


async def test_s02_a_draining_router_tells_its_workers(tmp_path: Path) -> None:
    """Scenario 2 (SIGTERM and back): a credit the draining router ended
    ``lost: router_shutdown`` is stopped on its worker and never completed later."""
    rig = Rig(tmp_path, hold=True)
    try:
        await rig.start_router()
        worker = await rig.start_worker("w", capacity=2)
        await rig.joined("w")
        producer = await rig.producer()
        for c in credits(range(1, 3)):
            await producer.submit(c)
        await until(lambda: not (len(worker.executor.started) < 2))
        await rig.stop_router()  # drain deadline passes with both still running
        outcomes = await producer.all_done()
        assert {(o.status, o.reason) for o in outcomes} == {(Status.LOST, "router_shutdown")}
        assert worker.agent.stats.revoked == 2
        await rig.start_router()
        await rig.joined("w")
        worker.executor.release(1, 2)
        await _settle(0.5)
        _once(producer.outcomes, [1, 2])
        assert len(worker.agent.completions) == 0  # nothing left to report as Recovered
    finally:
        await rig.close()


async def test_s03_router_back_within_three_heartbeats(rig: Rig) -> None:
    """Scenario 3: a router back before the peers notice silence answers hello_required /
    unknown_worker; client and agent say hello again, and new submits are answered."""
    await rig.start_router()
    await rig.start_worker("w")
    await rig.joined("w")
    producer = await rig.producer()
    assert (
        await producer.client.run(Credit(id=1, x_correlation_id="a"))
    ).status is Status.COMPLETED
    await rig.crash_router()
    await rig.start_router()  # at once: well within three heartbeats
    future = await producer.submit(Credit(id=2, x_correlation_id="b"))
    outcome = await asyncio.wait_for(future, 5)  # resolved: no hang
    # Sent before the client could know the router had died, it may have gone down with the
    # old connection: then it ends once, lost (it may have run), and never twice.
    assert (outcome.status, outcome.reason) in {
        (Status.COMPLETED, ""),
        (Status.LOST, "router_restarted"),
    }
    third = await asyncio.wait_for(producer.client.run(Credit(id=3, x_correlation_id="c")), 5)
    assert third.status is Status.COMPLETED
    assert producer.client.router_incarnation == rig.router.core.router_incarnation  # type: ignore[union-attr]


async def test_s04_credits_submitted_while_the_router_is_down_are_delivered_once(
    rig: Rig,
) -> None:
    """Scenario 4: credits submitted with no router are sent to the next one and awaited —
    not also given up ``lost: router_restarted`` after the grace."""
    await rig.start_router()
    await rig.start_worker("w")
    await rig.joined("w")
    producer = await rig.producer(recovery_grace_s=0.3)
    await producer.client.run(Credit(id=1, x_correlation_id="warm"))
    await rig.crash_router()
    # The router is down (a frame written into the dying connection in the very instant of the
    # crash may be lost with it: that credit's outcome is lost: router_restarted, not this).
    await asyncio.sleep(0.1)
    for c in credits(range(10, 16)):
        await producer.submit(c)
    await asyncio.sleep(0.4)  # longer than the grace
    await rig.start_router()
    await producer.all_done()
    await asyncio.sleep(0.5)  # past the grace after the restart too
    _once(producer.outcomes, range(10, 16))
    assert {o.status for o in await producer.all_done()} == {Status.COMPLETED}


async def test_s05_a_retransmitted_recovered_reaches_the_producer_once(rig: Rig) -> None:
    """Scenario 5: the router forwards a ``Recovered`` completion once, however often the
    worker sends it (a third-party producer cannot know to filter)."""
    from protocol.messages import Recovered

    await rig.start_router()
    producer = Scripted(rig.ctx, rig.producer_endpoint, b"third/1")
    producer.send(
        ProducerHello(producer="third", protocol_version=PROTOCOL_VERSION, incarnation="1")
    )
    await producer.expect(decode_router_to_producer, ProducerWelcome)
    raw = Scripted(rig.ctx, rig.worker_endpoint, b"w/i1")
    raw.send(Hello(name="w", incarnation="i1", protocol_version=PROTOCOL_VERSION, capacity=2))
    await raw.expect(decode_router_to_worker, Welcome)
    done = Completion(seq=1, producer="third/1", credit_id=77, status=Status.COMPLETED)
    for _ in range(3):
        raw.send(Recovered(router_incarnation="r-old", completions=[done]))
    await _settle()
    got = []
    while True:
        try:
            got.append(await producer.recv(decode_router_to_producer, 0.1))
        except TimeoutError:
            break
    outcomes = [m for m in got if isinstance(m, Outcome)]
    assert [o.credit_id for o in outcomes] == [77]
    producer.close()
    raw.close()


# ------------------------------------------------------------------------------ identity


async def test_s06_a_second_live_holder_of_a_name_is_refused(rig: Rig) -> None:
    """Scenario 6: two processes with the same name: the second is refused ``name_in_use``
    (it exits with the reason), the first keeps its credits."""
    await rig.start_router()
    first = await rig.start_worker("w", incarnation="a")
    await rig.joined("w")
    producer = await rig.producer()
    rig.workers.pop("w")
    second = await rig.start_worker("w", incarnation="b")
    with pytest.raises(RefusedError, match=r"is held by live incarnation"):
        await asyncio.wait_for(second.task, 5)
    assert rig.router is not None
    assert rig.router.core.workers["w"].incarnation == "a"
    rig.workers["w"] = first
    outcomes = [await producer.client.run(c) for c in credits(range(1, 4))]
    assert {(o.status, o.worker) for o in outcomes} == {(Status.COMPLETED, "w")}


async def test_s07_a_superseded_incarnation_is_fenced(rig: Rig) -> None:
    """Scenario 7: a frozen worker replaced by a new incarnation, then resumed, is refused
    ``superseded`` and never takes its name back."""
    await rig.start_router(lost_after_s=0.3)
    old = Scripted(rig.ctx, rig.worker_endpoint, b"w/old")
    old.send(Hello(name="w", incarnation="old", protocol_version=PROTOCOL_VERSION, capacity=2))
    await old.expect(decode_router_to_worker, Welcome)
    await asyncio.sleep(0.5)  # "frozen": silent past the grace, so it is lost
    new = await rig.start_worker("w", incarnation="new")
    await rig.joined("w")
    # It wakes up and says hello again, or just carries on talking.
    old.send(Hello(name="w", incarnation="old", protocol_version=PROTOCOL_VERSION, capacity=2))
    refusal = await old.expect(decode_router_to_worker, Refusal)
    assert refusal.code == "superseded"
    assert rig.router is not None
    assert rig.router.core.workers["w"].incarnation == "new"
    producer = await rig.producer()
    assert (await producer.client.run(Credit(id=1, x_correlation_id="s"))).worker == "w"
    assert new.executor.started == [1]
    old.close()


async def test_s09_a_producer_restarted_under_the_same_routing_id_starts_afresh(
    rig: Rig,
) -> None:
    """Scenario 9: a new incarnation under the same routing id gets an empty ledger: its
    credit 1 is accepted (not a duplicate), and the old process's outcome never reaches it."""
    await rig.start_router()
    rig.hold = True
    worker = await rig.start_worker("w")
    await rig.joined("w")
    p = Scripted(rig.ctx, rig.producer_endpoint, b"bench")
    p.send(ProducerHello(producer="bench", protocol_version=PROTOCOL_VERSION, incarnation="A"))
    await p.expect(decode_router_to_producer, ProducerWelcome)
    p.send(SubmitBatch(credits=[Credit(id=1, x_correlation_id="old")]))
    await until(lambda: worker.executor.started == [1])
    p.send(ProducerHello(producer="bench", protocol_version=PROTOCOL_VERSION, incarnation="B"))
    await p.expect(decode_router_to_producer, ProducerWelcome)
    p.send(SubmitBatch(credits=[Credit(id=1, x_correlation_id="new")]))
    await until(lambda: not (len(worker.executor.started) < 2))
    worker.executor.release(1)
    got = await p.expect(decode_router_to_producer, Outcome | OutcomeBatch | ErrorReport)
    assert not isinstance(got, ErrorReport), got  # not "duplicate_credit"
    outcomes = got.outcomes if isinstance(got, OutcomeBatch) else [got]
    assert [(o.credit_id, o.status) for o in outcomes] == [(1, Status.COMPLETED)]
    assert [r.session for r in rig.ran] == ["old", "new"]
    p.close()


async def test_s10_a_producer_whose_routing_id_is_not_utf8_gets_its_outcomes(rig: Rig) -> None:
    """Scenario 10: outcomes go to the exact routing-id bytes (libzmq's generated ids are not
    UTF-8), not to a re-encoded string no peer has."""
    await rig.start_router()
    await rig.start_worker("w")
    await rig.joined("w")
    p = Scripted(rig.ctx, rig.producer_endpoint, b"\x00\xff\xfe\x80ok")
    p.send(ProducerHello(producer="anon", protocol_version=PROTOCOL_VERSION))
    await p.expect(decode_router_to_producer, ProducerWelcome)
    p.send(SubmitBatch(credits=credits(range(1, 4))))
    seen: list[int] = []
    while len(seen) < 3:
        got = await p.expect(decode_router_to_producer, Outcome | OutcomeBatch)
        seen += [o.credit_id for o in (got.outcomes if isinstance(got, OutcomeBatch) else [got])]
    assert sorted(seen) == [1, 2, 3]
    p.close()


async def test_s11_a_second_router_on_a_live_ipc_endpoint_is_refused(rig: Rig) -> None:
    """Scenario 11: binding an ``ipc://`` path a live router serves fails with one line; the
    first keeps its producers. A stale socket file is removed and bound."""
    router = await rig.start_router()
    producer = await rig.producer()
    from protocol import PROTOCOL_VERSION as version
    from router_service.core.router import RouterCore
    from router_service.service import RouterService

    second = RouterService(
        RouterCore(protocol_version=version),
        worker_endpoint=f"ipc://{rig.dir}/w2.ipc",
        producer_endpoint=rig.producer_endpoint,
        context=rig.ctx,
    )
    with pytest.raises(TransportError, match="another process is serving"):
        second.startup()
    assert second._workers_sock is None  # it closed what it had bound
    await rig.start_worker("w")
    await rig.joined("w")
    assert (
        await producer.client.run(Credit(id=1, x_correlation_id="s"))
    ).status is Status.COMPLETED
    assert router is rig.router
    # A stale file (its router died without unlinking it) does not block a new router.
    stale = rig.dir / "stale.ipc"
    stale.write_bytes(b"")
    import socket

    sock = socket.socket(socket.AF_UNIX)
    stale.unlink()
    sock.bind(str(stale))  # a socket file nobody listens on
    sock.close()
    third = RouterService(
        RouterCore(protocol_version=version),
        worker_endpoint=f"ipc://{rig.dir}/w3.ipc",
        producer_endpoint=f"ipc://{stale}",
        context=rig.ctx,
    )
    third.startup()  # the stale file was removed and the path bound
    for sock in (third._workers_sock, third._producers_sock):
        assert sock is not None
        sock.close()


# ------------------------------------------------------------------- sessions across producers


async def test_s12_sessions_belong_to_the_producer_that_started_them(rig: Rig) -> None:
    """Scenario 12: producer B's EndSession and final turn with A's session id touch only
    B's session; A's next turn runs where A's history is, with it."""
    await rig.start_router()
    await rig.start_worker("w1")
    await rig.start_worker("w2")
    await rig.joined()
    a = await rig.producer("a")
    b = await rig.producer("b")
    assert (await a.client.run(Credit(id=1, x_correlation_id="s", num_turns=3))).status is (
        Status.COMPLETED
    )
    home = rig.ran[-1].worker
    b.client.end_session("s")
    await b.client.run(Credit(id=1, x_correlation_id="s", num_turns=2, turn_index=1))
    await asyncio.sleep(0.05)
    second = await a.client.run(Credit(id=2, x_correlation_id="s", num_turns=3, turn_index=1))
    assert second.status is Status.COMPLETED
    mine = [r for r in rig.ran if r.producer == a.client.key]
    assert [(r.worker, r.history) for r in mine] == [(home, 0), (home, 1)]


# -------------------------------------------------------------------------- session edges


async def test_s13_a_final_turn_whose_send_failed_waits_for_its_worker(rig: Rig) -> None:
    """Scenario 13: the worker holding a session is briefly disconnected when its final turn
    is routed; the turn is held for it (allow_migration=false), not re-routed elsewhere."""
    await rig.start_router(lost_after_s=10.0, closed_grace_s=10.0)  # back within the grace
    raw = Scripted(rig.ctx, rig.worker_endpoint, b"home/i1")
    raw.send(Hello(name="home", incarnation="i1", protocol_version=PROTOCOL_VERSION, capacity=4))
    await raw.expect(decode_router_to_worker, Welcome)
    producer = await rig.producer()
    first = await producer.submit(Credit(id=1, x_correlation_id="s", num_turns=2))
    got = await raw.expect(decode_router_to_worker, Dispatch | DispatchBatch)
    dispatched = [got.credit] if isinstance(got, Dispatch) else got.credits
    assert [c.id for c in dispatched] == [1]
    key = producer.client.key
    raw.send(Completion(seq=1, producer=key, credit_id=1, status=Status.COMPLETED))
    assert (await first).status is Status.COMPLETED
    raw.close()  # the connection drops
    await rig.start_worker("other")  # an idle worker is right there
    await rig.joined("other")
    final = await producer.submit(Credit(id=2, x_correlation_id="s", num_turns=2, turn_index=1))
    await asyncio.sleep(0.2)
    assert 2 not in rig.workers["other"].executor.started  # not re-routed as a new session
    back = Scripted(rig.ctx, rig.worker_endpoint, b"home/i1")  # the same process reconnects
    back.send(Hello(name="home", incarnation="i1", protocol_version=PROTOCOL_VERSION, capacity=4))
    # The frame held while it was away comes after the Welcome, never before (scenario 1).
    assert isinstance(await back.recv(decode_router_to_worker), Welcome)
    got = await back.expect(decode_router_to_worker, Dispatch | DispatchBatch)
    dispatched = [got.credit] if isinstance(got, Dispatch) else got.credits
    assert [c.id for c in dispatched] == [2]  # the final turn came home
    back.send(Completion(seq=2, producer=key, credit_id=2, status=Status.COMPLETED))
    assert (await final).worker == "home"
    back.close()


async def test_s15_a_session_with_a_running_turn_is_not_idle(rig: Rig) -> None:
    """Scenario 15: the idle TTL counts from the last activity and never evicts a session
    whose turn is still running; its next turn is accepted, not ``session_expired``."""
    rig.delay_s = 0.5
    await rig.start_router(session_idle_ttl_s=0.2)
    await rig.start_worker("w")
    await rig.joined("w")
    producer = await rig.producer()
    first = await producer.client.run(Credit(id=1, x_correlation_id="s", num_turns=2))
    assert first.status is Status.COMPLETED
    rig.delay_s = 0.01
    second = await producer.client.run(
        Credit(id=2, x_correlation_id="s", num_turns=2, turn_index=1)
    )
    assert (second.status, second.reason) == (Status.COMPLETED, "")


async def test_s16_histories_the_router_forgot_are_dropped(rig: Rig) -> None:
    """Scenario 16: after a router restart the worker's session histories are orphans (the
    new router will never route their turns here): dropped at the welcome, and a drain
    then finishes at once instead of waiting its deadline for them."""
    await rig.start_router()
    worker = await rig.start_worker("w", drain_deadline_s=5.0)
    await rig.joined("w")
    producer = await rig.producer()
    for i in range(5):
        await producer.client.run(Credit(id=i, x_correlation_id=f"s{i}", num_turns=3))
    assert len(worker.agent.sessions) == 5
    await rig.crash_router()
    await rig.start_router()
    await rig.joined("w")
    assert len(worker.agent.sessions) == 0
    worker.agent.drain()
    reason = await asyncio.wait_for(worker.task, 2.0)
    assert reason.value == "drained"


async def test_s17_turn_zero_can_be_retried_after_its_worker_died(rig: Rig) -> None:
    """Scenario 17: turn 0 lost with its worker has no history anywhere: its retry runs as a
    new session, not ``rejected: session_lost``."""
    rig.hold = True
    await rig.start_router(lost_after_s=0.3)
    doomed = await rig.start_worker("doomed")
    await rig.joined("doomed")
    producer = await rig.producer()
    future = await producer.submit(Credit(id=1, x_correlation_id="s", num_turns=3))
    await until(lambda: doomed.executor.started == [1])
    rig.hold = False
    await rig.start_worker("alive")
    await rig.joined("alive")
    await rig.kill_worker("doomed")
    lost = await asyncio.wait_for(future, 5)
    assert lost.status is Status.LOST
    retry = await producer.client.run(Credit(id=2, x_correlation_id="s", num_turns=3))
    assert (retry.status, retry.worker) == (Status.COMPLETED, "alive")


async def test_s19_a_closed_connection_is_noticed_at_once(rig: Rig) -> None:
    """Scenario 19: a worker whose connection closes (process gone) is lost after the short
    closed-connection grace, far sooner than the silence timeout (here 5 s)."""
    rig.hold = True
    await rig.start_router(lost_after_s=5.0)
    doomed = await rig.start_worker("doomed")
    await rig.joined("doomed")
    producer = await rig.producer()
    future = await producer.submit(Credit(id=1, x_correlation_id="s"))
    await until(lambda: doomed.executor.started == [1])
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    await rig.kill_worker("doomed")
    outcome = await asyncio.wait_for(future, 10)
    took = loop.time() - killed_at
    assert outcome.status is Status.LOST
    assert took < 3.0, f"noticed after {took:.2f} s: the silence timeout, not the closed socket"


async def test_s20_router_owned_statuses_from_a_worker_are_refused(rig: Rig) -> None:
    """Scenario 20: a worker's completion with ``lost``/``rejected`` is refused and counted,
    not passed to the producer; FORK children that end normally count no unknown release."""
    await rig.start_router()
    raw = Scripted(rig.ctx, rig.worker_endpoint, b"odd/i1")
    raw.send(Hello(name="odd", incarnation="i1", protocol_version=PROTOCOL_VERSION, capacity=2))
    await raw.expect(decode_router_to_worker, Welcome)
    producer = await rig.producer()
    await producer.submit(Credit(id=1, x_correlation_id="s"))
    got = await raw.expect(decode_router_to_worker, Dispatch | DispatchBatch)
    assert got is not None
    raw.send(Completion(seq=1, producer=producer.client.key, credit_id=1, status=Status.REJECTED))
    report = await raw.expect(decode_router_to_worker, ErrorReport)
    assert report.code == "invalid_status"
    assert rig.router is not None
    assert rig.router.invalid_messages["invalid_status"] == 1
    from prometheus_client import generate_latest

    from router_service.metrics import make_registry

    scraped = generate_latest(make_registry(rig.router)).decode()
    assert 'credit_router_peer_events_total{event="router_owned_status"} 1.0' in scraped
    await _settle(0.1)
    assert 1 not in producer.outcomes  # not passed on as the credit's outcome
    raw.close()


async def test_s20_fork_children_end_without_an_unknown_release(rig: Rig) -> None:
    await rig.start_router()
    await rig.start_worker("w")
    await rig.joined("w")
    producer = await rig.producer()
    await producer.client.run(Credit(id=1, x_correlation_id="root", num_turns=2, fork_count=3))
    children = [
        Credit(
            id=10 + 2 * i + t,
            x_correlation_id=f"k{i}",
            num_turns=2,
            turn_index=t,
            parent_correlation_id="root",
            branch_mode=BranchMode.FORK,
        )
        for i in range(3)
        for t in range(2)
    ]
    for child in children:
        assert (await producer.client.run(child)).status is Status.COMPLETED
    await producer.client.run(Credit(id=2, x_correlation_id="root", num_turns=2, turn_index=1))
    await _settle(0.2)
    assert rig.router is not None
    stats = rig.router.core.stats
    assert stats.unknown_child_releases == 0
    assert rig.router.core.sessions.live == 0  # and nothing leaked
    assert not rig.ran_elsewhere()


async def test_links_that_hold_no_name_are_forgotten(rig: Rig) -> None:
    """A link per routing id would grow without bound (every restarted worker comes with a new
    one): links that hold no name are forgotten once quiet; the live holder's stays."""
    from protocol.messages import Heartbeat

    router = await rig.start_router()
    await rig.start_worker("w")
    await rig.joined("w")
    stray = Scripted(rig.ctx, rig.worker_endpoint, b"stray/1")
    stray.send(Heartbeat())  # never says hello
    await stray.expect(decode_router_to_worker, ErrorReport)
    assert b"stray/1" in router.workers
    holder = router._names["w"].identity
    router.on_tick(router.now() + router.producer_timeout_s + 1)
    assert b"stray/1" not in router.workers
    assert holder in router.workers
    stray.close()
