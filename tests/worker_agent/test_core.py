"""The worker's pure state: sessions, the completion log, framing, back-off, liveness."""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest

from protocol import messages
from protocol.messages import (
    MAX_IDS,
    BranchMode,
    Completion,
    CompletionBatch,
    Credit,
    Recovered,
    Status,
)
from worker_agent import core
from worker_agent.core import (
    Backoff,
    CompletionLog,
    Liveness,
    Logged,
    LogThrottle,
    SessionTable,
    Turn,
    bound_in_flight,
    completion_messages,
)

FORK = BranchMode.FORK
SPAWN = BranchMode.SPAWN


def turn_of(sid: str, index: int, num_turns: int, **fields: Any) -> Credit:
    return Credit(id=index, x_correlation_id=sid, turn_index=index, num_turns=num_turns, **fields)


def run_turn(table: SessionTable, credit: Credit, *, completed: bool = True) -> core.TurnEnd:
    session = table.begin(credit)
    return table.end(credit, session, completed=completed, turn=Turn(10, 5) if completed else None)


def test_core_is_pure() -> None:
    tree = ast.parse(Path(core.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "zmq", "time", "socket", "uvloop"}


def test_bounds_match_the_protocol() -> None:
    def max_length(annotated: Any) -> int | None:
        return next(m.max_length for m in get_args(annotated)[1:] if isinstance(m, msgspec.Meta))

    assert max_length(messages.Text) == core.MAX_TEXT
    assert max_length(messages.Blob) == core.MAX_BLOB
    assert max_length(messages.Id) == core.MAX_ID
    hints = msgspec.inspect.type_info(messages.Hello)
    assert isinstance(hints, msgspec.inspect.StructType)
    by_name = {f.name: f.type for f in hints.fields}
    assert getattr(by_name["labels"], "max_length", None) == core.MAX_LABELS
    assert getattr(by_name["in_flight"], "max_length", None) == core.MAX_IN_FLIGHT_PRODUCERS


# ------------------------------------------------------------------------------------ sessions


def test_turn_ids_are_unique() -> None:
    assert len({Turn(1, 1).uid for _ in range(100)}) == 100


def test_single_turn_session_never_enters_the_table() -> None:
    table = SessionTable()
    end = run_turn(table, Credit(id=1, x_correlation_id="s"))
    assert end.session_ended
    assert end.child_release is None
    assert len(table) == 0
    assert table.stats.started == 0


def test_multi_turn_session_keeps_history_until_its_final_turn() -> None:
    table = SessionTable()
    assert not run_turn(table, turn_of("s", 0, 3)).session_ended
    assert not run_turn(table, turn_of("s", 1, 3)).session_ended
    session = table.get("s")
    assert session is not None
    assert len(session.history) == 2
    assert session.history_tokens == 30
    assert run_turn(table, turn_of("s", 2, 3)).session_ended
    assert "s" not in table
    assert table.stats.snapshot()["ended"] == 1


def test_fork_child_copies_history_and_spawn_child_starts_empty() -> None:
    table = SessionTable()
    run_turn(table, turn_of("p", 0, 2, fork_count=2))
    parent = table.get("p")
    assert parent is not None
    assert parent.pending_forks == 2
    fork = table.begin(turn_of("c", 0, 2, parent_correlation_id="p", branch_mode=FORK))
    spawn = table.begin(turn_of("x", 0, 2, parent_correlation_id="p", branch_mode=SPAWN))
    assert fork.history == parent.history
    assert fork.history is not parent.history  # a copy
    assert spawn.history == []
    assert not fork.rebuilt
    assert parent.pending_forks == 1


def test_a_fork_template_outlives_its_final_turn_until_children_start() -> None:
    table = SessionTable()
    run_turn(table, turn_of("p", 0, 1, fork_count=2))  # final turn declares two children
    assert "p" in table  # kept: its children copy it
    child = {"parent_correlation_id": "p", "branch_mode": FORK}
    table.begin(turn_of("c1", 0, 2, **child))
    assert "p" in table
    c2 = table.begin(turn_of("c2", 0, 2, **child))
    assert "p" not in table  # the last declared child has started
    assert len(c2.history) == 1


def test_a_child_that_starts_before_its_declaring_turn_completes() -> None:
    table = SessionTable()
    declaring = turn_of("p", 0, 1, fork_count=1)
    parent = table.begin(declaring)
    table.begin(turn_of("c", 0, 2, parent_correlation_id="p", branch_mode=FORK))
    assert parent.pending_forks == -1  # a balance: the declaration arrives later
    table.end(declaring, parent, completed=True, turn=Turn(1, 1))
    assert "p" not in table


def test_fork_child_end_releases_it_once() -> None:
    table = SessionTable()
    run_turn(table, turn_of("p", 0, 2, fork_count=1))
    child = {"parent_correlation_id": "p", "branch_mode": FORK}
    assert run_turn(table, turn_of("c", 0, 2, **child)).child_release is None
    end = run_turn(table, turn_of("c", 1, 2, **child))
    assert end.session_ended
    assert end.child_release == "c"
    late = table.end(turn_of("c", 1, 2, **child), None, completed=False)
    assert late.child_release == "c"  # a second end of an unknown child: idempotent anyway


def test_failure_drops_the_session_and_releases_a_fork_child() -> None:
    table = SessionTable()
    run_turn(table, turn_of("p", 0, 3, fork_count=1))
    child = {"parent_correlation_id": "p", "branch_mode": FORK}
    run_turn(table, turn_of("c", 0, 3, **child))
    end = run_turn(table, turn_of("c", 1, 3, **child), completed=False)
    assert end.session_ended
    assert end.child_release == "c"
    assert "c" not in table
    end = run_turn(table, turn_of("p", 1, 3), completed=False)
    assert end.session_ended
    assert end.child_release is None  # a root releases nothing
    assert "p" not in table


def test_cancelled_before_start_drops_and_releases() -> None:
    table = SessionTable()
    run_turn(table, turn_of("s", 0, 3))
    end = table.end(turn_of("s", 1, 3), None, completed=False)
    assert end.session_ended
    assert "s" not in table
    fork = turn_of("c", 0, 2, parent_correlation_id="p", branch_mode=FORK)
    assert table.end(fork, None, completed=False).child_release == "c"


def test_end_session_drops_and_owes_no_release() -> None:
    table = SessionTable()
    run_turn(table, turn_of("p", 0, 2, fork_count=1))
    credit = turn_of("c", 0, 3, parent_correlation_id="p", branch_mode=FORK)
    session = table.begin(credit)
    assert table.end_session("c")
    assert not table.end_session("c")
    end = table.end(credit, session, completed=True, turn=Turn(1, 1))  # its running turn ends
    assert end.session_ended
    assert end.child_release is None
    assert table.stats.ended_by_router == 1


def test_missing_history_is_marked_rebuilt_and_counted() -> None:
    table = SessionTable()
    later = table.begin(turn_of("s", 3, 5))
    orphan = table.begin(turn_of("c", 0, 2, parent_correlation_id="gone", branch_mode=FORK))
    assert later.rebuilt
    assert orphan.rebuilt
    assert orphan.history == []
    assert table.stats.rebuilt == 1
    assert table.stats.fork_parent_missing == 1


def test_lru_cap_evicts_the_least_recently_used() -> None:
    table = SessionTable(max_sessions=2)
    run_turn(table, turn_of("a", 0, 3))
    run_turn(table, turn_of("b", 0, 3))
    run_turn(table, turn_of("a", 1, 3))  # refreshes a
    run_turn(table, turn_of("c", 0, 3))
    assert [s.x_correlation_id for s in table] == ["a", "c"]
    assert table.stats.evicted == 1
    assert table.clear() == 2
    assert len(table) == 0
    with pytest.raises(ValueError, match="max_sessions"):
        SessionTable(0)


# --------------------------------------------------------------------------------- completions


def record(log: CompletionLog, credit_id: int, incarnation: str = "r1", **kw: Any) -> Logged:
    return log.record(
        producer="p",
        credit_id=credit_id,
        status=Status.COMPLETED,
        router_incarnation=incarnation,
        **kw,
    )


def test_sequence_numbers_start_at_one_and_acks_are_cumulative() -> None:
    log = CompletionLog()
    entries = [record(log, i) for i in range(1, 6)]
    assert [e.completion.seq for e in entries] == [1, 2, 3, 4, 5]
    assert log.next_seq == 6
    assert log.ack(2) == 2
    assert [e.completion.seq for e in log.unacked()] == [3, 4, 5]
    assert log.ack(1) == 0  # an old ack changes nothing
    assert log.acked_seq == 2
    assert log.ack(99) == 3
    assert len(log) == 0


def test_one_completion_goes_alone_several_in_a_batch() -> None:
    log = CompletionLog()
    one = completion_messages([record(log, 1)], "r1")
    assert len(one) == 1
    assert isinstance(one[0], Completion)
    batch = completion_messages([record(log, 2), record(log, 3)], "r1")
    assert len(batch) == 1
    assert isinstance(batch[0], CompletionBatch)
    assert [c.seq for c in batch[0].completions] == [2, 3]


def test_old_incarnations_go_in_recovered_and_frames_stay_in_seq_order() -> None:
    log = CompletionLog()
    entries = [
        record(log, 1, "old"),
        record(log, 2, "old"),
        record(log, 3, "new", child_release="c3"),
        record(log, 4, "old", child_release="c4"),
    ]
    frames = completion_messages(entries, "new")
    # No ChildRelease: the completion's session_ended is the release (issue 9 scenario 20).
    assert [type(f) for f in frames] == [Recovered, Completion, Recovered]
    first, middle, last = frames
    assert isinstance(first, Recovered)
    assert first.router_incarnation == "old"
    assert [c.seq for c in first.completions] == [1, 2]
    assert isinstance(middle, Completion)
    assert middle.seq == 3
    assert isinstance(last, Recovered)
    assert [c.seq for c in last.completions] == [4]


def test_long_runs_are_chunked() -> None:
    log = CompletionLog()
    frames = completion_messages([record(log, i) for i in range(5)], "r1", max_batch=2)
    sizes = [len(f.completions) if isinstance(f, CompletionBatch) else 1 for f in frames]
    assert sizes == [2, 2, 1]


def test_in_flight_maps_are_bounded() -> None:
    small = {"a": [1, 2]}
    assert bound_in_flight(small) == (small, 0)
    big = {f"p{i}": [1, 2, 3] for i in range(5)}
    kept, left_out = bound_in_flight(big, max_producers=3, max_ids=2)
    assert list(kept) == ["p0", "p1", "p2"]
    assert all(ids == [1, 2] for ids in kept.values())
    assert left_out == 2 * 3 + 3 * 1
    assert bound_in_flight({"a": list(range(MAX_IDS + 1))})[1] == 1


# ---------------------------------------------------------------------- timing and throttling


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(1.0, 10.0, jitter=0.0)
    assert [backoff.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    backoff.reset()
    assert backoff.next() == 1.0


def test_backoff_jitter_stays_within_its_band() -> None:
    backoff = Backoff(1.0, 1.0, jitter=0.2, rng=random.Random(7))
    delays = [backoff.next() for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays)
    assert len(set(delays)) > 100
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(0.0, 1.0)


def test_liveness_by_deadlines_any_frame_counts() -> None:
    live = Liveness(silence_beats=3)
    live.restart(1.0, now=100.0)
    assert not live.heartbeat_due(100.5)
    assert live.heartbeat_due(101.0)
    live.sent(101.0)
    assert not live.heartbeat_due(101.5)
    assert not live.router_gone(103.0)
    assert live.router_gone(103.1)
    live.received(103.05)
    assert not live.router_gone(105.0)
    assert live.silent_for(105.0) == pytest.approx(1.95)


def test_log_throttle_counts_what_it_suppresses() -> None:
    throttle = LogThrottle(interval_s=5.0)
    assert throttle.ready("k", 0.0) == 0
    assert throttle.ready("k", 1.0) is None
    assert throttle.ready("k", 2.0) is None
    assert throttle.ready("other", 2.0) == 0
    assert throttle.ready("k", 5.0) == 2
