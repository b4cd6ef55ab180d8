"""Traces replayed: sub-agents as SPAWN children in time, and the prefix structure of a file
surviving into the prompts the OpenAI executor sends to a real (mock) server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadgen.mockserver import MockServer, MockSettings
from loadgen.replay import CreditRecord, Replayer, ReplayOptions
from loadgen.workload import load_workload
from protocol.messages import BranchMode, Credit, Outcome, Status
from tests.loadgen.test_replay import FakeProducer
from tests.loadgen.workload.test_format import write
from tests.loadgen.workload.test_traces import coding_trace
from worker_agent.core import SessionTable
from worker_agent.openai import OpenAIExecutor


def trace_file(tmp_path: Path, *traces: dict[str, object]) -> Path:
    folder = tmp_path / "traces"
    folder.mkdir()
    for trace in traces:
        (folder / f"{trace['id']}.json").write_text(json.dumps(trace))
    return folder


async def test_sub_agents_run_as_spawn_children_between_their_parents_requests(
    tmp_path: Path,
) -> None:
    """Why 7: the sub-agent starts after the request before its marker completed, carries its
    subagent_type and its parent's id, and the parent's next request waits for it."""
    w = load_workload(trace_file(tmp_path, coding_trace(scale=0.01)))
    producer = FakeProducer(latency_s=0.002)
    records: list[CreditRecord] = []
    await Replayer(w, producer, ReplayOptions(concurrency=1), on_record=records.append).run()
    root = producer.by_conversation("T")
    sub = producer.by_conversation("T::sa:agent_001")
    assert len(root) == 2
    assert len(sub) == 2
    assert {c.branch_mode for c in sub} == {BranchMode.SPAWN}
    assert {c.subagent_type for c in sub} == {"Explore"}
    assert {c.parent_correlation_id for c in sub} == {root[0].x_correlation_id}
    at, done = producer.submitted_at, producer.answered_at
    assert done[root[0].id] <= at[sub[0].id]
    assert done[sub[-1].id] <= at[root[1].id]  # joined before the parent's next request
    [tail] = producer.by_conversation("T#1")
    assert done[root[1].id] <= at[tail.id]
    recorded = {r.credit_id: r.recorded for r in records}
    rec = recorded[root[1].id]
    assert rec is not None
    assert rec.ttft_s == pytest.approx(0.002)


async def test_orchestrator_children_have_no_parent(tmp_path: Path) -> None:
    """Why 5: in AIPerf an orchestrator's children carry no parent correlation id."""
    path = write(
        tmp_path,
        {"session_id": "o", "orchestrator": True, "spawns": ["w"], "rounds": 2},
        {"session_id": "w", "turns": [{"messages": [{"role": "user", "content": "w"}]}]},
    )
    producer = FakeProducer(latency_s=0.001)
    await Replayer(load_workload(path), producer, ReplayOptions(concurrency=1)).run()
    credits = producer.by_conversation("w")
    assert len(credits) == 2
    assert [c.parent_correlation_id for c in credits] == [None, None]
    assert all(c.root_correlation_id for c in credits)


# ----------------------------------------------------------------------------- real prompts


class ServerProducer:
    """Runs each credit at once through a real ``OpenAIExecutor`` with a worker's session table
    (what a worker agent does with a dispatch), so the prompts are the executor's own."""

    def __init__(self, executor: OpenAIExecutor) -> None:
        self.executor = executor
        self.table = SessionTable()
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, credit: Credit) -> asyncio.Future[Outcome]:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            session = self.table.begin(credit)
            result = await self.executor.execute(credit, session, lambda _ttft: None)
            completed = result.status is Status.COMPLETED
            self.table.end(credit, session, completed=completed, turn=result.turn)
            outcome = Outcome(
                credit_id=credit.id, status=result.status, worker="w0", result=result.result
            )
            future.set_result(outcome)

        task = asyncio.get_running_loop().create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return future

    def cancel(self, credit_ids: object) -> None:
        """Nothing is cancelled in these short runs."""

    def end_session(self, session: str, reason: str = "") -> None:
        """The table frees a session at its final turn."""


@pytest.fixture
async def server() -> AsyncIterator[OpenAIExecutor]:
    mock = MockServer(
        MockSettings(
            base_ttft_s=0.001, prefill_s_per_token=0.0, decode_s_per_token=0.0, block_tokens=4
        )
    )
    await mock.start()
    executor = OpenAIExecutor([f"http://127.0.0.1:{mock.port}/v1"], request_timeout_s=5.0)
    try:
        yield executor
    finally:
        await executor.aclose()
        await mock.stop()


async def replay_cached(path: Path, executor: OpenAIExecutor, **kw: int) -> dict[str, list[int]]:
    """Replay one tree at a time; the server's cached prompt tokens per conversation."""
    records: list[CreditRecord] = []
    w = load_workload(path, **kw)
    await Replayer(w, ServerProducer(executor), ReplayOptions(concurrency=1), records.append).run()
    cached: dict[str, list[int]] = {}
    for r in sorted(records, key=lambda r: r.credit_id):
        assert r.status == "completed", r
        cached.setdefault(r.conversation, []).append(r.cached_tokens or 0)
    return cached


@pytest.mark.integration
async def test_shared_leading_hash_ids_give_a_shared_prompt_prefix(
    tmp_path: Path, server: OpenAIExecutor
) -> None:
    """The prefix structure of a file survives into the prompts: a prompt that shares its first
    two blocks (16 tokens each) with an earlier one finds them in the server's prefix cache;
    one with distinct ids finds nothing."""
    path = write(
        tmp_path,
        {"session_id": "a", "input_length": 40, "output_length": 2, "hash_ids": [1, 2, 3]},
        {"session_id": "b", "input_length": 40, "output_length": 2, "hash_ids": [1, 2, 9]},
        {"session_id": "c", "input_length": 40, "output_length": 2, "hash_ids": [7, 8, 9]},
    )
    cached = await replay_cached(path, server, block_tokens=16)
    assert cached["a"] == [0]
    # the role marker and two blocks of 16 words, cut to the mock's 4-token blocks
    assert cached["b"] == [32]
    assert cached["c"] == [0]


@pytest.mark.integration
async def test_a_coding_agent_trace_keeps_its_prefix_structure_on_the_server(
    tmp_path: Path, server: OpenAIExecutor
) -> None:
    """Why 7: a trace's next request finds its history cached; a second trace finds the
    shared tools and system prefix (two blocks) but not the first trace's own blocks."""
    folder = trace_file(tmp_path, coding_trace("A", scale=0.001), coding_trace("B", scale=0.001))
    cached = await replay_cached(folder, server)
    assert cached["A"][0] == 0
    assert cached["A"][1] >= 40 + 10  # the first prompt and its answer
    assert cached["B"][0] == 32  # tools and system: two 16-token blocks, no more
