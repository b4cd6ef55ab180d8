"""``credit-router run`` on an agentic workload against a server that streams reasoning and tool
calls (``credit-router mock-server --reasoning-tokens``, a real process): every completed credit
has a TTFT, the report splits reasoning and content tokens, ``--records`` keeps the server's
error message and leaves a failed credit's token counts unknown, and the request bodies the
server received carry the tool calls and no reasoning."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.loadgen.workload.test_format import write
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TOOLS = [
    {
        "type": "function",
        "function": {"name": "read_file", "parameters": {"type": "object"}},
    }
]


@pytest.fixture
def thinking_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "credit_router",
            "mock-server",
            "--port",
            str(port),
            "--reasoning-tokens",
            "6",
            "--reasoning-field",
            "reasoning",
            "--decode-s-per-token",
            "0.001",
            "--base-ttft-s",
            "0.002",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def test_an_agentic_run_times_every_credit_and_replays_tool_calls_without_reasoning(
    tmp_path: Path, thinking_server: str
) -> None:
    agents = [
        {
            "id": f"agent-{i}",
            "turns": [
                {
                    "messages": [{"role": "user", "content": "fix the bug"}],
                    "tools": TOOLS,
                    "output_tokens": 5,
                },
                {
                    "messages": [{"role": "tool", "content": "def f(): return 1"}],
                    "tools": TOOLS,
                    "output_tokens": 4,
                },
                {"messages": [{"role": "user", "content": "summarise"}], "output_tokens": 3},
            ],
        }
        for i in range(3)
    ]
    broken = {
        "id": "broken",
        "turns": [
            {
                "messages": [{"role": "user", "content": "x"}],
                "extra": {"mock_fault": "error_event"},
            }
        ],
    }
    workload = write(tmp_path, *agents, broken)
    records = tmp_path / "records.jsonl"
    cmd = [
        sys.executable, "-m", "credit_router", "run", str(workload),
        "--endpoint", thinking_server + "/v1", "--workers", "2",
        "--records", str(records), "--json", "--no-progress",
        "--max-error-rate", "0.2",  # the one broken conversation fails on purpose
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["outcomes"] == {"completed": 9, "failed": 1}
    assert report["latency"]["ttft_s"]["count"] == 9  # every completed credit, tool calls too
    assert report["tool_calls"] == 3
    # 6 reasoning words before every answer: 5 + 4 + 3 answer tokens per agent.
    assert report["reasoning_tokens"] == 9 * 6
    assert report["content_tokens"] == 3 * (5 + 4 + 3)

    lines = [json.loads(line) for line in records.read_text().splitlines()]
    [failed] = [r for r in lines if r["status"] == "failed"]
    assert failed["reason"] == "stream_error"
    assert "injected fault error_event" in failed["error"]
    assert "input_tokens" not in failed
    assert "output_tokens" not in failed
    completed = [r for r in lines if r["status"] == "completed"]
    assert all(r["reasoning_tokens"] == 6 for r in completed)
    # Every request's X-Request-ID, failed ones too, to find it in the server's logs.
    sent = [r["x_request_id"] for r in lines]
    assert len(set(sent)) == 10
    assert all(len(i) == 32 for i in sent)
    calls = [r for r in completed if r.get("turn_index", 0) == 0]
    assert all(r["tool_calls"] == 1 and "ttft_content_s" not in r for r in calls)

    for record in calls:
        sent = _get(f"{thinking_server}/mock/sessions/{record['session']}")["requests"]
        assert len(sent) == 3
        second = sent[1]["messages"]
        assert second[1]["role"] == "assistant"
        assert second[1]["tool_calls"]
        assert second[2]["tool_call_id"] == second[1]["tool_calls"][0]["id"]
        third = sent[2]["messages"]
        assert [m["role"] for m in third] == ["user", "assistant", "tool", "assistant", "user"]
        for message in third:
            assert set(message) <= {"role", "content", "tool_calls", "tool_call_id"}
        # The reasoning words streamed before each answer are nowhere in the replay: the
        # answers replayed are exactly the content (4 words) and the call.
        assert len(third[3]["content"].split()) == 4


def test_the_text_report_splits_reasoning_and_content_and_shows_ttft_content() -> None:
    from loadgen.replay import CreditRecord
    from loadgen.report import Collector, Report

    c = Collector()
    common = {"session": "s", "conversation": "s", "root": "s", "submitted_at_s": 0.0}
    c.add(CreditRecord(credit_id=1, status="completed", ttft_s=0.02, output_tokens=10,
                       reasoning_tokens=6, tool_calls=1, **common))  # fmt: skip
    c.add(CreditRecord(credit_id=2, status="completed", ttft_s=0.03, ttft_content_s=0.09,
                       output_tokens=8, reasoning_tokens=2, **common))  # fmt: skip
    c.add(CreditRecord(credit_id=3, status="failed", reason="stream_error", error="boom", **common))
    text = Report("sticky", "test", "w", 1.0, c).render()
    assert "18 tokens: 8 reasoning, 10 content · 1 tool calls" in text
    assert "TTFT content" in text
    assert Report("sticky", "test", "w", 1.0, c).latency()["ttft_s"]["count"] == 2
