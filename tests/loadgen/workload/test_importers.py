"""Mooncake traces and AIPerf dag_jsonl files, read as workloads; the workload command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadgen.workload import WorkloadError, detect_format, load_workload
from loadgen.workload.__main__ import main as workload_main
from protocol.messages import BranchMode
from tests.loadgen.workload.test_format import write


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- Mooncake

TRACE = [
    {"timestamp": 1000, "input_length": 700, "output_length": 20, "hash_ids": [0, 1]},
    {
        "session_id": "s1",
        "timestamp": 1500,
        "input_length": 100,
        "output_length": 5,
        "hash_ids": [9],
    },
    {"session_id": "s1", "timestamp": 4500, "input_length": 80, "output_length": 5, "delay": 250},
    {"session_id": 7, "timestamp": 2000, "text_input": "hello", "output_length": 3},
]


def test_mooncake_rows_group_into_sessions_with_trace_timing(tmp_path: Path) -> None:
    path = write(tmp_path, *TRACE)
    assert detect_format(path) == "mooncake"
    w = load_workload(path)
    assert w.roots == ["row-1", "s1", "7"]
    assert w.block_tokens == 512
    single = w.sessions["row-1"]
    assert single.start_s == 0.0
    assert (single.turns[0].input_tokens, single.turns[0].hash_ids) == (700, [0, 1])
    s1 = w.sessions["s1"]
    assert s1.start_s == 0.5
    assert [t.output_tokens for t in s1.turns] == [5, 5]
    assert s1.turns[1].offset_s == 3.0  # 3 s after the session's first turn
    assert s1.turns[1].delay_s == 0.25
    assert w.sessions["7"].turns[0].messages == user("hello")
    assert load_workload(path, block_tokens=64).block_tokens == 64


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"input_length": "long"}, "input_length", "Expected `int"),
        ({"input_length": 1, "prompt": "x"}, "prompt", "unknown field"),
        ({"input_length": 1, "payload": {"model": "m"}}, "payload", "not supported"),
        ({"timestamp": 1, "output_length": 1}, None, "input_length, text_input or messages"),
    ],
)
def test_bad_mooncake_rows_name_line_and_field(
    tmp_path: Path, row: dict[str, Any], field: str | None, problem: str
) -> None:
    path = write(tmp_path, TRACE[0], row)
    with pytest.raises(WorkloadError) as info:
        load_workload(path, "mooncake")
    assert (info.value.line, info.value.field) == (2, field)
    assert problem in info.value.problem


# ----------------------------------------------------------------------------- AIPerf

DAG = [
    {
        "session_id": "root",
        "pre_session_spawns": ["helper"],
        "turns": [
            {
                "messages": user("r0"),
                "max_tokens": 16,
                "spawns": [{"children": ["kidA", "kidB"], "join_at": 2}],
            },
            {
                "messages": user("r1"),
                "delay": 500,
                "forks": [{"child": "side", "background": True}],
            },
            {
                "messages": user("r2"),
                "extra": {"temperature": 0},
                "spawns": ["late"],
                "forks": ["end"],
            },
        ],
    },
    {"session_id": "helper", "turns": [{"messages": user("h")}]},
    {"session_id": "kidA", "turns": [{"messages": user("a")}]},
    {"session_id": "kidB", "turns": [{"messages": user("b")}, {"messages": user("b2")}]},
    {"session_id": "side", "turns": [{"messages": user("s")}]},
    {"session_id": "late", "turns": [{"messages": user("l")}]},
    {
        "session_id": "end",
        "turns": [{"messages": user("e")}],
        "context_mode": "deltas_without_responses",
    },
]


def test_aiperf_dag_maps_forks_spawns_joins_and_pre_session_spawns(tmp_path: Path) -> None:
    path = write(tmp_path, *DAG)
    assert detect_format(path) == "aiperf"
    w = load_workload(path)
    assert w.roots == ["root"]
    root = w.sessions["root"]
    assert root.pre_spawns == ["helper"]
    assert root.turns[0].output_tokens == 16
    assert root.turns[1].delay_s == 0.5
    assert root.turns[2].extra == {"temperature": 0}
    [spawn0] = w.branches[("root", 0)]
    assert (spawn0.mode, spawn0.children, spawn0.join_at) == (BranchMode.SPAWN, ("kidA", "kidB"), 2)
    [side] = w.branches[("root", 1)]
    assert (side.mode, side.join_at) == (BranchMode.FORK, None)  # background: fork and go on
    assert {b.mode for b in w.branches[("root", 2)]} == {BranchMode.FORK, BranchMode.SPAWN}
    assert w.fork_count("root", 2) == 1
    assert w.credits_in_tree("root") == 3 + 1 + 1 + 2 + 1 + 1 + 1


def test_aiperf_orchestrator_rounds_become_request_less_gates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "session_id": "orch",
            "orchestrator": True,
            "spawns": ["w"],
            "rounds": 2,
            "think_time_ms": 200,
        },
        {"session_id": "w", "turns": [{"messages": user("work")}]},
    )
    w = load_workload(path)
    orch = w.sessions["orch"]
    assert orch.orchestrator
    assert len(orch.turns) == 3
    # AIPerf: think before rounds 1..N-1 (round 0's is a root's first-turn delay), none
    # before the terminal gate
    assert [t.delay_s for t in orch.turns] == [0.0, 0.2, 0.0]
    assert [b.join_at for t in range(2) for b in w.branches[("orch", t)]] == [1, 2]
    assert w.request_turns("orch") == 0
    assert w.credits_in_tree("orch") == 2


@pytest.mark.parametrize(
    ("conv", "field", "problem"),
    [
        (
            {"session_id": "x", "turns": [{"messages": user("a"), "temperature": 1}]},
            "turns[0].temperature",
            "unknown field",
        ),
        (
            {"session_id": "x", "turns": [{"messages": "hi"}]},
            "turns[0].messages",
            "Expected `array",
        ),
        (
            {
                "session_id": "x",
                "turns": [{"messages": user("a"), "forks": ["y"]}, {"messages": user("b")}],
            },
            "turns[0].forks[0]",
            "final turn",
        ),
        (
            {
                "session_id": "x",
                "context_mode": "message_array_with_responses",
                "turns": [{"messages": user("a")}, {"messages": user("b")}],
            },
            "turns[1].messages",
            "begin with the previous turn's messages",
        ),
        ({"session_id": "x", "orchestrator": True}, "spawns", "conversation-level spawns"),
        (
            {"session_id": "x", "turns": [{"messages": user("a")}], "rounds": 2},
            "rounds",
            "orchestrator",
        ),
    ],
)
def test_bad_aiperf_lines_name_line_and_field(
    tmp_path: Path, conv: dict[str, Any], field: str, problem: str
) -> None:
    path = write(
        tmp_path,
        {"session_id": "ok", "turns": [{"messages": user("fine")}]},
        conv,
        {"session_id": "y", "turns": [{"messages": user("y")}]},
    )
    with pytest.raises(WorkloadError) as info:
        load_workload(path, "aiperf")
    assert (info.value.line, info.value.field) == (2, field)
    assert problem in info.value.problem


# ----------------------------------------------------------------------------- command line


def test_workload_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gen.jsonl"
    assert workload_main(["generate", "--sessions", "4", "--seed", "3", "-o", str(out)]) == 0
    assert json.loads(capsys.readouterr().err)["roots"] == 4
    converted = tmp_path / "conv.jsonl"
    trace = write(tmp_path, *TRACE, name="trace.jsonl")
    assert workload_main(["convert", str(trace), "-o", str(converted)]) == 0
    capsys.readouterr()
    assert workload_main(["check", str(converted)]) == 0
    assert json.loads(capsys.readouterr().out)["sessions"] == 3
    assert load_workload(converted).block_tokens == 512
    bad = write(tmp_path, {"id": "s", "turns": [{"input_tokens": 1, "oops": 1}]}, name="bad.jsonl")
    assert workload_main(["check", str(bad)]) == 1
    assert "bad.jsonl:1: turns[0].oops: unknown field" in capsys.readouterr().err
