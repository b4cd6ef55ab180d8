"""WorkerAgent against a real ZeroMQ ROUTER on loopback that plays the router (PROTOCOL.md §5)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from protocol import PROTOCOL_VERSION
from protocol.messages import (
    Ack,
    BranchMode,
    Cancel,
    ChildRelease,
    Completion,
    CompletionBatch,
    Dispatch,
    DispatchBatch,
    Drain,
    Draining,
    EndSession,
    ErrorReport,
    FirstToken,
    Goodbye,
    Heartbeat,
    Hello,
    InFlightReport,
    Recovered,
    Refusal,
    Status,
)
from tests.worker_agent.conftest import (
    FakeRouter,
    GateExecutor,
    StartAgent,
    credit,
    payload,
    until,
)
from worker_agent.agent import AgentState, StopReason, WorkerAgent
from worker_agent.errors import RefusedError
from worker_agent.executor import SimExecutor, SimResult

pytestmark = [pytest.mark.integration, pytest.mark.timeout(15)]


def sim_result(done: Completion) -> SimResult:
    return msgspec.msgpack.decode(done.result, type=SimResult)


# -------------------------------------------------------------------------------------- joining


async def test_hello_carries_identity_and_welcome_joins(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    running = await start_agent(name="gpu-7", capacity=5, labels={"host": "h1"})
    hello = await router.welcome()
    assert hello.name == "gpu-7"
    # The routing id is NAME/INCARNATION (issue 9 scenario 6: two processes never share one).
    assert router.identity == f"gpu-7/{hello.incarnation}".encode()
    assert hello.protocol_version == PROTOCOL_VERSION
    assert hello.capacity == 5
    assert hello.labels == {"host": "h1", "executor": "sim"}
    assert hello.in_flight == {}
    int(hello.incarnation, 16)  # random hex
    await until(lambda: running.agent.state is AgentState.JOINED)
    assert running.agent.router_incarnation == "r-1"


async def test_only_hello_until_welcome_repeated_with_backoff(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    running = await start_agent()
    first = await router.expect(Hello)
    again = await router.expect(Hello, skip=())  # nothing but Hello while unanswered
    assert again.incarnation == first.incarnation == running.agent.incarnation
    assert running.agent.state is AgentState.JOINING


async def test_refusal_stops_the_agent_with_an_error(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    running = await start_agent()
    await router.expect(Hello)
    await router.send(Refusal(reason="protocol version mismatch", router_version=2, peer_version=1))
    with pytest.raises(RefusedError, match="protocol version mismatch") as info:
        await running.result()
    assert (info.value.router_version, info.value.peer_version) == (2, 1)
    assert running.agent.state is AgentState.STOPPED
    assert not any(isinstance(m, Goodbye) for m in await router.collect(0.1))


# ------------------------------------------------------------------------------------ credits


async def test_dispatch_batch_answered_by_one_completion_batch(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    await start_agent()
    await router.welcome()
    credits = [credit(i, payload=payload(100 + i, 7)) for i in (1, 2, 3)]
    await router.send(DispatchBatch(producer="bench-a", credits=credits))
    batch = await router.expect(CompletionBatch)
    assert [c.seq for c in batch.completions] == [1, 2, 3]
    assert [(c.producer, c.credit_id) for c in batch.completions] == [
        ("bench-a", 1),
        ("bench-a", 2),
        ("bench-a", 3),
    ]
    for done in batch.completions:
        assert done.status is Status.COMPLETED
        assert done.reason == ""
        assert done.session_ended  # single-turn sessions end with their turn
        result = sim_result(done)
        assert (result.input_tokens, result.output_tokens) == (100 + done.credit_id, 7)


async def test_credits_are_keyed_by_producer_and_id(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    await start_agent()
    await router.welcome()
    await router.send(Dispatch(producer="a", credit=credit(5)))
    one = await router.expect(Completion)
    await router.send(Dispatch(producer="b", credit=credit(5)))  # same id, other producer
    two = await router.expect(Completion)
    assert [(one.producer, one.seq), (two.producer, two.seq)] == [("a", 1), ("b", 2)]


async def test_failed_execution_reports_the_exception_class(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    await start_agent(executor=gate)
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1, payload=b"fail")))
    done = await router.expect(Completion)
    assert (done.status, done.reason, done.session_ended) == (Status.FAILED, "RuntimeError", True)


async def test_credits_beyond_capacity_wait_locally(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    running = await start_agent(executor=gate, capacity=1)
    await router.welcome()
    await router.send(DispatchBatch(producer="p", credits=[credit(1), credit(2), credit(3)]))
    await until(lambda: gate.started == [1])
    assert running.agent.in_flight() == {"p": [1, 2, 3]}
    assert running.agent.stats.queued_over_capacity == 2
    for credit_id in (1, 2, 3):
        await until(lambda: gate.started[-1] == credit_id)  # noqa: B023  (awaited right here)
        gate.release(credit_id)
        done = await router.expect(Completion)
        assert done.credit_id == credit_id


async def test_first_token_event_precedes_completion(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor(first_token_s=0.125)
    await start_agent(executor=gate)
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1)))
    first = await router.expect(FirstToken, skip=(Heartbeat, InFlightReport))
    assert (first.producer, first.credit_id, first.ttft_s) == ("p", 1, 0.125)
    gate.release(1)
    done = await router.expect(Completion, skip=(Heartbeat, InFlightReport))
    assert done.ttft_s == 0.125


async def test_first_token_events_can_be_disabled(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor(first_token_s=0.125)
    await start_agent(executor=gate, first_token_events=False)
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1)))
    await until(lambda: gate.started == [1])
    gate.release(1)
    done = await router.expect(Completion, skip=(Heartbeat, InFlightReport))
    assert done.ttft_s == 0.125  # the completion still carries it
    assert not any(isinstance(m, FirstToken) for m in router.received)


# ------------------------------------------------------------------------------- cancellation


async def test_cancel_answers_cancelled_and_ignores_unknown_ids(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    running = await start_agent(executor=gate)
    await router.welcome()
    await router.send(DispatchBatch(producer="p", credits=[credit(1, "s", num_turns=3), credit(2)]))
    await until(lambda: len(gate.started) == 2)
    await router.send(Cancel(producer="p", credit_ids=[1, 99]))
    await router.send(Cancel(producer="other", credit_ids=[2]))  # (other, 2) is not held
    done = await router.expect(Completion)
    assert (done.credit_id, done.status, done.reason) == (1, Status.CANCELLED, "cancelled")
    assert done.session_ended  # a cancelled turn drops its session
    assert "s" not in running.agent.sessions
    assert gate.cancelled == [1]
    assert running.agent.in_flight() == {"p": [2]}


async def test_cancel_after_s_aborts_as_client_disconnect(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    await start_agent(executor=gate)
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1, cancel_after_s=0.1)))
    done = await router.expect(Completion)
    assert (done.status, done.reason) == (Status.CANCELLED, "client_disconnect")
    assert done.duration_s is not None
    assert 0.09 <= done.duration_s < 1.0
    assert done.ttft_s == 0.001  # a token had come before the disconnect


# ----------------------------------------------------------------------------------- sessions


async def test_fork_child_copies_parent_history_spawn_child_starts_empty(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    running = await start_agent()
    sessions = running.agent.sessions
    await router.welcome()
    parent = credit(1, "P", num_turns=2, fork_count=1, payload=payload(100, 20))
    await router.send(Dispatch(producer="p", credit=parent))
    assert sim_result(await router.expect(Completion)).input_tokens == 100

    child = dict(num_turns=2, parent_correlation_id="P", root_correlation_id="P")
    fork = credit(2, "C", branch_mode=BranchMode.FORK, payload=payload(50, 10), **child)
    spawn = credit(3, "S", branch_mode=BranchMode.SPAWN, payload=payload(50, 10), **child)
    await router.send(DispatchBatch(producer="p", credits=[fork, spawn]))
    batch = await router.expect(CompletionBatch)
    forked, spawned = (sim_result(c) for c in batch.completions)
    assert forked.input_tokens == 100 + 20 + 50  # the parent's turn is in the child's prompt
    assert forked.cached_tokens > 0  # ... and in this worker's prefix cache
    assert spawned.input_tokens == 50
    assert spawned.cached_tokens == 0

    parent_history = sessions.get("P", "p").history  # type: ignore[union-attr]
    child_history = sessions.get("C", "p").history  # type: ignore[union-attr]
    assert len(parent_history) == 1  # a copy: the child's turn never reached the parent
    assert child_history[0] is parent_history[0]
    assert len(child_history) == 2
    assert len(sessions.get("S", "p").history) == 1  # type: ignore[union-attr]

    last = credit(4, "C", turn_index=1, branch_mode=BranchMode.FORK, **child)
    await router.send(Dispatch(producer="p", credit=last))
    done = await router.expect(Completion)
    # The completion is the child's release (acknowledged, resent): no ChildRelease follows it,
    # which the router would count as a second, unknown release (issue 9 scenario 20).
    assert done.session_ended
    assert sessions.get("C", "p") is None
    later = await router.collect(0.3)
    assert not [m for m in later if isinstance(m, ChildRelease)]


async def test_end_session_drops_the_history(router: FakeRouter, start_agent: StartAgent) -> None:
    running = await start_agent()
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1, "s", num_turns=5)))
    done = await router.expect(Completion)
    assert not done.session_ended
    assert running.agent.sessions.get("s", "p") is not None
    # Sessions belong to their producer: another producer's EndSession leaves this one alone.
    await router.send(EndSession(x_correlation_id="s", reason="not mine", producer="q"))
    await router.send(EndSession(x_correlation_id="s", reason="producer done", producer="p"))
    await until(lambda: running.agent.sessions.get("s", "p") is None)
    assert running.agent.sessions.stats.ended_by_router == 1


async def test_prefix_cache_makes_the_next_turn_faster(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    await start_agent()
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1, "s", num_turns=2)))
    first = sim_result(await router.expect(Completion))
    await router.send(Dispatch(producer="p", credit=credit(2, "s", turn_index=1, num_turns=2)))
    second = sim_result(await router.expect(Completion))
    size = second.input_tokens
    assert size == first.input_tokens + first.output_tokens + 256
    await router.send(Dispatch(producer="p", credit=credit(3, "cold", payload=payload(size, 1))))
    cold = sim_result(await router.expect(Completion))
    assert cold.input_tokens == size
    assert second.cached_tokens > 0
    assert cold.cached_tokens == 0
    assert second.ttft_s < cold.ttft_s


# ---------------------------------------------------------------------------------- reporting


async def test_inflight_report_lists_held_credits_by_producer(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    await start_agent(executor=gate)
    await router.welcome(heartbeat_s=1.0, report_s=0.1)
    await router.expect(InFlightReport)  # reports come even when empty
    await router.send(DispatchBatch(producer="a", credits=[credit(1), credit(2)]))
    await router.send(Dispatch(producer="b", credit=credit(1)))
    await until(lambda: len(gate.started) == 3)
    await router.expect(InFlightReport)  # may have left before the dispatches arrived
    report = await router.expect(InFlightReport)
    assert {p: sorted(ids) for p, ids in report.credits.items()} == {"a": [1, 2], "b": [1]}
    gate.release(1, 2)
    await router.expect(CompletionBatch)
    report = await router.expect(InFlightReport)
    assert report.credits == {}


async def test_heartbeat_sent_when_nothing_else_was(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    await start_agent()
    await router.welcome(heartbeat_s=0.1, report_s=5.0)
    beat = await router.expect(Heartbeat, skip=())
    assert beat.sent_at_s > 0


async def test_bad_frames_are_counted_and_dropped(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    running = await start_agent()
    await router.welcome()
    for junk in (
        b"\xc1",  # not msgpack
        msgspec.msgpack.encode(["nope", 1]),  # unknown tag
        msgspec.msgpack.encode(["credit", "p", [1]]),  # a credit missing its session
        msgspec.msgpack.encode(["ack", "one"]),  # wrong type
    ):
        await router.send(junk)
    await router.send(Dispatch(producer="p", credit=credit(1)))
    done = await router.expect(Completion)
    assert done.credit_id == 1
    assert running.agent.stats.bad_frames == {"malformed": 1, "unknown_tag": 1, "invalid": 2}
    assert running.agent.state is AgentState.JOINED


# ---------------------------------------------------------------------------- reconnecting


async def test_unacked_resent_in_order_after_rehello_to_same_router(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    running = await start_agent(executor=gate)
    hello = await router.welcome()
    await router.send(DispatchBatch(producer="p", credits=[credit(1), credit(2), credit(3)]))
    await until(lambda: len(gate.started) == 3)
    gate.release(1, 2)
    first = await router.expect(CompletionBatch)
    assert [c.seq for c in first.completions] == [1, 2]
    await router.send(Ack(seq=1))
    await router.send(ErrorReport(code="unknown_worker", message="who are you?"))
    again = await router.expect(Hello)
    assert again.incarnation == hello.incarnation
    assert again.in_flight == {"p": [3]}  # credits still held; 1 and 2 have completions
    assert running.agent.state is AgentState.REJOINING
    await router.send_welcome("r-1")
    resent = await router.expect(Completion)
    assert (resent.seq, resent.credit_id) == (2, 2)  # seq 1 was acked, seq 2 was not
    gate.release(3)
    later = await router.expect(Completion)
    assert (later.seq, later.credit_id) == (3, 3)


async def test_silent_router_triggers_rehello(router: FakeRouter, start_agent: StartAgent) -> None:
    gate = GateExecutor()
    running = await start_agent(executor=gate)
    await router.welcome(heartbeat_s=0.1, report_s=5.0)
    await router.send(Dispatch(producer="p", credit=credit(7)))
    await until(lambda: gate.started == [7])
    again = await router.expect(Hello, within_s=2.0)  # after 3 silent intervals
    assert again.in_flight == {"p": [7]}
    assert running.agent.stats.rehellos >= 1
    await router.send_welcome("r-1", heartbeat_s=1.0)
    await until(lambda: running.agent.state is AgentState.JOINED)


async def test_a_late_tick_does_not_judge_the_routers_silence(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    running = await start_agent()
    await router.welcome(heartbeat_s=0.5, report_s=5.0)
    await until(lambda: running.agent.state is AgentState.JOINED)
    agent = running.agent
    # No await between these calls: the clock is ours.
    later = asyncio.get_running_loop().time() + 2.0  # four silent intervals ...
    agent._on_tick(later)  # ... but our own tick is as late: frames may wait unread
    assert agent.state is AgentState.JOINED
    agent._on_tick(later + 0.1)  # an on-time tick judges the silence
    assert agent.state.value == "rejoining"  # (mypy narrowed the property above)
    assert (await router.expect(Hello)).incarnation == agent.incarnation


async def test_router_restart_sends_old_completions_as_recovered(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    running = await start_agent(executor=gate)
    await router.welcome("r-old")
    await router.send(DispatchBatch(producer="p", credits=[credit(1), credit(2)]))
    await until(lambda: len(gate.started) == 2)
    gate.release(1)
    await router.expect(Completion)  # seq 1, never acknowledged: the router died
    await router.send(ErrorReport(code="unknown_worker", message="new router"))
    hello = await router.expect(Hello)
    assert hello.in_flight == {"p": [2]}  # the only incarnation we know is the old one
    await router.send_welcome("r-new")
    recovered = await router.expect(Recovered)
    assert recovered.router_incarnation == "r-old"
    assert [(c.seq, c.credit_id) for c in recovered.completions] == [(1, 1)]
    await router.send(Dispatch(producer="p", credit=credit(3)))  # a credit of the new router
    gate.release(2, 3)
    messages = [await router.expect(Recovered | Completion) for _ in range(2)]  # type: ignore[arg-type]
    old = next(m for m in messages if isinstance(m, Recovered))
    new = next(m for m in messages if isinstance(m, Completion))
    assert (old.router_incarnation, old.completions[0].credit_id) == ("r-old", 2)
    assert new.credit_id == 3
    assert running.agent.stats.router_restarts == 1


# ------------------------------------------------------------------------------------ leaving


async def test_drain_message_leaves_when_idle(router: FakeRouter, start_agent: StartAgent) -> None:
    running = await start_agent()
    await router.welcome()
    await router.send(Drain(deadline_s=2.0))
    draining = await router.expect(Draining)
    assert draining.deadline_s == 2.0
    bye = await router.expect(Goodbye)
    assert bye.reason == "drained"
    assert await running.result() is StopReason.DRAINED


async def test_draining_serves_live_sessions_then_leaves(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    running = await start_agent()
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1, "s", num_turns=2)))
    await router.expect(Completion)
    running.agent.drain(5.0)
    await router.expect(Draining)
    await router.send(Dispatch(producer="p", credit=credit(2, "s", turn_index=1, num_turns=2)))
    done = await router.expect(Completion)
    assert (done.credit_id, done.status, done.session_ended) == (2, Status.COMPLETED, True)
    bye = await router.expect(Goodbye)
    assert bye.reason == "drained"
    assert await running.result() is StopReason.DRAINED


async def test_drain_deadline_cancels_the_rest_before_goodbye(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    running = await start_agent(executor=gate)
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1, "s", num_turns=3)))
    await until(lambda: gate.started == [1])
    running.agent.drain(0.2)
    await router.expect(Draining)
    done = await router.expect(Completion)
    assert (done.status, done.reason) == (Status.CANCELLED, "drain_deadline")
    bye = await router.expect(Goodbye)
    assert bye.reason == "drain_deadline"
    assert await running.result() is StopReason.DRAIN_DEADLINE


async def test_force_exit_cancels_everything(router: FakeRouter, start_agent: StartAgent) -> None:
    gate = GateExecutor()
    running = await start_agent(executor=gate)
    await router.welcome()
    await router.send(DispatchBatch(producer="p", credits=[credit(1), credit(2)]))
    await until(lambda: len(gate.started) == 2)
    running.agent.force_exit()
    batch = await router.expect(CompletionBatch)
    assert {(c.status, c.reason) for c in batch.completions} == {(Status.CANCELLED, "forced_exit")}
    assert (await router.expect(Goodbye)).reason == "forced"
    assert await running.result() is StopReason.FORCED


async def test_cancelling_serve_still_completes_every_credit_once(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    gate = GateExecutor()
    running = await start_agent(executor=gate)
    await router.welcome()
    await router.send(DispatchBatch(producer="p", credits=[credit(1), credit(2), credit(3)]))
    await until(lambda: len(gate.started) == 3)
    running.task.cancel()  # a supervisor cancels serve() itself
    batch = await router.expect(CompletionBatch)
    assert sorted(c.credit_id for c in batch.completions) == [1, 2, 3]
    assert {c.reason for c in batch.completions} == {"forced_exit"}
    assert (await router.expect(Goodbye)).reason == "forced"
    with pytest.raises(asyncio.CancelledError):
        await running.task
    assert running.agent.in_flight() == {}
    assert not any(isinstance(m, Completion) for m in await router.collect(0.1))


def test_names_and_labels_that_would_break_hello_are_refused() -> None:
    sim = SimExecutor()
    with pytest.raises(ValueError, match="worker name"):
        WorkerAgent(router="tcp://127.0.0.1:1", name="", executor=sim)
    labels = {f"k{i}": "v" for i in range(64)}  # 64 + "executor" > 64
    with pytest.raises(ValueError, match="labels"):
        WorkerAgent(router="tcp://127.0.0.1:1", name="w", executor=sim, labels=labels)
    with pytest.raises(ValueError, match="capacity"):
        WorkerAgent(router="tcp://127.0.0.1:1", name="w", executor=sim, capacity=0)


async def test_drain_with_the_router_away_and_nothing_owed_exits_at_once(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    # `systemctl stop` on an idle worker whose router is down: it holds no credit, no session
    # and no completion to deliver, so it must not wait out its 30 s drain deadline.
    running = await start_agent()
    await router.welcome(heartbeat_s=0.05)
    await until(lambda: running.agent.state is AgentState.REJOINING)
    running.agent.drain(30.0)
    assert await asyncio.wait_for(running.result(), 5) is StopReason.DRAINED


async def test_drain_with_the_router_away_waits_for_a_completion_it_owes(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    # An unacknowledged completion is the router's to receive: the agent waits for the router
    # to come back (here: until its drain deadline), it does not leave at once.
    running = await start_agent()
    await router.welcome(heartbeat_s=0.05)
    await router.send(Dispatch(producer="p", credit=credit(1)))
    await router.expect(Completion)  # never acknowledged
    await until(lambda: running.agent.state is AgentState.REJOINING)
    running.agent.drain(0.5)
    assert await asyncio.wait_for(running.result(), 5) is StopReason.DRAIN_DEADLINE
    assert len(running.agent.completions) == 1


def test_stats_snapshot_shows_histograms_as_count_and_sum() -> None:
    # (It is logged when the worker stops: no object reprs in that line.)
    stats = WorkerAgent(router="tcp://127.0.0.1:1", name="w", executor=SimExecutor()).stats
    stats.ttft_s.observe(0.5)
    snap = stats.snapshot()
    assert snap["ttft_s"] == {"count": 1, "sum": 0.5}
    assert "object at 0x" not in repr(snap)


async def test_a_burst_of_unknown_worker_reports_is_one_log_line(
    router: FakeRouter, start_agent: StartAgent, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_agent()
    await router.welcome()
    for _ in range(5):  # every frame in flight when the router forgot us is answered so
        await router.send(ErrorReport(code="unknown_worker", message="send Hello first"))
    await router.expect(Hello)
    await until(lambda: running.agent.state is AgentState.REJOINING)
    lines = [r for r in caplog.records if "does not know us" in r.getMessage()]
    assert len(lines) == 1


async def test_a_worker_never_welcomed_says_so_with_what_to_check(
    router: FakeRouter,
    start_agent: StartAgent,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker pointed at the wrong port used to say nothing at all after "worker starting".
    from worker_agent import agent as agent_module

    monkeypatch.setattr(agent_module, "UNANSWERED_WARN_S", 0.3)
    running = await start_agent()
    await until(
        lambda: any("no answer from the router" in r.getMessage() for r in caplog.records),
        within_s=5.0,
    )
    line = next(r.getMessage() for r in caplog.records if "no answer" in r.getMessage())
    assert router.endpoint in line
    assert "--router" in line
    assert running.agent.state is AgentState.JOINING


async def test_drain_before_any_welcome_exits_at_once(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    running = await start_agent()
    await router.expect(Hello)
    running.agent.drain()
    assert await running.result() is StopReason.DRAINED


async def test_sim_executor_with_latency_end_to_end(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    sim = SimExecutor(base_ttft_s=0.02, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    await start_agent(executor=sim)
    await router.welcome()
    await router.send(Dispatch(producer="p", credit=credit(1, payload=payload(64, 20))))
    first = await router.expect(FirstToken, skip=(Heartbeat, InFlightReport))
    done = await router.expect(Completion)
    assert first.ttft_s >= 0.015
    assert done.duration_s is not None
    assert done.duration_s >= first.ttft_s + 0.015


def test_the_simulators_ttft_is_not_rounded_to_uvloops_millisecond_clock() -> None:
    """The worker runs on uvloop, whose loop.time() ticks in whole milliseconds: a TTFT
    measured with it is a multiple of 1 ms, so sub-millisecond differences vanish from the
    worker's histograms. The simulator times with perf_counter, as the openai executor does."""
    import uvloop

    from worker_agent.core import SessionTable

    sim = SimExecutor(base_ttft_s=0.0025, prefill_s_per_token=0.0, decode_s_per_token=0.0)
    ttfts: list[float] = []

    async def three() -> None:
        table = SessionTable()
        for i in range(3):
            c = credit(i, payload=payload(8, 1))
            await sim.execute(c, table.begin(c), ttfts.append)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(three())
    assert len(ttfts) == 3
    assert all(t >= 0.002 for t in ttfts)
    assert any(abs(t * 1000 - round(t * 1000)) > 1e-6 for t in ttfts), ttfts
