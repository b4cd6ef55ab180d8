"""End to end over real processes and real HTTP: ``credit-router mock-server``, ``credit-router
serve`` and ``credit-router worker --executor openai --endpoint …`` on loopback, the replayer on a
``RouterClient`` in the test, and ``credit-router run`` itself as a subprocess.

The FORK/SPAWN test reads, on the server side (the mock's per-session records), what each
request of an agent tree carried: a FORK child's first request holds its parent's conversation
(the user turn and the captured answer), a SPAWN child's holds only its own message.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadgen.replay import CreditRecord, Replayer, ReplayOptions
from loadgen.run import LocalCluster, RunSettings
from loadgen.workload import load_workload
from router_service.client import RouterClient
from tests.loadgen.workload.test_format import write

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


TREE: list[Any] = [
    {
        "id": "lead",
        "turns": [
            {
                "messages": [
                    {"role": "system", "content": "you lead a team of agents " * 8},
                    *user("split the task"),
                ],
                "output_tokens": 6,
                "forks": ["fork-a", "fork-b"],
                "spawns": [{"children": ["scout"], "join_at": 1}],
            },
            {"messages": user("summarise"), "output_tokens": 4},
        ],
    },
    {
        "id": "fork-a",
        "turns": [{"messages": user("part a"), "output_tokens": 3}, {"messages": user("more a")}],
    },
    {"id": "fork-b", "turns": [{"messages": user("part b"), "output_tokens": 3}]},
    {
        "id": "scout",
        "subagent_type": "Explore",
        "turns": [{"messages": user("look around"), "output_tokens": 3}],
    },
    {
        "id": "broken",
        "turns": [{"messages": user("fail please"), "extra": {"mock_fault": "http_503"}}],
    },
]


async def _records_of(base: str, xid: str) -> list[dict[str, Any]]:
    url = f"{base.removesuffix('/v1')}/mock/sessions/{xid}"
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200, xid
        doc = await r.json()
    requests: list[dict[str, Any]] = doc["requests"]
    return requests


async def test_fork_children_carry_their_parents_history_and_spawn_children_do_not(
    tmp_path: Path,
) -> None:
    workload = load_workload(write(tmp_path, *TREE))
    settings = RunSettings(workers=2, mock_servers=1, capacity=8)
    async with LocalCluster(settings, "sticky") as cluster:
        records: list[CreditRecord] = []
        async with RouterClient(cluster.producer_endpoint, name="e2e") as client:
            replayer = Replayer(workload, client, ReplayOptions(), on_record=records.append)
            await asyncio.wait_for(replayer.run(), 30)
        by = {(r.conversation, r.turn_index): r for r in records}
        assert len(records) == 7
        base = cluster.servers[0]
        lead = await _records_of(base, by[("lead", 0)].session)
        fork_a = await _records_of(base, by[("fork-a", 0)].session)
        fork_b = await _records_of(base, by[("fork-b", 0)].session)
        scout = await _records_of(base, by[("scout", 0)].session)

    # The lead's second turn carries its first turn and the answer it got.
    first, second = lead
    answer = second["messages"][2]
    assert second["messages"][:2] == first["messages"]
    assert answer["role"] == "assistant"
    assert len(answer["content"].split()) == 6
    assert second["messages"][3:] == user("summarise")
    # FORK children start from a copy of that history: the same messages and the same answer.
    for child, text in ((fork_a, "part a"), (fork_b, "part b")):
        assert child[0]["messages"] == [*first["messages"], answer, *user(text)]
        assert child[0]["parent"] == by[("lead", 0)].session
        assert child[0]["cached_tokens"] > 0  # the parent's prefix, on this server
    # …and keep their own history afterwards, without their sibling's.
    assert fork_a[1]["messages"][:4] == fork_a[0]["messages"]
    assert "part b" not in json.dumps(fork_a[1]["messages"])
    # A SPAWN child starts empty, knowing only its parent.
    assert scout[0]["messages"] == user("look around")
    assert scout[0]["parent"] == by[("lead", 0)].session
    assert scout[0]["cached_tokens"] == 0
    # Routing: FORK children on their parent's worker; every turn with history where it lives.
    assert by[("fork-a", 0)].worker == by[("lead", 0)].worker == by[("fork-b", 0)].worker
    assert all(r.affinity in (None, True) for r in records)
    assert by[("lead", 0)].fork_count == 2
    # The join: the lead's second turn went out after the scout finished.
    assert by[("lead", 1)].submitted_at_s > by[("scout", 0)].submitted_at_s
    # An HTTP error from the server ends that credit failed, with the status as its reason.
    broken = by[("broken", 0)]
    assert (broken.status, broken.reason, broken.http_status) == ("failed", "http_503", 503)
    assert {r.status for r in records if r.conversation != "broken"} == {"completed"}
    for r in records:
        if r.status == "completed":
            assert r.ttft_s is not None
            assert r.e2e_s is not None
            assert 0 < r.ttft_s < r.e2e_s


def test_credit_router_run_compare_prints_both_policies_and_writes_records(
    tmp_path: Path,
) -> None:
    lines = [
        {
            "id": f"agent-{i}",
            "turns": [
                {"input_tokens": 400, "output_tokens": 4, "forks": [f"agent-{i}.f"]},
                {"input_tokens": 50, "output_tokens": 4},
                {"input_tokens": 50, "output_tokens": 4},
            ],
        }
        for i in range(6)
    ] + [
        {"id": f"agent-{i}.f", "turns": [{"input_tokens": 20, "output_tokens": 2}]}
        for i in range(6)
    ]
    workload = write(tmp_path, *lines)
    records = tmp_path / "records.jsonl"
    cmd = [
        sys.executable, "-m", "credit_router", "run", str(workload),
        # One tree at a time: least-loaded then rotates by its tie-break (fewest credits sent),
        # so a session's next turn lands elsewhere every time, not only when timing says so
        # (with 6 at once, the worker just freed often won the tie and the test flaked in CI).
        "--compare", "--workers", "3", "--mock-servers", "3", "--concurrency", "1",
        "--records", str(records), "--json", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stderr
    sticky, least = json.loads(done.stdout)
    assert (sticky["policy"], least["policy"]) == ("sticky", "least_loaded")
    for report in (sticky, least):
        assert report["outcomes"] == {"completed": 24}
        assert report["latency"]["ttft_s"]["count"] == 24
        assert set(report["workers"]) == {"w-0", "w-1", "w-2"}
        assert len(report["servers"]) == 3
    assert sticky["sticky_hit_rate"] == 1.0
    assert sticky["rebuilt_turns"] == 0
    # Least-loaded routing moves turns away from their history: rebuilt, and cache-cold.
    assert least["sticky_hit_rate"] < 1.0
    assert least["rebuilt_turns"] > 0
    assert least["prefix_cache_hit_rate"] < sticky["prefix_cache_hit_rate"]
    for policy in ("sticky", "least_loaded"):
        lines_out = (tmp_path / f"records.{policy}.jsonl").read_text().splitlines()
        assert len(lines_out) == 24
        first = json.loads(lines_out[0])
        assert {"credit_id", "session", "status", "worker", "ttft_s"} <= first.keys()


def test_credit_router_run_reports_a_bad_workload_by_line_and_field(tmp_path: Path) -> None:
    workload = write(tmp_path, {"id": "s", "turns": [{"input_tokens": 1, "max_tokens": 3}]})
    cmd = [sys.executable, "-m", "credit_router", "run", str(workload), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert f"{workload}:1: turns[0].max_tokens: unknown field" in done.stderr


async def test_the_watchdog_reports_a_cluster_process_that_exits() -> None:
    cluster = LocalCluster(RunSettings(), "sticky")
    cluster._spawn("router", ["no-such-command"])  # exits at once with a usage error
    messages: list[str] = []
    await asyncio.wait_for(cluster.watch(messages.append, period_s=0.05), 20)
    assert cluster.failed
    assert messages[0].startswith("router exited with status 2")
    assert "invalid choice" in messages[0]  # the log's tail comes with it
    cluster.failed = False  # nothing to keep: the test saw the log
    await cluster.stop()
    assert not cluster.log_dir.exists()
