"""The readers of the field's trace formats, on small files written here in each format.

Mooncake as AIPerf reads it (history/delta messages, context modes), AIPerf dag_jsonl in full
(rounds lists, message arrays, think-time placement, what AIPerf rejects), coding-agent traces
with their sub-agents, Bailian traces, AIPerf single_turn/multi_turn/random_pool; hash_ids
checked against lengths and block size; detection; convert and check for every format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadgen.workload import WorkloadError, detect_format, dump_workload, load_workload
from loadgen.workload.__main__ import main as workload_main
from protocol.messages import BranchMode
from tests.loadgen.workload.test_format import write


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------- 1, 2: Mooncake


def test_mooncake_messages_rows_are_the_whole_conversation_so_far(tmp_path: Path) -> None:
    """Why 1: the second row holds [user, assistant, user]; the turn adds only the new user
    message (the live answer stands in for the recorded one), so the request has three."""
    path = write(
        tmp_path,
        {"session_id": "c", "messages": [user("hi")], "output_length": 5},
        {"session_id": "c", "messages": [user("hi"), assistant("hello"), user("more")]},
    )
    w = load_workload(path)
    turns = w.sessions["c"].turns
    assert turns[0].messages == [user("hi")]
    assert turns[1].messages == [user("more")]
    assert len(w.sessions) == 1


def test_mooncake_delta_rows_carry_only_the_new_messages(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"session_id": "c", "message_mode": "delta", "messages": [user("hi")]},
        {"session_id": "c", "message_mode": "delta", "messages": [user("more")]},
    )
    assert [t.messages for t in load_workload(path).sessions["c"].turns] == [
        [user("hi")],
        [user("more")],
    ]


def test_mooncake_history_that_does_not_extend_starts_a_new_part(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"session_id": "c", "messages": [user("a")], "timestamp": 0},
        {"session_id": "c", "messages": [user("summary"), user("b")], "timestamp": 900},
    )
    w = load_workload(path)
    assert w.roots == ["c"]
    assert w.sessions["c#1"].turns[0].messages == [user("summary"), user("b")]
    [plan] = w.branches[("c", 0)]
    assert (plan.mode, plan.children, plan.join_at) == (BranchMode.SPAWN, ("c#1",), None)


def test_mooncake_accepts_aiperf_keys(tmp_path: Path) -> None:
    """Why 2: ``type``, ``message_mode`` and per-row ``context_mode`` are AIPerf-valid."""
    path = write(
        tmp_path,
        {"type": "mooncake_trace", "input_length": 20, "hash_ids": [1, 2], "output_length": 4},
        {
            "type": "mooncake_trace",
            "session_id": "s",
            "context_mode": "message_array_with_responses",
            "input_length": 20,
            "output_length": 4,
            "hash_ids": [1, 2],
        },
        {
            "type": "mooncake_trace",
            "session_id": "s",
            "context_mode": "message_array_with_responses",
            "input_length": 40,
            "output_length": 4,
            "hash_ids": [1, 2, 3],
        },
        {"session_id": "m", "message_mode": "history", "messages": [user("x")]},
    )
    w = load_workload(path, block_tokens=16)
    # whole prompts: the second row adds 40 - 20 - 4 = 16 tokens, the last block's
    assert [(t.input_tokens, t.hash_ids) for t in w.sessions["s"].turns] == [
        (20, [1, 2]),
        (16, [3]),
    ]


@pytest.mark.parametrize(
    ("rows", "field", "problem"),
    [
        (
            [
                {"session_id": "s", "context_mode": "deltas_without_responses", "input_length": 1},
                {"session_id": "s", "input_length": 1},
            ],
            "context_mode",
            "same on every row",
        ),
        ([{"text_input": "a", "input_length": 3}], "text_input", "mutually exclusive"),
        ([{"text_input": "a", "hash_ids": [1]}], "hash_ids", "only allowed with input_length"),
        ([{"input_length": 3, "message_mode": "delta"}], "message_mode", "only valid with"),
        ([{"input_length": 3, "context_mode": "everything"}], "context_mode", "Invalid enum"),
    ],
)
def test_mooncake_rows_aiperf_rejects_are_errors(
    tmp_path: Path, rows: list[dict[str, Any]], field: str, problem: str
) -> None:
    path = write(tmp_path, *rows)
    with pytest.raises(WorkloadError) as info:
        load_workload(path, "mooncake")
    assert info.value.field == field
    assert problem in info.value.problem


# ----------------------------------------------------------------------------- 3, 4, 5: dag


def test_dag_rounds_as_a_list_of_per_round_objects(tmp_path: Path) -> None:
    """Why 3: each round its own spawns and think time."""
    path = write(
        tmp_path,
        {
            "session_id": "o",
            "orchestrator": True,
            "rounds": [{"spawns": ["a"]}, {"spawns": ["b", "c"], "think_time_ms": 300}],
            "think_time_ms": 100,
        },
        *({"session_id": s, "turns": [{"messages": [user(s)]}]} for s in "abc"),
    )
    w = load_workload(path)
    orch = w.sessions["o"]
    assert [t.delay_s for t in orch.turns] == [0.0, 0.3, 0.0]
    assert [(b.children, b.join_at) for b in w.branches[("o", 0)]] == [(("a",), 1)]
    assert [(b.children, b.join_at) for b in w.branches[("o", 1)]] == [(("b", "c"), 2)]


def test_dag_message_arrays_become_what_each_turn_adds(tmp_path: Path) -> None:
    """Why 3: ``context_mode: message_array_with_responses`` is accepted."""
    system = {"role": "system", "content": "be brief"}
    path = write(
        tmp_path,
        {
            "session_id": "x",
            "context_mode": "message_array_with_responses",
            "turns": [
                {"messages": [system, user("a")]},
                {"messages": [system, user("a"), assistant("A"), user("b")]},
            ],
        },
    )
    turns = load_workload(path).sessions["x"].turns
    assert [t.messages for t in turns] == [[system, user("a")], [user("b")]]


def test_dag_think_time_waits_before_rounds_not_on_the_gate(tmp_path: Path) -> None:
    """Why 4: a one-round tree with 3 s of think time waits for none of it."""
    path = write(
        tmp_path,
        {
            "session_id": "o",
            "orchestrator": True,
            "spawns": ["w"],
            "rounds": 1,
            "think_time_ms": 3000,
        },
        {"session_id": "w", "turns": [{"messages": [user("w")]}]},
    )
    orch = load_workload(path).sessions["o"]
    assert sum(t.delay_s for t in orch.turns) == 0.0


@pytest.mark.parametrize(
    ("lines", "line", "field", "problem"),
    [
        (  # a system message on a FORK child's first turn: chat templates drop it
            [
                {"session_id": "p", "turns": [{"messages": [user("p")], "forks": ["f"]}]},
                {
                    "session_id": "f",
                    "turns": [{"messages": [{"role": "system", "content": "s"}, user("f")]}],
                },
            ],
            2,
            "turns[0].messages[0]",
            "system message",
        ),
        (  # an object-form foreground fork on a non-final turn ends its parent
            [
                {
                    "session_id": "p",
                    "turns": [
                        {"messages": [user("p")], "forks": [{"child": "f"}]},
                        {"messages": [user("q")]},
                    ],
                },
                {"session_id": "f", "turns": [{"messages": [user("f")]}]},
            ],
            1,
            "turns[0].forks[0]",
            "final turn",
        ),
        (  # Why 8: errors name session_id, not our internal id
            [
                {"session_id": "p", "turns": [{"messages": [user("p")]}]},
                {"session_id": "p", "turns": [{"messages": [user("p")]}]},
            ],
            2,
            "session_id",
            "duplicate session_id 'p'",
        ),
        (
            [
                {
                    "session_id": "p",
                    "pre_session_spawns": ["nobody"],
                    "turns": [{"messages": [user("p")]}],
                }
            ],
            1,
            "pre_session_spawns[0]",
            "no session with session_id 'nobody'",
        ),
    ],
)
def test_dag_files_aiperf_rejects_are_errors(
    tmp_path: Path, lines: list[dict[str, Any]], line: int, field: str, problem: str
) -> None:
    """Why 5 and 8."""
    path = write(tmp_path, *lines)
    with pytest.raises(WorkloadError) as info:
        load_workload(path, "aiperf")
    assert (info.value.line, info.value.field) == (line, field)
    assert problem in info.value.problem


# ----------------------------------------------------------------------------- 6: hash_ids


@pytest.mark.parametrize(
    ("turn", "error", "words"),
    [
        ({"input_tokens": 1024, "hash_ids": [1, 2, 3]}, True, "need more than 1024"),
        ({"input_tokens": 20, "hash_ids": [1, 2]}, True, "need more than 512"),
        # our format's documented prefix-only prompt (fresh text after the blocks)
        ({"input_tokens": 2000, "hash_ids": [1, 2]}, None, ""),
        ({"input_tokens": 1000, "hash_ids": [1, 2]}, None, ""),
    ],
)
def test_hash_ids_are_checked_against_length_and_block_size(
    tmp_path: Path, turn: dict[str, Any], error: bool | None, words: str
) -> None:
    """Why 6: too many ids for the length is an error (as in AIPerf), too few a warning; both
    name the file, the line and the field."""
    path = write(
        tmp_path, {"id": "ok", "turns": [{"input_tokens": 5}]}, {"id": "s", "turns": [turn]}
    )
    if error:
        with pytest.raises(WorkloadError) as info:
            load_workload(path)
        assert (info.value.line, info.value.field) == (2, "turns[0].hash_ids")
        assert words in info.value.problem
        return
    w = load_workload(path)
    if error is None:
        assert w.warnings == []
    else:
        [warning] = w.warnings
        assert warning.startswith(f"{path}:2: turns[0].hash_ids: ")
        assert words in warning


def test_a_wrong_block_size_is_named_not_silent(tmp_path: Path) -> None:
    """Why 6: a Mooncake trace of 16-token blocks replayed with 512 fails, naming the line;
    one of 512-token blocks replayed with 16 warns (its ids cover a prefix only)."""
    path = write(
        tmp_path,
        {"input_length": 40, "output_length": 2, "hash_ids": [1, 2, 3]},
        {"input_length": 48, "output_length": 2, "hash_ids": [1, 2, 3]},
    )
    assert load_workload(path, block_tokens=16).warnings == []
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    assert (info.value.line, info.value.field) == (1, "hash_ids")
    assert "--block-tokens" in info.value.problem
    w = load_workload(path, block_tokens=8)
    assert w.warnings == [
        f"{path}:{n}: hash_ids: 3 hash_ids of 8 tokens cover 24 of the prompt's {tokens} tokens;"
        " the rest is not shared (wrong block size? give --block-tokens)"
        for n, tokens in ((1, 40), (2, 48))
    ]


def test_check_prints_the_prefix_structure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        {"input_length": 40, "output_length": 2, "hash_ids": [1, 2, 3]},
        {"input_length": 40, "output_length": 2, "hash_ids": [1, 2, 9]},
        {"input_length": 40, "output_length": 2, "hash_ids": [7, 2, 3]},
        {"input_length": 20, "output_length": 2, "hash_ids": [1, 2]},
    )
    assert workload_main(["check", str(path), "--block-tokens", "16"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"].startswith("mooncake")
    # 11 block references, 5 distinct ids; the 2nd and 4th prompts begin with [1, 2] (4 blocks
    # an unbounded prefix cache serves), the 3rd shares blocks 2 and 3 but not their prefix
    assert doc["prefix"] == {
        "requests": 4,
        "blocks": 11,
        "distinct_blocks": 5,
        "shared_prefix_blocks": 4,
        "shared_prefix_ratio": round(4 / 11, 4),
    }


# ----------------------------------------------------------------------------- 7: coding agent


def coding_trace(trace_id: str = "T", scale: float = 1.0) -> dict[str, Any]:
    """A kv-cache-tester trace written for these tests: 16-token blocks, a 32-token tools and
    system prefix (two blocks), an Explore sub-agent between the first two requests, and a
    compacted context at the end. Times in seconds, times ``scale``."""

    def s(x: float) -> float:
        return round(x * scale, 6)

    return {
        "id": trace_id,
        "models": ["claude-x"],
        "block_size": 16,
        "hash_id_scope": "local",
        "tool_tokens": 20,
        "system_tokens": 12,
        "requests": [
            {
                "type": "n",
                "t": 0,
                "model": "claude-x",
                "in": 40,
                "out": 10,
                "hash_ids": [1, 2, 3],
                "api_time": s(1.0),
                "stop": "tool_use",
            },
            {
                "type": "subagent",
                "t": s(1.2),
                "agent_id": "agent_001",
                "subagent_type": "Explore",
                "status": "completed",
                "duration_ms": s(2000),
                "total_tokens": 96,
                "tool_use_count": 1,
                "models": ["claude-x"],
                "tool_tokens": 20,
                "system_tokens": 12,
                "requests": [
                    {
                        "type": "s",
                        "t": s(1.3),
                        "model": "claude-x",
                        "in": 36,
                        "out": 5,
                        "hash_ids": [1, 2, 50],
                        "api_time": s(0.5),
                        "ttft": s(0.1),
                    },
                    {
                        "type": "n",
                        "t": s(2.0),
                        "model": "claude-x",
                        "in": 50,
                        "out": 5,
                        "hash_ids": [1, 2, 50, 51],
                        "api_time": s(0.5),
                    },
                ],
            },
            {
                "type": "s",
                "t": s(4.0),
                "model": "claude-x",
                "in": 70,
                "out": 8,
                "hash_ids": [1, 2, 3, 4, 5],
                "api_time": s(1.0),
                "ttft": s(0.2),
                "think_time": s(0.5),
            },
            {"type": "n", "t": s(6.0), "model": "claude-x", "in": 30, "out": 4, "hash_ids": [1, 2]},
        ],
    }


def test_coding_agent_trace_with_a_sub_agent(tmp_path: Path) -> None:
    """Why 7: the sub-agent is a SPAWN child with its subagent_type, started when the request
    before its marker completes, at its recorded time, and joined before the next request;
    cumulative hash_ids become what each request adds; the trace's block size is honoured;
    the recorded times are kept."""
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(coding_trace(), indent=2))  # one pretty-printed object
    assert detect_format(path) == "coding-agent"
    w = load_workload(path)
    assert w.block_tokens == 16
    assert w.roots == ["T"]
    root, sub, tail = w.sessions["T"], w.sessions["T::sa:agent_001"], w.sessions["T#1"]
    assert sub.subagent_type == "Explore"
    [spawn] = w.branches[("T", 0)]
    assert (spawn.mode, spawn.children, spawn.join_at) == (BranchMode.SPAWN, (sub.id,), 1)
    # the sub-agent's first request 0.3 s after the parent's request ended (t 1.0)
    assert sub.turns[0].delay_s == pytest.approx(0.3)
    # the parent's next request: 0.8 s after the sub-agent ended (1.2 + 2.0 s)
    assert root.turns[1].delay_s == pytest.approx(0.8)
    # cumulative ids: 70 - 40 - 10 = 20 new tokens, in the prompt's last two blocks
    assert root.turns[1].input_tokens == 20
    assert root.turns[1].hash_ids is not None
    assert len(root.turns[1].hash_ids) == 2
    assert [t.input_tokens for t in sub.turns] == [36, 9]
    # a prompt that does not extend the previous one (compaction) starts a new part
    assert [(p.children, p.join_at) for p in w.branches[("T", 1)]] == [(("T#1",), None)]
    assert tail.turns[0].input_tokens == 30
    rec = root.turns[1].recorded
    assert rec is not None
    assert (rec.t_s, rec.api_time_s, rec.ttft_s, rec.think_time_s) == (4.0, 1.0, 0.2, 0.5)
    assert [t.output_tokens for t in root.turns] == [10, 8]
    assert root.turns[0].model is None  # the run's --model is sent, not the trace's


def test_coding_agent_ids_are_per_trace_but_the_tools_and_system_prefix_is_shared(
    tmp_path: Path,
) -> None:
    """hash_id_scope local: two traces' id 3 are different blocks; the two whole blocks of the
    same tools and system prefix are the same in both (and in the sub-agent's prompts)."""
    traces = tmp_path / "traces"
    traces.mkdir()
    for name in ("A", "B"):
        (traces / f"{name}.json").write_text(json.dumps(coding_trace(name)))
    w = load_workload(traces)
    a0, b0 = w.sessions["A"].turns[0].hash_ids, w.sessions["B"].turns[0].hash_ids
    assert a0 is not None
    assert b0 is not None
    assert a0[:2] == b0[:2]
    assert a0[2] != b0[2]
    sub0 = w.sessions["A::sa:agent_001"].turns[0].hash_ids
    assert sub0 is not None
    assert sub0[:2] == a0[:2]
    assert w.prefix is not None
    assert w.prefix.distinct_blocks == 2 + 2 * 5


def test_coding_agent_errors_and_warnings_name_the_field(tmp_path: Path) -> None:
    trace = coding_trace()
    trace["requests"][0]["hash_ids"] = [1, 2, 3, 4]  # 4 blocks of 16 for 40 tokens
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(trace))
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    assert info.value.field == "requests[0].hash_ids"
    trace["requests"][0]["hash_ids"] = [1, 2]
    trace["requests"][1]["requests"][0]["typo"] = 1
    path.write_text(json.dumps(trace))
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    assert info.value.field == "requests[1].requests[0].typo"
    assert "read as coding-agent" in info.value.problem


# ----------------------------------------------------------------------------- 8: the others


def test_bailian_chats_follow_parent_chat_id_with_cumulative_blocks(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "chat_id": 159,
            "parent_chat_id": -1,
            "timestamp": 61.1,
            "input_length": 40,
            "output_length": 8,
            "type": "text",
            "turn": 1,
            "hash_ids": [1089, 1090, 1091],
        },
        {
            "chat_id": 7,
            "parent_chat_id": -1,
            "timestamp": 61.0,
            "input_length": 20,
            "output_length": 3,
            "type": "search",
            "turn": 1,
            "hash_ids": [5, 6],
        },
        {
            "chat_id": 160,
            "parent_chat_id": 159,
            "timestamp": 62.5,
            "input_length": 70,
            "output_length": 8,
            "type": "text",
            "turn": 2,
            "hash_ids": [1089, 1090, 1091, 1092, 1093],
        },
    )
    assert detect_format(path) == "bailian"
    w = load_workload(path)
    assert w.block_tokens == 16
    chat = w.sessions["chat-159"]
    assert chat.start_s == pytest.approx(0.1)
    assert [t.input_tokens for t in chat.turns] == [40, 22]  # 70 - 40 - 8 new tokens
    assert chat.turns[1].hash_ids == [1092, 1093]
    assert chat.turns[1].offset_s == pytest.approx(1.4)
    assert w.sessions["chat-7"].start_s == 0.0


def test_aiperf_single_multi_turn_and_random_pool(tmp_path: Path) -> None:
    single = write(
        tmp_path,
        {"text": "one", "output_length": 4},
        {"session_id": "s", "texts": ["a", "b"], "timestamp": 100},
        {"session_id": "s", "text": "c", "timestamp": 600, "role": "user"},
        name="single.jsonl",
    )
    assert detect_format(single) == "single_turn"
    w = load_workload(single)
    assert w.sessions["line-1"].turns[0].messages == [user("one")]
    # lines of one session_id run one after the other, each without history
    assert [(b.children, b.join_at) for b in w.branches[("s", 0)]] == [(("s#1",), None)]
    assert w.sessions["s#1"].turns[0].delay_s == 0.5
    multi = write(
        tmp_path,
        {"session_id": "m", "turns": [{"text": "hi"}, {"text": "more", "delay": 250}]},
        name="multi.jsonl",
    )
    assert detect_format(multi) == "multi_turn"
    turns = load_workload(multi).sessions["m"].turns
    assert [t.messages for t in turns] == [[user("hi")], [user("more")]]
    assert turns[1].delay_s == 0.25
    pool = write(tmp_path, {"type": "random_pool", "text": "p"}, {"text": "q"}, name="pool.jsonl")
    assert len(load_workload(pool).roots) == 2
    bad = write(tmp_path, {"text": "x", "audio": "a.wav"}, name="bad.jsonl")
    with pytest.raises(WorkloadError) as info:
        load_workload(bad)
    assert (info.value.line, info.value.field) == (1, "audio")


def test_detection_lists_what_it_tried(tmp_path: Path) -> None:
    """Why 8: an unknown file says which formats were tried; a file read as one format says
    which, and why."""
    path = write(tmp_path, {"prompt": "x", "completion": "y"})
    with pytest.raises(WorkloadError) as info:
        load_workload(path)
    for name in (
        "credit-router",
        "coding-agent",
        "bailian",
        "dag_jsonl",
        "single_turn",
        "mooncake",
    ):
        assert name in info.value.problem
    wrong = write(tmp_path, {"input_length": 5, "prompt": "x"}, name="wrong.jsonl")
    with pytest.raises(WorkloadError) as info:
        load_workload(wrong)
    assert info.value.field == "prompt"
    assert "read as mooncake, from `input_length` on line 1" in info.value.problem


def test_convert_every_format_to_ours(tmp_path: Path) -> None:
    """Every reader's workload is written in our format and reads back the same."""
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(coding_trace()))
    files = [
        trace,
        write(tmp_path, {"session_id": "c", "messages": [user("hi")]}, name="m.jsonl"),
        write(tmp_path, {"session_id": "d", "turns": [{"messages": [user("d")]}]}, name="d.jsonl"),
        write(
            tmp_path,
            {
                "chat_id": 1,
                "timestamp": 0,
                "input_length": 20,
                "output_length": 2,
                "hash_ids": [1, 2],
            },
            name="b.jsonl",
        ),
        write(tmp_path, {"text": "t"}, name="s.jsonl"),
        write(tmp_path, {"turns": [{"text": "t"}]}, name="mt.jsonl"),
        write(tmp_path, {"type": "random_pool", "text": "t"}, name="rp.jsonl"),
    ]
    for source in files:
        out = tmp_path / f"{source.stem}.converted.jsonl"
        assert workload_main(["convert", str(source), "-o", str(out)]) == 0, source
        original, converted = load_workload(source), load_workload(out)
        assert converted.sessions == original.sessions
        assert converted.block_tokens == original.block_tokens
        buffer = out.read_bytes()
        with out.open("wb") as f:
            dump_workload(converted, f)
        assert out.read_bytes() == buffer


def test_credit_router_workload_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from credit_router.__main__ import main

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(coding_trace()))
    assert main(["workload", "check", str(trace)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"].startswith("coding-agent")
    assert doc["spawn_references"] == 2  # the sub-agent, and the compacted part
    assert main(["workload", "generate", "--sessions", "2", "-o", str(tmp_path / "g.jsonl")]) == 0
