"""Issue 9 at the pair tier, many interleavings: producers keep sessions going while the router
crashes or restarts gracefully and workers die and come back, in an order Hypothesis chooses.

After every example: each submitted credit has exactly one outcome (counted at the producer),
no credit is left without one, and no later turn ran without its history (invariant 8: a
non-first turn runs where its history is or ends with an explicit outcome).

``make test`` runs a few examples (``PAIR_EXAMPLES``, default 8); ``make fuzz`` runs
``PAIR_FUZZ_EXAMPLES`` (default 200; each example is a second of real sockets).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.messages import Credit, Status
from tests.pair.rig import Rig

pytestmark = pytest.mark.integration

EXAMPLES = int(
    os.environ.get("PAIR_FUZZ_EXAMPLES", "200")
    if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz-long"
    else os.environ.get("PAIR_EXAMPLES", "8")
)

OPS = st.sampled_from(["crash", "stop", "kill_worker", "pause", "pause", "burst"])


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


async def _session(rig: Rig, producer, sid: str, first_id: int, turns: int) -> None:  # type: ignore[no-untyped-def]
    """The turns of one session, each after the previous one's outcome (as a benchmark's
    producer sends them); a turn that did not complete ends the session."""
    for t in range(turns):
        credit = Credit(id=first_id + t, x_correlation_id=sid, num_turns=turns, turn_index=t)
        outcome = await (await producer.submit(credit))
        if outcome.status is not Status.COMPLETED:
            if t < turns - 1:
                producer.client.end_session(sid)
            return


async def _example(tmp: Path, ops: list[str], seed: int) -> None:
    rig = Rig(tmp, delay_s=0.02)
    try:
        await rig.start_router(lost_after_s=0.4)
        await rig.start_worker("w1", capacity=3)
        await rig.start_worker("w2", capacity=3)
        await rig.joined()
        producer = await rig.producer(recovery_grace_s=0.4)
        tasks: list[asyncio.Task[None]] = []
        next_id = 1
        incarnation = 0
        for i, op in enumerate(ops):
            if op == "burst" or i == 0:
                for k in range(3):
                    turns = 1 + (seed + i + k) % 3
                    sid = f"s{i}-{k}"
                    tasks.append(asyncio.create_task(_session(rig, producer, sid, next_id, turns)))
                    next_id += turns
            if op == "crash":
                await rig.crash_router()
                await asyncio.sleep(0.05 * ((seed + i) % 4))
                await rig.start_router(lost_after_s=0.4)
            elif op == "stop":
                await rig.stop_router()
                await rig.start_router(lost_after_s=0.4)
            elif op == "kill_worker":
                name = "w1" if (seed + i) % 2 else "w2"
                await rig.kill_worker(name)
                incarnation += 1
                await rig.start_worker(name, capacity=3, incarnation=f"i{incarnation}")
            elif op == "pause":
                await asyncio.sleep(0.05 + 0.05 * ((seed + i) % 3))
        async with asyncio.timeout(20):
            await asyncio.gather(*tasks)
        await asyncio.sleep(0.2)  # a second outcome, if one were coming, would arrive now
        submitted = set(producer.futures)
        counts = {cid: len(producer.outcomes.get(cid, [])) for cid in submitted}
        assert all(n == 1 for n in counts.values()), {c: n for c, n in counts.items() if n != 1}
        assert set(producer.outcomes) <= submitted
        assert producer.client.unmatched_outcomes == 0
        assert producer.client.outstanding == 0
        assert not rig.ran_elsewhere(), rig.ran_elsewhere()
    finally:
        await rig.close()


@given(ops=st.lists(OPS, min_size=2, max_size=6), seed=st.integers(0, 1000))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_credit_ends_once_whatever_the_interleaving(
    tmp_path_factory: pytest.TempPathFactory, runner: asyncio.Runner, ops: list[str], seed: int
) -> None:
    runner.run(_example(tmp_path_factory.mktemp("pair"), ops, seed))
