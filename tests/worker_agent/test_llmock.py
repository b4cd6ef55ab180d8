"""The OpenAI executor against a server we did not write: ``llmock`` (PyPI), an OpenAI-compatible
mock with tool calling and fault injection, run as its own process (``llmock serve``) and
scripted through its admin API (``POST /_llmock/scenario``).

It checks what our own mock cannot vouch for: that the executor reads tool-call streams and the
Responses API's events the way another implementation writes them, replays the calls in a form
that implementation accepts, and turns its faults (HTTP errors with OpenAI error bodies, a
stream cut early, a corrupted chunk, a dropped connection, a stall) into failed credits with
stable reasons.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.inference import TurnRequest
from protocol.messages import Status
from tests.ports import free_port
from tests.worker_agent.test_agentic import TOOLS, Driver, ask, measured
from worker_agent.openai import OpenAIExecutor

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LLMOCK = shutil.which("llmock") or str(Path(sys.executable).with_name("llmock"))


def _post(url: str, doc: object) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(doc).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def llmock() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [LLMOCK, "serve", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"llmock exited with {proc.returncode}")
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def make(llmock: str) -> AsyncIterator[Any]:
    _post(llmock + "/_llmock/reset", {})
    executors: list[OpenAIExecutor] = []

    def build(api: str = "chat", **options: Any) -> Driver:
        ex = OpenAIExecutor([llmock + "/v1"], api=api, **{"request_timeout_s": 5.0, **options})
        executors.append(ex)
        return Driver(ex)

    yield build
    for ex in executors:
        await ex.aclose()


def _requests(llmock: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(llmock + "/_llmock/requests", timeout=5) as r:
        doc = json.load(r)
    return doc["requests"] if isinstance(doc, dict) else doc


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_tool_call_turn_is_timed_and_replayed_to_llmock(make, llmock, api) -> None:
    d = make(api)
    first = await d.run("t", ask("what is the weather in Paris?", tools=TOOLS), num_turns=2)
    m = measured(first)
    assert first.status is Status.COMPLETED, m.error
    assert m.tool_calls == 1
    assert m.ttft_s is not None
    assert m.ttft_content_s is None
    assert m.itl_s is not None
    result = TurnRequest(
        messages=[{"role": "tool", "content": "21C and sunny"}], tools=TOOLS, output_tokens=8
    )
    second = await d.run("t", result, turn_index=1, num_turns=2)
    answer = measured(second)
    # llmock answers in text once the tool's result comes back for the call it made.
    assert second.status is Status.COMPLETED, answer.error
    assert answer.tool_calls == 0
    assert answer.ttft_content_s is not None


async def test_llmock_http_faults_fail_with_their_status_and_message(make, llmock) -> None:
    d = make()
    _post(
        llmock + "/_llmock/scenario",
        {"behaviors": [{"type": "fail", "status": 503, "message": "the GPUs are on fire"}]},
    )
    result = await d.run("f", ask("x"))
    assert (result.status, result.reason) == (Status.FAILED, "http_503")
    assert "the GPUs are on fire" in measured(result).error
    _post(llmock + "/_llmock/scenario", {"behaviors": [{"type": "fail", "status": 429}]})
    limited = await d.run("f", ask("x"))
    assert limited.reason == "http_429"
    assert measured(limited).http_status == 429


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncate", "stream_incomplete"),
        ("malformed", "malformed_stream"),
        ("disconnect", "stream_broken"),
        ("stall", "timeout"),
    ],
)
@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_llmock_stream_faults_fail_with_stable_reasons(
    make, llmock, kind, reason, api
) -> None:
    d = make(api, request_timeout_s=1.0)
    fault = {"type": "stream_fault", "kind": kind, "after_chunks": 2, "stall_seconds": 5}
    _post(llmock + "/_llmock/scenario", {"behaviors": [fault]})
    result = await d.run("s", ask("tell me a long story", tokens=64))
    assert (result.status, result.reason) == (Status.FAILED, reason), measured(result).error
    m = measured(result)
    assert m.endpoint == llmock + "/v1"
    assert m.input_tokens == 0  # unknown: nothing measured is claimed
