"""The lone-turn fast path (``execute_lone_nowait``) reports exactly what the general path does.

The same frames go, over a real ZeroMQ ROUTER, to two agents on the same simulator: one whose
executor offers ``execute_lone_nowait`` (single-turn credits run without a ``_Held`` or a
``Session`` and are numbered per frame) and one whose executor hides it (every credit takes
``_start``/``_finish``). Their completions, in order and field by field, their counters and
histograms, their session tables and the simulator's token counts must be equal, whatever mix of
lone turns, multi-turn sessions, agent-tree children, failures and declined executions a frame
carries.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from protocol.messages import (
    Ack,
    BranchMode,
    Completion,
    CompletionBatch,
    Credit,
    DispatchBatch,
    EndSession,
    Status,
)
from tests.worker_agent.conftest import FakeRouter, credit, payload
from worker_agent.agent import WorkerAgent
from worker_agent.core import Session
from worker_agent.executor import ExecResult, FirstTokenCallback, SimExecutor

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

LATER = ExecResult(Status.COMPLETED, ttft_s=0.25, result=b"later")


class Sim(SimExecutor):
    """The zero-latency simulator, plus two payloads that exercise the fallbacks:
    ``b"raise"`` raises, ``b"later"`` cannot finish at once (it runs in a task)."""

    def __init__(self) -> None:
        super().__init__(zero_latency=True)
        self.lone_calls = 0

    def execute_lone_nowait(self, credit: Credit) -> ExecResult | None:
        self.lone_calls += 1
        if self._special(credit):
            return None
        return super().execute_lone_nowait(credit)

    def execute_nowait(self, credit: Credit, session: Session) -> ExecResult | None:
        if self._special(credit):
            return None
        return super().execute_nowait(credit, session)

    async def execute(
        self, credit: Credit, session: Session, on_first_token: FirstTokenCallback
    ) -> ExecResult:
        return LATER

    @staticmethod
    def _special(credit: Credit) -> bool:
        """Raises for ``b"raise"``; whether the credit is one that must wait (``b"later"``)."""
        if credit.payload == b"raise":
            raise ValueError("boom")
        return credit.payload == b"later"


class GeneralOnly:
    """The same simulator without ``execute_lone_nowait``: the general path only."""

    kind = "sim"

    def __init__(self) -> None:
        self.sim = Sim()

    def execute_nowait(self, credit: Credit, session: Session) -> ExecResult | None:
        if credit.payload == b"later":
            return None
        return self.sim.execute_nowait(credit, session)

    async def execute(
        self, credit: Credit, session: Session, on_first_token: FirstTokenCallback
    ) -> ExecResult:
        return LATER

    async def aclose(self) -> None:
        return None


def frames() -> list[Any]:
    """Dispatches mixing every kind of credit, then an ack and an ``EndSession``."""
    fork = BranchMode.FORK
    spawn = BranchMode.SPAWN
    return [
        DispatchBatch(
            producer="p",
            credits=[
                credit(1, payload=payload(100, 5)),
                credit(2),  # empty payload: the defaults
                credit(3, "multi", num_turns=3, fork_count=1, payload=payload(64, 64)),
                credit(4, "multi", payload=payload(10, 1)),  # lone shape, session held: general
                credit(5, payload=b"\xc1"),  # invalid payload: a FAILED result
                credit(6, payload=b"raise"),
                credit(7, cancel_after_s=0.0),  # client disconnect before it starts
                credit(8, "child", parent_correlation_id="multi", branch_mode=fork),
                credit(9, "sp", parent_correlation_id="multi", branch_mode=spawn),
                credit(10, payload=payload(100, 5)),  # same payload as credit 1: the memo
            ],
        ),
        DispatchBatch(producer="q", credits=[credit(1), credit(2, "multi", turn_index=1)]),
        Ack(seq=3),
        DispatchBatch(
            producer="p",
            credits=[
                credit(11, "multi", turn_index=1, num_turns=3, payload=payload(8, 8)),
                credit(12, payload=b"later"),
                credit(13, "orphan", turn_index=2, num_turns=3),  # a session never seen here
                credit(14, cancel_after_s=30.0, payload=payload(1, 1)),
            ],
        ),
        EndSession(producer="p", x_correlation_id="multi"),
        DispatchBatch(producer="p", credits=[credit(15, "multi", payload=payload(3, 3))]),
    ]


async def run(executor: Any) -> tuple[list[Completion], dict[str, Any]]:
    router = FakeRouter()
    agent = WorkerAgent(
        router=router.endpoint,
        name="w",
        executor=executor,
        capacity=64,
        first_token_events=False,
        rehello_initial_s=0.05,
        rehello_max_s=0.2,
        settle_timeout_s=0.2,
        incarnation="i",
    )
    task = asyncio.create_task(agent.serve())
    try:
        await router.welcome()
        done: list[Completion] = []
        expected = 0
        for msg in frames():
            await router.send(msg)
            if isinstance(msg, DispatchBatch):
                expected += len(msg.credits)
            while len(done) < expected:
                got = await router.recv()
                if isinstance(got, Completion):
                    done.append(measured(got))
                elif isinstance(got, CompletionBatch):
                    done += map(measured, got.completions)
        stats = agent.stats
        sim = executor if isinstance(executor, Sim) else executor.sim
        state = {
            "stats": {
                k: v
                for k, v in stats.snapshot().items()
                if k not in ("ttft_s", "duration_s")  # histograms: compared below
            },
            "ttft": (stats.ttft_s.counts, stats.ttft_s.sum),
            # (all zero but the task-run credit's, which is measured: compare where they fell)
            "duration": (stats.duration_s.counts[0], stats.duration_s.count),
            "sessions": sorted(s.x_correlation_id for s in agent.sessions),
            "session_stats": agent.sessions.stats.snapshot(),
            "unacked": [e.completion.seq for e in agent.completions.unacked()],
            "tokens": (sim.prompt_tokens_total, sim.cached_tokens_total, tokens_of(sim.tokens)),
            "in_flight": agent.in_flight(),
        }
        if isinstance(executor, Sim):
            assert executor.lone_calls > 0  # the fast path did run
        return done, state
    finally:
        agent.force_exit()
        await asyncio.wait_for(task, 5.0)
        router.close()


def measured(done: Completion) -> Completion:
    """The completion without the execution time the agent measured for a task (not 0)."""
    return done if done.result != b"later" else msgspec.structs.replace(done, duration_s=None)


def tokens_of(sim: Any) -> dict[str, int]:
    return {name: getattr(sim, name) for name in sim.__slots__}


async def test_lone_fast_path_reports_what_the_general_path_does() -> None:
    fast, fast_state = await run(Sim())
    general, general_state = await run(GeneralOnly())
    assert [c.seq for c in fast] == list(range(1, len(fast) + 1))
    assert fast == general
    assert fast_state == general_state
    by_id = {(c.producer, c.credit_id): c for c in fast}
    # The fallbacks inside a frame of lone turns kept their own outcomes and their order.
    assert (by_id["p", 5].status, by_id["p", 5].reason) == (Status.FAILED, "invalid_payload")
    assert (by_id["p", 6].status, by_id["p", 6].reason) == (Status.FAILED, "ValueError")
    assert (by_id["p", 7].status, by_id["p", 7].reason) == (Status.CANCELLED, "client_disconnect")
    assert by_id["p", 12].result == b"later"
    assert by_id["p", 1].session_ended
    assert not by_id["p", 3].session_ended
