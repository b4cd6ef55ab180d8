"""The replayer against a fake producer: tree order, fork_count, joins, failures, modes, stops."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from loadgen.replay import CreditRecord, Replayer, ReplayOptions
from loadgen.schedule import arrival_times
from loadgen.workload import Workload, load_workload
from protocol.inference import RequestResult, decode_request, encode_result
from protocol.messages import BranchMode, Credit, Outcome, Status
from tests.loadgen.workload.test_format import write

Script = Callable[[Credit], tuple[Status, float]]


class FakeProducer:
    """Answers each credit after a delay; sessions stick to a worker, FORK children to the
    parent's. ``script`` may pick the status and the delay per credit."""

    def __init__(self, script: Script | None = None, latency_s: float = 0.005) -> None:
        self.script = script
        self.latency_s = latency_s
        self.credits: list[Credit] = []
        self.submitted_at: dict[int, float] = {}
        self.answered_at: dict[int, float] = {}
        self.futures: dict[int, asyncio.Future[Outcome]] = {}
        self.cancelled: list[int] = []
        self.ended: list[str] = []
        self.home: dict[str, str] = {}
        self._workers = itertools.cycle(["w0", "w1", "w2"])

    def worker_for(self, credit: Credit) -> str:
        key = credit.x_correlation_id
        if key not in self.home:
            parent = credit.parent_correlation_id
            if credit.branch_mode is BranchMode.FORK and parent in self.home:
                self.home[key] = self.home[parent]
            else:
                self.home[key] = next(self._workers)
        return self.home[key]

    async def submit(self, credit: Credit) -> asyncio.Future[Outcome]:
        loop = asyncio.get_running_loop()
        self.credits.append(credit)
        self.submitted_at[credit.id] = loop.time()
        future: asyncio.Future[Outcome] = loop.create_future()
        self.futures[credit.id] = future
        status, delay = self.script(credit) if self.script else (Status.COMPLETED, self.latency_s)
        worker = self.worker_for(credit)
        request = decode_request(credit.payload)
        result = RequestResult(
            input_tokens=request.context_tokens + (request.input_tokens or 1),
            output_tokens=request.output_tokens or 1,
            ttft_s=0.001,
            e2e_s=delay,
            error="" if status is Status.COMPLETED else "server says no",
        )
        outcome = Outcome(
            credit_id=credit.id,
            status=status,
            reason="" if status is Status.COMPLETED else "http_503",
            worker=worker,
            submit_to_dispatch_s=0.0,
            result=encode_result(result),
        )
        if delay >= 0:
            loop.call_later(delay, self._answer, credit.id, outcome)
        return future

    def _answer(self, credit_id: int, outcome: Outcome) -> None:
        future = self.futures[credit_id]
        if not future.done():
            self.answered_at[credit_id] = asyncio.get_running_loop().time()
            future.set_result(outcome)

    def cancel(self, credit_ids: Iterable[int]) -> None:
        for cid in credit_ids:
            self.cancelled.append(cid)
            self._answer(cid, Outcome(credit_id=cid, status=Status.CANCELLED, reason="cancelled"))

    def end_session(self, session: str, reason: str = "") -> None:
        self.ended.append(session)

    def by_conversation(self, name: str) -> list[Credit]:
        return [c for c in self.credits if c.conversation_id == name]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


TREE: list[Any] = [
    {
        "id": "root",
        "turns": [
            {"input_tokens": 100, "output_tokens": 10, "forks": ["f1", "f2"]},
            {
                "input_tokens": 20,
                "delay_s": 0.05,
                "spawns": [{"children": ["sub"], "background": True}],
            },
            {"input_tokens": 20},
        ],
    },
    {"id": "f1", "turns": [{"input_tokens": 5}, {"input_tokens": 5}]},
    {"id": "f2", "turns": [{"input_tokens": 5}]},
    {"id": "sub", "subagent_type": "Explore", "turns": [{"input_tokens": 7}, {"input_tokens": 7}]},
]


def tree(tmp_path: Path, lines: list[Any] = TREE) -> Workload:
    return load_workload(write(tmp_path, *lines))


async def replay(
    workload: Workload, producer: FakeProducer, **options: Any
) -> tuple[Replayer, list[CreditRecord]]:
    records: list[CreditRecord] = []
    replayer = Replayer(workload, producer, ReplayOptions(**options), on_record=records.append)
    await asyncio.wait_for(replayer.run(), 10)
    return replayer, records


async def test_a_tree_runs_in_order_with_fork_count_joins_and_ids(tmp_path: Path) -> None:
    fake = FakeProducer()
    replayer, records = await replay(tree(tmp_path), fake)
    root = fake.by_conversation("root")
    f1, f2, sub = (fake.by_conversation(n) for n in ("f1", "f2", "sub"))
    assert [c.turn_index for c in root] == [0, 1, 2]
    assert [c.fork_count for c in root] == [2, 0, 0]
    assert all(c.num_turns == 3 for c in root)
    xid = root[0].x_correlation_id
    for child in (f1[0], f2[0]):
        assert child.branch_mode is BranchMode.FORK
        assert (child.parent_correlation_id, child.root_correlation_id) == (xid, xid)
        assert child.agent_depth == 1
        assert child.subagent_type is None
        assert fake.submitted_at[child.id] >= fake.answered_at[root[0].id]
        assert decode_request(child.payload).context_tokens == 110  # the parent's history
    # The forks are joined at turn 1 (the default: the next turn), after its think time.
    last_fork = max(fake.answered_at[c.id] for c in (*f1, *f2))
    assert fake.submitted_at[root[1].id] >= last_fork + 0.05
    assert decode_request(root[1].payload).context_tokens == 110
    assert sub[0].branch_mode is BranchMode.SPAWN
    assert sub[0].subagent_type == "Explore"
    assert decode_request(sub[0].payload).context_tokens == 0
    assert len(records) == len(fake.credits) == 3 + 2 + 1 + 2
    assert replayer.outcomes == {"completed": 8}
    assert (replayer.trees_started, replayer.trees_live) == (1, 0)
    by_id = {r.credit_id: r for r in records}
    assert by_id[f1[0].id].affinity is True  # FORK child on its parent's worker
    assert by_id[root[0].id].affinity is None  # no history yet
    assert by_id[root[2].id].affinity is True
    assert by_id[sub[0].id].affinity is None
    assert fake.ended == []  # every session ran to its end
    line = json.loads(msgspec.json.encode(by_id[f1[0].id]))  # a --records line
    assert line["branch_mode"] == "fork"
    assert line["parent"] == xid


async def test_a_failed_turn_ends_its_session_but_not_its_children(tmp_path: Path) -> None:
    def script(c: Credit) -> tuple[Status, float]:
        failed = c.conversation_id == "root" and c.turn_index == 1
        return (Status.FAILED if failed else Status.COMPLETED), 0.002

    fake = FakeProducer(script)
    replayer, records = await replay(tree(tmp_path), fake)
    assert [c.turn_index for c in fake.by_conversation("root")] == [0, 1]
    assert len(fake.by_conversation("f1")) == 2  # started by turn 0, unaffected
    assert fake.by_conversation("sub") == []  # turn 1 declared it, and failed
    assert fake.ended == [fake.credits[0].x_correlation_id]
    assert replayer.errors == 1
    assert [r.reason for r in records if r.status == "failed"] == ["http_503"]


async def test_an_explicit_join_waits_for_a_slow_child(tmp_path: Path) -> None:
    lines = [
        {
            "id": "p",
            "turns": [
                {"input_tokens": 1, "spawns": [{"children": ["slow"], "join_at": 2}]},
                {"input_tokens": 1},
                {"input_tokens": 1},
            ],
        },
        {"id": "slow", "turns": [{"input_tokens": 1}]},
    ]
    fake = FakeProducer(lambda c: (Status.COMPLETED, 0.1 if c.conversation_id == "slow" else 0.001))
    await replay(tree(tmp_path, lines), fake)
    p = fake.by_conversation("p")
    slow = fake.by_conversation("slow")[0]
    assert fake.submitted_at[p[1].id] < fake.answered_at[slow.id]  # turn 1 does not wait
    assert fake.submitted_at[p[2].id] >= fake.answered_at[slow.id]  # turn 2 does


async def test_concurrency_bounds_live_trees_and_sessions_bounds_the_count(tmp_path: Path) -> None:
    lines = [{"id": f"r{i}", "turns": [{"input_tokens": 1}, {"input_tokens": 1}]} for i in range(3)]
    fake = FakeProducer(latency_s=0.01)
    live, peak = set(), 0

    def on_record(record: CreditRecord) -> None:
        nonlocal peak
        if record.turn_index == 0:
            live.add(record.session)
        else:
            live.discard(record.session)
        peak = max(peak, len(live))

    replayer = Replayer(
        tree(tmp_path, lines), fake, ReplayOptions(concurrency=2, sessions=7), on_record=on_record
    )
    await asyncio.wait_for(replayer.run(), 10)
    assert replayer.trees_started == 7
    assert peak == 2
    assert [c.conversation_id for c in fake.credits if c.turn_index == 0] == [
        "r0",
        "r1",
        "r2",
        "r0",
        "r1",
        "r2",
        "r0",
    ]
    assert len({c.x_correlation_id for c in fake.credits}) == 7  # every instance is new


async def test_rate_and_timestamps_pace_the_roots(tmp_path: Path) -> None:
    lines = [{"id": f"r{i}", "start_s": i * 0.1, "turns": [{"input_tokens": 1}]} for i in range(4)]
    w = tree(tmp_path, lines)
    fake = FakeProducer(latency_s=0.001)
    await replay(w, fake, mode="rate", rate=20, arrival="constant", sessions=4)
    gaps = [b - a for a, b in itertools.pairwise(sorted(fake.submitted_at.values()))]
    assert all(0.045 <= g <= 0.15 for g in gaps)  # 50 ms apart (late wake-ups allowed)
    fake = FakeProducer(latency_s=0.001)
    await replay(w, fake, mode="timestamps", speedup=2)
    starts = sorted(fake.submitted_at.values())
    assert starts[-1] - starts[0] == pytest.approx(0.15, abs=0.06)  # 0.3 s of trace, 2x


async def test_a_duration_stops_issuing_then_cancels_what_is_left(tmp_path: Path) -> None:
    lines = [
        {
            "id": "r",
            "turns": [{"input_tokens": 1, "forks": [{"children": ["k"]}]}, {"input_tokens": 1}],
        },
        {"id": "k", "turns": [{"input_tokens": 1}]},
    ]
    # The root's first turn answers at 0.02 s, then everything else hangs.
    fake = FakeProducer(
        lambda c: (Status.COMPLETED, 0.02 if c.turn_index == 0 and c.conversation_id == "r" else -1)
    )
    replayer, records = await replay(
        tree(tmp_path, lines), fake, duration_s=0.2, grace_s=0.1, concurrency=1
    )
    assert fake.cancelled  # the hanging FORK child's credit
    assert {r.status for r in records} == {"completed", "cancelled"}
    assert replayer.unfinished == 0
    assert replayer.trees_started == 1
    assert set(fake.ended) == {c.x_correlation_id for c in fake.credits}


async def test_orchestrator_rounds_and_pre_spawns_send_no_requests_of_their_own(
    tmp_path: Path,
) -> None:
    lines = [
        {
            "session_id": "orch",
            "orchestrator": True,
            "spawns": ["w"],
            "rounds": 2,
            "think_time_ms": 20,
        },
        {"session_id": "w", "turns": [{"messages": user("work")}]},
        {"session_id": "main", "pre_session_spawns": ["bg"], "turns": [{"messages": user("go")}]},
        {"session_id": "bg", "turns": [{"messages": user("bg")}]},
    ]
    fake = FakeProducer(latency_s=0.01)
    await replay(tree(tmp_path, lines), fake)
    rounds = fake.by_conversation("w")
    assert len(rounds) == 2
    assert fake.submitted_at[rounds[1].id] >= fake.answered_at[rounds[0].id] + 0.02
    assert fake.by_conversation("orch") == []
    bg = fake.by_conversation("bg")[0]
    main = fake.by_conversation("main")[0]
    assert (bg.parent_correlation_id, bg.branch_mode, bg.agent_depth) == (None, None, 1)
    assert bg.root_correlation_id == main.x_correlation_id


# ---------------------------------------------------------------------- issue 11: honesty


class SlowSubmitProducer(FakeProducer):
    """Each submission blocks the event loop a little (encoding, a busy machine)."""

    def __init__(self, block_s: float) -> None:
        super().__init__(latency_s=0.0)
        self.block_s = block_s

    async def submit(self, credit: Credit) -> asyncio.Future[Outcome]:
        time.sleep(self.block_s)  # noqa: ASYNC251 - blocking on purpose: the schedule absorbs it
        return await super().submit(credit)


async def test_rate_holds_its_schedule_when_each_start_costs_time(tmp_path: Path) -> None:
    # Why 1: relative sleeps added each start's cost to the gap (100/s with 3 ms per start
    # gave ~77 trees in 1 s). Anchored, every tree intended before the stop is started, and
    # its intended time is n / rate exactly, whatever the lateness of its wake-up.
    w = tree(tmp_path, [{"id": "r", "turns": [{"input_tokens": 1}]}])
    fake = SlowSubmitProducer(block_s=0.003)
    replayer, records = await replay(
        w, fake, mode="rate", rate=100, arrival="constant", duration_s=1.0
    )
    assert replayer.trees_started == 100
    intended = sorted(r.intended_at_s for r in records if r.intended_at_s is not None)
    assert intended == pytest.approx([n / 100 for n in range(100)], abs=1e-9)
    assert all(r.submitted_at_s >= (r.intended_at_s or 0.0) for r in records)


def test_arrival_times_are_absolute_and_keep_their_mean() -> None:
    constant = list(itertools.islice(arrival_times(1_000, "constant"), 5_001))
    assert constant[5_000] == 5.0  # a product, not 5,000 additions of 0.001
    for arrival in ("poisson", "gamma"):
        times = list(itertools.islice(arrival_times(200, arrival, seed=3, burstiness=0.5), 20_001))
        assert times == sorted(times)
        assert times[-1] == pytest.approx(100.0, rel=0.05)  # 20,000 gaps of 5 ms on average
    gaps = list(
        itertools.pairwise(itertools.islice(arrival_times(1, "gamma", burstiness=0.25), 20_001))
    )
    cv = statistics.pstdev(b - a for a, b in gaps) / statistics.mean(b - a for a, b in gaps)
    assert cv == pytest.approx(2.0, rel=0.1)  # shape 0.25: cv = 1 / sqrt(shape), burstier
    with pytest.raises(ValueError, match="must be > 0"):
        next(arrival_times(0, "constant"))


THINK: list[Any] = [
    {
        "id": "s",
        "turns": [
            {"input_tokens": 1},
            {"input_tokens": 1, "delay_s": 0.4},
            {"input_tokens": 1, "offset_s": 2.0},
        ],
    }
]


@pytest.mark.parametrize(
    ("speedup", "think_scale", "think", "offset"),
    [(4.0, 1.0, 0.1, 0.5), (1.0, 0.5, 0.2, 2.0), (2.0, 0.5, 0.1, 1.0)],
)
async def test_speedup_scales_think_times_and_offsets_and_think_scale_only_think_times(
    tmp_path: Path, speedup: float, think_scale: float, think: float, offset: float
) -> None:
    # Why 3: --speedup divided timestamps but not delays; think times could not be scaled.
    fake = FakeProducer(latency_s=0.001)
    _, records = await replay(tree(tmp_path, THINK), fake, speedup=speedup, think_scale=think_scale)
    first, second, third = sorted(records, key=lambda r: r.turn_index)
    assert second.intended_at_s is not None
    assert first.done_at_s is not None
    # The think time counts from the previous turn's completion, scaled.
    assert second.intended_at_s - first.done_at_s == pytest.approx(think, abs=1e-6)
    # A trace offset counts from the session's first *intended* time, divided by speedup.
    assert third.intended_at_s == pytest.approx((first.intended_at_s or 0.0) + offset, abs=1e-6)


async def test_what_a_failure_prunes_is_counted(tmp_path: Path) -> None:
    # Why 4: children of failed turns and their joins were silently never sent.
    lines: list[Any] = [
        {
            "id": "p",
            "turns": [
                {"input_tokens": 1, "spawns": [{"children": ["early"], "join_at": 2}]},
                {"input_tokens": 1, "forks": ["f"]},
                {"input_tokens": 1},
            ],
        },
        {"id": "early", "turns": [{"input_tokens": 1}]},
        {"id": "f", "turns": [{"input_tokens": 1}, {"input_tokens": 1, "spawns": ["g"]}]},
        {"id": "g", "turns": [{"input_tokens": 1}]},
    ]

    def script(c: Credit) -> tuple[Status, float]:
        failed = c.conversation_id == "p" and c.turn_index == 1
        return (Status.FAILED if failed else Status.COMPLETED), 0.002

    fake = FakeProducer(script)
    replayer, records = await replay(tree(tmp_path, lines), fake)
    failure = replayer.not_sent["failure"]
    # p's turn 2 never went; f (with g below it) never started; p's join at 2 never happened.
    assert (failure.turns, failure.children, failure.joins) == (1, 2, 1)
    assert failure.credits == 1 + 2 + 1  # p's turn 2, f's two turns, g's one
    assert replayer.not_sent["stop"].credits == 0
    declared = tree(tmp_path, lines).credits_in_tree("p")
    assert len(records) + failure.credits == declared  # nothing unaccounted for


async def test_stop_cancellations_are_not_errors_and_what_the_stop_cut_is_counted(
    tmp_path: Path,
) -> None:
    # Why 4: --compare counted the run's own stop cancellations as errors.
    lines: list[Any] = [
        {"id": "r", "turns": [{"input_tokens": 1}, {"input_tokens": 1}, {"input_tokens": 1}]}
    ]
    fake = FakeProducer(lambda c: (Status.COMPLETED, 0.01 if c.turn_index == 0 else -1))
    replayer, records = await replay(
        tree(tmp_path, lines), fake, duration_s=0.1, grace_s=0.05, concurrency=1
    )
    stopped = [r for r in records if r.status == "cancelled"]
    assert stopped
    assert all(r.stopped for r in stopped)
    assert replayer.errors == 0
    assert replayer.not_sent["stop"].turns == 1  # turn 2 of the cancelled session
    assert replayer.not_sent["failure"].credits == 0


async def test_records_carry_what_analysis_needs(tmp_path: Path) -> None:
    # Why 6: intended time, wall clock, model, max_tokens, request id, error text; a failed
    # credit has no token counts.
    lines: list[Any] = [
        {"id": "ok", "turns": [{"input_tokens": 3, "output_tokens": 7, "model": "m-turn"}]},
        {"id": "bad", "turns": [{"input_tokens": 3}]},
    ]

    def script(c: Credit) -> tuple[Status, float]:
        return (Status.FAILED if c.conversation_id == "bad" else Status.COMPLETED), 0.002

    fake = FakeProducer(script)
    before = time.time()
    _, records = await replay(tree(tmp_path, lines), fake, model="m-run")
    by = {r.conversation: r for r in records}
    ok, bad = by["ok"], by["bad"]
    assert ok.intended_at_s is not None
    assert ok.intended_at_s <= ok.submitted_at_s
    assert before <= ok.submitted_unix_s <= time.time()
    assert (ok.model, ok.max_tokens) == ("m-turn", 7)
    assert (bad.model, bad.max_tokens) == ("m-run", None)
    assert ok.request_id == f"{ok.session}/0"
    assert ok.output_tokens == 7
    assert ok.e2e_from_intended_s is not None
    assert bad.error == "server says no"
    assert (bad.input_tokens, bad.output_tokens, bad.cached_tokens, bad.ttft_s) == (None,) * 4
    line = json.loads(msgspec.json.encode(bad))
    assert "output_tokens" not in line  # null, not a zero that averages in


async def test_a_run_bounded_by_count_ends_with_its_trees_not_at_its_duration(
    tmp_path: Path,
) -> None:
    w = tree(tmp_path, [{"id": "r", "turns": [{"input_tokens": 1}]}])
    fake = FakeProducer(latency_s=0.001)
    replayer = Replayer(w, fake, ReplayOptions(mode="rate", rate=50, sessions=3, duration_s=600))
    await asyncio.wait_for(replayer.run(), 5)  # not 600 s
    assert replayer.trees_started == 3


async def test_timestamps_are_anchored_and_a_second_pass_follows_the_first(tmp_path: Path) -> None:
    lines = [{"id": f"r{i}", "start_s": i * 0.1, "turns": [{"input_tokens": 1}]} for i in range(4)]
    fake = FakeProducer(latency_s=0.001)
    _, records = await replay(
        tree(tmp_path, lines), fake, mode="timestamps", speedup=10, sessions=8
    )
    intended = sorted(r.intended_at_s or 0.0 for r in records)
    assert intended == pytest.approx([n * 0.01 for n in range(8)], abs=1e-9)
