"""The mock inference server over real HTTP: OpenAI shapes, prefix-cache model, records, faults."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from loadgen.mockserver import MockServer, MockSettings, block_hashes, tokenize

pytestmark = pytest.mark.integration

FAST = MockSettings(
    base_ttft_s=0.005, prefill_s_per_token=0.0005, decode_s_per_token=0.001, block_tokens=4
)


@pytest.fixture
async def server() -> AsyncIterator[MockServer]:
    mock = MockServer(FAST)
    await mock.start()
    try:
        yield mock
    finally:
        await mock.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _url(server: MockServer, path: str = "/v1/chat/completions") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def _stream(
    http: aiohttp.ClientSession, server: MockServer, body: dict[str, Any], **headers: str
) -> tuple[list[dict[str, Any]], bool]:
    """The decoded events of a streamed completion, and whether ``[DONE]`` came."""
    events = []
    done = False
    async with http.post(_url(server), json={**body, "stream": True}, headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if not line.strip():
                continue
            data = line.removeprefix(b"data: ").strip()
            if data == b"[DONE]":
                done = True
            else:
                events.append(json.loads(data))
    return events, done


def _answer(events: list[dict[str, Any]]) -> str:
    return "".join(e["choices"][0]["delta"]["content"] for e in events if e["choices"])


def test_tokens_are_role_markers_and_words_and_blocks_chain() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert tokenize(messages) == ["<|system|>", "be", "brief", "<|user|>", "hi", "there"]
    a = block_hashes(["a", "b", "c", "d", "e"], 2)
    b = block_hashes(["x", "b", "c", "d"], 2)
    assert len(a) == 2  # the partial third block is not cacheable
    assert a[1] != b[1]  # same block content, different prefix: different hash


async def test_stream_has_openai_shape_usage_and_done(server, http) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "one two three four five six seven"}],
        "max_tokens": 5,
        "stream_options": {"include_usage": True},
    }
    events, done = await _stream(http, server, body)
    assert done
    content = [e for e in events if e["choices"]]
    assert len(content) == 5
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert len(_answer(events).split()) == 5
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] == 8
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


async def test_next_turn_finds_its_history_cached_and_is_faster(server, http) -> None:
    history = [{"role": "user", "content": " ".join(["word"] * 200)}]
    first = {"messages": history, "max_tokens": 8, "stream_options": {"include_usage": True}}
    events, _ = await _stream(http, server, first)
    assert events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    turn2 = [
        *history,
        {"role": "assistant", "content": _answer(events)},
        {"role": "user", "content": "and now?"},
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(_url(server), json={"messages": turn2, "max_tokens": 1}) as r:
        doc = await r.json()
    warm = loop.time() - started
    usage = doc["usage"]
    # History (201 tokens) + answer (1 marker + 8 words) hit; only the new tail is prefilled.
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 208
    assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] < 8
    cold = server.settings.base_ttft_s + 212 * server.settings.prefill_s_per_token
    assert warm < cold  # 0.111 s for the whole prompt uncached
    assert doc["choices"][0]["message"]["role"] == "assistant"


async def test_records_what_each_session_sent(server, http) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    headers = {"X-Correlation-ID": "child", "X-Parent-Correlation-ID": "root"}
    async with http.post(_url(server), json=body, headers=headers) as r:
        assert r.status == 200
    async with http.get(_url(server, "/mock/sessions/child")) as r:
        records = (await r.json())["requests"]
    assert records[0]["messages"] == body["messages"]
    assert records[0]["parent"] == "root"
    async with http.get(_url(server, "/mock/sessions/nobody")) as r:
        assert r.status == 404
    async with http.get(_url(server, "/mock/stats")) as r:
        stats = await r.json()
    assert (stats["requests"], stats["completed"], stats["prompt_tokens"]) == (1, 1, 2)
    async with http.post(_url(server, "/mock/reset")) as r:
        assert r.status == 200
    assert server.stats.requests == 0
    assert len(server.cache) == 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": []}, "must not be empty"),
        ({"messages": [{"content": "x"}]}, "no role"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "mock_fault": "nope"}, "mock_fault"),
    ],
)
async def test_bad_requests_get_400_with_an_openai_error(server, http, body, fragment) -> None:
    async with http.post(_url(server), json=body) as r:
        assert r.status == 400
        doc = await r.json()
    assert fragment in doc["error"]["message"]
    assert doc["error"]["type"] == "invalid_request_error"


async def test_injected_faults(server, http) -> None:
    msg = [{"role": "user", "content": "x y z"}]
    async with http.post(_url(server), json={"messages": msg, "mock_fault": "http_503"}) as r:
        assert r.status == 503
    events, done = await _stream(
        http, server, {"messages": msg, "max_tokens": 6, "mock_fault": "truncate"}
    )
    assert not done
    assert len(events) == 3
    with pytest.raises(aiohttp.ClientPayloadError):
        await _stream(http, server, {"messages": msg, "max_tokens": 6, "mock_fault": "disconnect"})


async def test_a_client_that_leaves_cancels_its_request(server, http) -> None:
    msg = [{"role": "user", "content": "x"}]
    body = {"messages": msg, "stream": True, "mock_fault": "stall"}
    async with http.post(_url(server), json=body) as r:
        assert r.status == 200
    for _ in range(100):  # leaving the block closed the connection
        if server.stats.disconnected:
            break
        await asyncio.sleep(0.01)
    assert server.stats.disconnected == 1
    assert server.stats.active == 0


async def test_max_concurrency_queues_and_the_wait_counts_in_ttft(http) -> None:
    mock = MockServer(MockSettings(base_ttft_s=0.05, decode_s_per_token=0.0, max_concurrency=1))
    await mock.start()
    try:
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def one() -> None:
            async with http.post(_url(mock), json=body) as r:
                assert r.status == 200

        await asyncio.gather(one(), one(), one())
        assert loop.time() - started >= 0.15
        assert mock.stats.max_active == 3
    finally:
        await mock.stop()


TOOLS = [{"type": "function", "function": {"name": "grep", "parameters": {"type": "object"}}}]


async def _raw(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    async with http.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200, await r.text()
        return await r.read()


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
async def test_reasoning_streams_first_in_either_field_and_is_counted(http, field) -> None:
    mock = MockServer(MockSettings(base_ttft_s=0.0, decode_s_per_token=0.0, reasoning_field=field))
    await mock.start()
    try:
        body = {
            "messages": [{"role": "user", "content": "think"}],
            "max_tokens": 3,
            "mock_reasoning_tokens": 4,
            "stream_options": {"include_usage": True},
        }
        events, done = await _stream(http, mock, body)
    finally:
        await mock.stop()
    assert done
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert [field in d for d in deltas] == [True] * 4 + [False] * 3
    assert all("content" in d for d in deltas[4:])
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 4}


async def test_offered_tools_are_called_in_fragments_and_results_must_answer_a_call(
    server, http
) -> None:
    question = [{"role": "user", "content": "find it"}]
    events, done = await _stream(
        http, server, {"messages": question, "tools": TOOLS, "max_tokens": 4}
    )
    assert done
    calls = [e["choices"][0]["delta"]["tool_calls"][0] for e in events if e["choices"]]
    assert calls[0]["function"]["name"] == "grep"
    assert calls[0]["id"].startswith("call_")
    assert all("id" not in c for c in calls[1:])
    arguments = json.loads("".join(c["function"]["arguments"] for c in calls))
    assert len(arguments["input"].split()) == 4
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    call = {
        "id": calls[0]["id"],
        "type": "function",
        "function": {"name": "grep", "arguments": "{}"},
    }
    answered = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "a.py"},
    ]
    events, _ = await _stream(http, server, {"messages": answered, "tools": TOOLS, "max_tokens": 2})
    assert len(_answer(events).split()) == 2  # the result came back: a text answer
    orphan = [*question, {"role": "assistant", "content": ""}, answered[-1]]
    async with http.post(_url(server), json={"messages": orphan}) as r:
        assert r.status == 400
        assert "'tool' message must answer" in (await r.json())["error"]["message"]
    unanswered = [*answered[:2], {"role": "user", "content": "go on"}]
    async with http.post(_url(server), json={"messages": unanswered}) as r:
        assert r.status == 400
        assert "must be followed by tool messages" in (await r.json())["error"]["message"]


@pytest.mark.parametrize(
    ("fault", "shape"),
    [("error_event", b"event: error\ndata: {"), ("error_chunk", b'data: {"error":{"message"')],
)
async def test_error_faults_stream_an_error_then_done(server, http, fault, shape) -> None:
    msg = [{"role": "user", "content": "x"}]
    raw = await _raw(http, _url(server), {"messages": msg, "max_tokens": 4, "mock_fault": fault})
    assert shape in raw
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_long_event_fault_writes_one_event_past_512_kib(server, http) -> None:
    msg = [{"role": "user", "content": "x"}]
    raw = await _raw(
        http, _url(server), {"messages": msg, "max_tokens": 4, "mock_fault": "long_event"}
    )
    assert max(len(event) for event in raw.split(b"\n\n")) > 512 << 10
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_legacy_completions_and_responses_share_the_model(server, http) -> None:
    raw = await _raw(http, _url(server, "/v1/completions"), {"prompt": "a b c", "max_tokens": 3})
    texts = [
        json.loads(line[6:])["choices"][0]["text"]
        for line in raw.split(b"\n\n")
        if line.startswith(b"data: {")
    ]
    assert len("".join(texts).split()) == 3
    body = {
        "input": "find it",
        "tools": [{"type": "function", "name": "grep"}],
        "max_output_tokens": 3,
    }
    raw = await _raw(http, _url(server, "/v1/responses"), body)
    kinds = [
        line.split(b"\n")[0][7:].decode()
        for line in raw.split(b"\n\n")
        if line.startswith(b"event: ")
    ]
    assert kinds[0] == "response.created"
    assert kinds.count("response.function_call_arguments.delta") == 3
    assert kinds[-1] == "response.completed"
    completed = json.loads(raw.split(b"\n\n")[-2].split(b"data: ", 1)[1])
    assert completed["response"]["usage"]["output_tokens"] == 3
