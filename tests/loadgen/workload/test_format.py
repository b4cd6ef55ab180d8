"""The credit-router workload format: what it accepts, how it indexes trees, how it fails."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from loadgen.workload import (
    FORMAT,
    WorkloadError,
    detect_format,
    dump_workload,
    load_workload,
)
from protocol.messages import BranchMode

FORK, SPAWN = BranchMode.FORK, BranchMode.SPAWN


def write(tmp_path: Path, *lines: dict[str, Any] | str, name: str = "w.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


TREE = [
    {"format": FORMAT, "description": "a tree", "block_tokens": 16},
    {
        "id": "root",
        "turns": [
            {"messages": user("plan"), "output_tokens": 32, "forks": ["f1", "f2"]},
            {
                "input_tokens": 100,
                "delay_s": 1.5,
                "spawns": [
                    {"children": ["a1"], "join_at": 2},
                    {"children": ["bg"], "background": True},
                ],
            },
            {"input_tokens": 50},
        ],
    },
    {"id": "f1", "turns": [{"input_tokens": 10}]},
    {"id": "f2", "turns": [{"input_tokens": 10}, {"input_tokens": 5}]},
    {"id": "a1", "subagent_type": "Explore", "turns": [{"input_tokens": 300, "hash_ids": [1, 2]}]},
    "",
    {"id": "bg", "turns": [{"input_tokens": 1}]},
]


def test_a_tree_compiles_with_joins_and_counts(tmp_path: Path) -> None:
    w = load_workload(write(tmp_path, *TREE))
    assert w.roots == ["root"]
    assert w.block_tokens == 16
    assert w.description == "a tree"
    assert w.fork_count("root", 0) == 2
    assert w.fork_count("root", 1) == 0
    [forks] = w.branches[("root", 0)]
    assert (forks.mode, forks.children, forks.join_at) == (FORK, ("f1", "f2"), 1)
    joined, background = w.branches[("root", 1)]
    assert (joined.mode, joined.join_at, background.join_at) == (SPAWN, 2, None)
    assert w.fork_children == {"f1", "f2"}
    assert w.credits_in_tree("root") == 3 + 1 + 2 + 1 + 1
    assert w.summary()["sessions"] == 5


def test_dump_and_read_back_is_the_same_workload(tmp_path: Path) -> None:
    w = load_workload(write(tmp_path, *TREE))
    out = io.BytesIO()
    dump_workload(w, out)
    again = load_workload(write(tmp_path, out.getvalue().decode().strip(), name="again.jsonl"))
    assert again.sessions == w.sessions
    assert again.branches == w.branches
    assert again.block_tokens == 16


def test_without_a_header_the_first_session_tells_the_format(tmp_path: Path) -> None:
    path = write(tmp_path, {"id": "s", "turns": [{"input_tokens": 1}]})
    assert detect_format(path) == "credit-router"
    assert load_workload(path).roots == ["s"]


@pytest.mark.parametrize(
    ("lines", "line", "field", "problem"),
    [
        (
            [{"id": "s", "turns": [{"input_tokens": "x"}]}],
            1,
            "turns[0].input_tokens",
            "Expected `int",
        ),
        (
            [{"id": "s", "turns": [{"input_tokens": 1, "tokens": 2}]}],
            1,
            "turns[0].tokens",
            "unknown field",
        ),
        ([{"id": "s", "turns": [{"input_tokens": -1}]}], 1, "turns[0].input_tokens", ">= 0"),
        ([{"id": "s", "turns": [{}]}], 1, "turns[0]", "exactly one of messages and input_tokens"),
        (
            [{"id": "s", "turns": [{"messages": [{"content": "x"}]}]}],
            1,
            "turns[0].messages[0]",
            "role",
        ),
        ([{"id": "s", "turns": []}], 1, "turns", "at least one turn"),
        (
            [
                {"id": "a", "turns": [{"input_tokens": 1}]},
                {"id": "a", "turns": [{"input_tokens": 1}]},
            ],
            2,
            "id",
            "duplicate",
        ),
        (
            [{"id": "s", "turns": [{"input_tokens": 1, "forks": ["nope"]}]}],
            1,
            "turns[0].forks[0]",
            "no session",
        ),
        (
            [
                {
                    "id": "p",
                    "turns": [
                        {"input_tokens": 1, "forks": ["k"]},
                        {"input_tokens": 1, "forks": ["k"]},
                    ],
                },
                {"id": "k", "turns": [{"input_tokens": 1}]},
            ],
            1,
            "turns[1].forks[0]",
            "already has a parent",
        ),
        (
            [
                {
                    "id": "p",
                    "turns": [{"input_tokens": 1, "spawns": [{"children": ["k"], "join_at": 0}]}],
                },
                {"id": "k", "turns": [{"input_tokens": 1}]},
            ],
            1,
            "turns[0].spawns[0].join_at",
            "later turn",
        ),
        (
            [
                {"id": "p", "turns": [{"input_tokens": 1, "forks": ["k"]}]},
                {"id": "k", "subagent_type": "Explore", "turns": [{"input_tokens": 1}]},
            ],
            2,
            "subagent_type",
            "only SPAWN",
        ),
        (
            [
                {"id": "r", "turns": [{"input_tokens": 1, "spawns": ["a"]}]},
                {"id": "a", "turns": [{"input_tokens": 1, "spawns": ["b"]}]},
                {"id": "b", "turns": [{"input_tokens": 1, "spawns": ["a"]}]},
            ],
            2,
            "id",
            "cycle",
        ),
        (["{not json"], 1, None, "not a JSON object"),
        ([{"format": "something-else/9"}], 1, "format", "unsupported format"),
    ],
)
def test_bad_files_name_the_line_and_the_field(
    tmp_path: Path, lines: list[Any], line: int, field: str | None, problem: str
) -> None:
    path = write(tmp_path, *lines)
    with pytest.raises(WorkloadError) as info:
        load_workload(path, "credit-router")
    err = info.value
    assert (err.line, err.field) == (line, field)
    assert problem in err.problem
    assert str(err).startswith(f"{path}:{line}:")


def test_a_spawn_template_may_be_reused_by_several_parents(tmp_path: Path) -> None:
    w = load_workload(
        write(
            tmp_path,
            {"id": "r1", "turns": [{"input_tokens": 1, "spawns": ["helper"]}]},
            {"id": "r2", "turns": [{"input_tokens": 1, "spawns": ["helper"]}]},
            {"id": "helper", "turns": [{"input_tokens": 1}]},
        )
    )
    assert w.roots == ["r1", "r2"]


def test_think_times_may_be_sampled(tmp_path: Path) -> None:
    import random

    w = load_workload(
        write(
            tmp_path,
            {
                "id": "s",
                "turns": [
                    {"input_tokens": 1},
                    {
                        "input_tokens": 1,
                        "delay_s": 1.0,
                        "delay_sigma": 1.0,
                        "delay_min_s": 0.5,
                        "delay_max_s": 2.0,
                    },
                ],
            },
        )
    )
    turn = w.sessions["s"].turns[1]
    rng = random.Random(1)
    draws = [turn.think_time(rng) for _ in range(200)]
    assert min(draws) == 0.5
    assert max(draws) == 2.0
    assert len(set(draws)) > 50
    assert w.sessions["s"].turns[0].think_time(rng) == 0.0


def test_unknown_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match="cannot tell the format"):
        load_workload(write(tmp_path, {"prompt": "x"}))
    with pytest.raises(WorkloadError, match="empty"):
        load_workload(write(tmp_path, ""))
    with pytest.raises(WorkloadError, match="cannot read"):
        load_workload(tmp_path / "missing.jsonl", "credit-router")


def test_the_example_in_the_docs_is_a_valid_workload(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "WORKLOADS.md").read_text()
    example = doc.split("### An example", 1)[1].split("```jsonl\n", 1)[1].split("```", 1)[0]
    # A file as it would be copied: one JSON value per line.
    assert all(json.loads(line) for line in example.splitlines())
    decoder, text, values = json.JSONDecoder(), example.strip(), []
    while text:
        value, end = decoder.raw_decode(text)
        values.append(value)
        text = text[end:].strip()
    w = load_workload(write(tmp_path, *values))
    assert w.roots == ["agent"]
    assert w.fork_count("agent", 1) == 2
    assert [b.join_at for b in w.branches[("agent", 0)]] == [1]
    assert w.credits_in_tree("agent") == 3 + 2 + 1 + 1 + 1 + 1
