"""Agentic streams measured right (issue 10's "Why" items), over real HTTP.

Two kinds of server: our mock (tool calls, reasoning in either field, error events, overlong
events) and a scripted one that sends exactly the bytes a test gives it, the way third-party
servers were seen to send them (vLLM's ``delta.reasoning``, an ``event: error`` followed by
``[DONE]``, a 600 KiB event). ``test_llmock.py`` runs the same executor against a server we
did not write.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st

from loadgen.mockserver import MockServer, MockSettings
from protocol.inference import RequestResult, TurnRequest, decode_result, encode_request
from protocol.messages import (
    Completion,
    Credit,
    Dispatch,
    FirstToken,
    Heartbeat,
    InFlightReport,
    Status,
)
from tests.worker_agent.conftest import FakeRouter, StartAgent
from worker_agent.core import SessionTable
from worker_agent.executor import ExecResult
from worker_agent.openai import OpenAIExecutor

pytestmark = pytest.mark.integration

FAST = MockSettings(
    base_ttft_s=0.002, prefill_s_per_token=0.00002, decode_s_per_token=0.001, block_tokens=4
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "grep",
            "description": "search the repository",
            "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
        },
    }
]


# ---------------------------------------------------------------------- servers


Step = bytes | float
"""A scripted body: bytes to write, or seconds to wait before the next write."""


class Scripted:
    """A real HTTP server that answers every POST with the next script's status and body
    steps, and keeps the request bodies it received."""

    def __init__(self) -> None:
        self.scripts: list[tuple[int, Sequence[Step]]] = []
        self.bodies: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/{api:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        status, steps = self.scripts.pop(0) if self.scripts else (200, [b"data: [DONE]\n\n"])
        response = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for step in steps:
            if isinstance(step, float):
                await asyncio.sleep(step)
            elif step == b"<close>":
                assert request.transport is not None
                request.transport.close()
                return response
            else:
                await response.write(step)
        return response


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = Scripted()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = MockServer(FAST)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def sse(doc: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(doc).encode() + b"\n\n"


def chunk(*, content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage(prompt: int, completion: int, reasoning: int | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"choices": [], "usage": {"prompt_tokens": prompt}}
    doc["usage"]["completion_tokens"] = completion
    if reasoning is not None:
        doc["usage"]["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return doc


DONE = b"data: [DONE]\n\n"


# ---------------------------------------------------------------------- driving credits


class Driver:
    """Runs credits through an executor with a session table, as the agent does."""

    def __init__(self, executor: OpenAIExecutor) -> None:
        self.executor = executor
        self.table = SessionTable()
        self.first_tokens: list[tuple[int, float]] = []
        self.ids = iter(range(1, 10_000))

    async def run(self, xid: str, request: TurnRequest, **fields: Any) -> ExecResult:
        credit = Credit(
            id=next(self.ids), x_correlation_id=xid, payload=encode_request(request), **fields
        )
        session = self.table.begin(credit)
        result = await self.executor.execute(
            credit, session, lambda ttft: self.first_tokens.append((credit.id, ttft))
        )
        completed = result.status is Status.COMPLETED
        self.table.end(credit, session, completed=completed, turn=result.turn)
        return result


def measured(result: ExecResult) -> RequestResult:
    decoded = decode_result(result.result)
    assert decoded is not None, result
    return decoded


def ask(text: str, tokens: int = 6, **fields: Any) -> TurnRequest:
    return TurnRequest(messages=[{"role": "user", "content": text}], output_tokens=tokens, **fields)


def tool_result(text: str) -> TurnRequest:
    return TurnRequest(messages=[{"role": "tool", "content": text}], output_tokens=4, tools=TOOLS)


@pytest.fixture
async def driver(request: pytest.FixtureRequest) -> AsyncIterator[Driver]:
    executors: list[OpenAIExecutor] = []

    def make(url: str, **options: Any) -> Driver:
        ex = OpenAIExecutor([url], request_timeout_s=5.0, **options)
        executors.append(ex)
        return Driver(ex)

    yield make  # type: ignore[misc]
    for ex in executors:
        await ex.aclose()


# ---------------------------------------------------------------------- Why 1: tool calls


async def test_why1_a_tool_call_turn_is_timed_and_its_calls_are_replayed(mock, driver) -> None:
    d = driver(f"http://127.0.0.1:{mock.port}/v1")
    first = await d.run("agent", ask("find the flaky test", tools=TOOLS), num_turns=2)
    second = await d.run("agent", tool_result("tests/a.py:3 flaky"), turn_index=1, num_turns=2)
    call = measured(first)
    assert first.status is Status.COMPLETED
    assert call.tool_calls == 1
    # The answer is a tool call and nothing else: still a TTFT, an ITL and a FirstToken.
    assert call.ttft_s is not None
    assert call.itl_s is not None
    assert call.ttft_content_s is None
    assert first.ttft_s == call.ttft_s
    assert [credit for credit, _ in d.first_tokens] == [1, 2]
    # The next request carries the call, and the tool result answers it by id.
    assert second.status is Status.COMPLETED, measured(second).error
    sent = mock.records["agent"][1]["messages"]
    assistant, tool = sent[1], sent[2]
    assert assistant["role"] == "assistant"
    [replayed] = assistant["tool_calls"]
    assert replayed["function"]["name"] == "grep"
    assert json.loads(replayed["function"]["arguments"])["input"]  # the streamed fragments, whole
    assert tool == {"role": "tool", "content": "tests/a.py:3 flaky", "tool_call_id": replayed["id"]}
    assert measured(second).ttft_content_s is not None  # answered in text once the tool replied


async def test_why1_calls_a_turn_leaves_unanswered_get_empty_results(mock, driver) -> None:
    d = driver(f"http://127.0.0.1:{mock.port}/v1")
    await d.run("u", ask("find it", tools=TOOLS), num_turns=2)
    # The next turn is a user message, not the tool's result: a strict server (OpenAI, and our
    # mock) refuses a call left unanswered, so the executor answers it with an empty result.
    follow = await d.run("u", ask("never mind, summarise"), turn_index=1, num_turns=2)
    assert follow.status is Status.COMPLETED, measured(follow).error
    sent = mock.records["u"][1]["messages"]
    call_id = sent[1]["tool_calls"][0]["id"]
    assert sent[2] == {"role": "tool", "tool_call_id": call_id, "content": ""}
    assert sent[3] == {"role": "user", "content": "never mind, summarise"}


async def test_why1_fragments_of_several_calls_are_reassembled_by_index(scripted, driver) -> None:
    d = driver(scripted.url)
    calls = [
        {
            "index": 0,
            "id": "call_a",
            "type": "function",
            "function": {"name": "ls", "arguments": ""},
        },
        {
            "index": 1,
            "id": "call_b",
            "type": "function",
            "function": {"name": "cat", "arguments": ""},
        },
    ]
    scripted.scripts.append(
        (
            200,
            [
                sse(chunk(tool_calls=calls)),
                sse(chunk(tool_calls=[{"index": 1, "function": {"arguments": '{"p": "x'}}])),
                sse(chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"d": "/"}'}}])),
                sse(chunk(tool_calls=[{"index": 1, "function": {"arguments": '.py"}'}}])),
                sse(chunk(finish="tool_calls")),
                DONE,
            ],
        )
    )
    first = await d.run("s", ask("look"), num_turns=2)
    m = measured(first)
    assert (m.tool_calls, m.output_tokens) == (2, 5)  # no usage: one token a fragment
    assert m.ttft_s is not None
    await d.run("s", ask("go on"), turn_index=1, num_turns=2)
    replayed = scripted.bodies[1]["messages"][1]
    assert replayed["content"] is None
    assert replayed["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "ls", "arguments": '{"d": "/"}'}},
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "cat", "arguments": '{"p": "x.py"}'},
        },
    ]


# ---------------------------------------------------------------------- Why 2: reasoning


def _thinking(field: str, gap_s: float) -> list[Step]:
    """Ten reasoning events, then two content events, ``gap_s`` apart; usage says 12 tokens,
    10 of them reasoning."""
    steps: list[Step] = []
    for i in range(10):
        steps += [sse(chunk(**{field: f" thought{i}"})), gap_s]
    steps += [sse(chunk(content="the answer")), gap_s, sse(chunk(content=" is 42", finish="stop"))]
    return [*steps, sse(usage(9, 12, reasoning=10)), DONE]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
async def test_why2_reasoning_in_either_field_starts_ttft_and_itl_spans_it(
    scripted, driver, field
) -> None:
    d = driver(scripted.url)
    scripted.scripts.append((200, _thinking(field, 0.02)))
    m = measured(await d.run("r", ask("think"), num_turns=2))
    assert m.ttft_s is not None
    assert m.ttft_content_s is not None
    # Ten 20 ms gaps of thinking before the first content token.
    assert m.ttft_content_s - m.ttft_s >= 0.15
    assert (m.output_tokens, m.reasoning_tokens) == (12, 10)
    # ITL: eleven gaps over twelve tokens. Content-only decode time (one gap) over twelve
    # tokens came out ~10x too low.
    assert m.itl_s is not None
    assert m.itl_s >= 0.01


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
async def test_why2_reasoning_is_never_replayed(scripted, driver, field) -> None:
    d = driver(scripted.url)
    scripted.scripts.append((200, _thinking(field, 0.0)))
    await d.run("r", ask("think"), num_turns=2)
    await d.run("r", ask("and now?"), turn_index=1, num_turns=2)
    history = scripted.bodies[1]["messages"]
    assert history[1] == {"role": "assistant", "content": "the answer is 42"}
    assert "thought" not in json.dumps(scripted.bodies[1])


async def test_why2_the_mock_streams_reasoning_and_counts_it(mock, driver) -> None:
    d = driver(f"http://127.0.0.1:{mock.port}/v1")
    m = measured(await d.run("m", ask("plan", tokens=5, extra={"mock_reasoning_tokens": 7})))
    assert (m.output_tokens, m.reasoning_tokens) == (12, 7)
    assert m.ttft_s is not None
    assert m.ttft_content_s is not None
    assert m.ttft_content_s > m.ttft_s


# ---------------------------------------------------------------------- Why 3: error events


ERRORS = {
    "sse-error-event": sse({"type": "error", "message": "engine crashed: boom"}, event="error"),
    "openai-error-object": sse({"error": {"message": "engine crashed: boom", "code": 500}}),
    "vllm-error-object": sse({"object": "error", "message": "engine crashed: boom", "code": 500}),
    "bare-error-type": sse({"type": "error", "message": "engine crashed: boom"}),
}


@pytest.mark.parametrize("error", ERRORS.values(), ids=ERRORS.keys())
async def test_why3_an_error_event_fails_the_credit_with_the_server_message(
    scripted, driver, error
) -> None:
    d = driver(scripted.url)
    scripted.scripts.append((200, [sse(chunk(content="partial")), error, DONE]))
    result = await d.run("e", ask("x"))
    assert (result.status, result.reason) == (Status.FAILED, "stream_error")
    m = measured(result)
    assert m.error == "engine crashed: boom"
    assert (m.http_status, m.endpoint) == (200, scripted.url)


async def test_why3_mock_error_events_fail(mock, driver) -> None:
    d = driver(f"http://127.0.0.1:{mock.port}/v1")
    for fault in ("error_event", "error_chunk"):
        result = await d.run(fault, ask("x", extra={"mock_fault": fault}))
        assert (result.status, result.reason) == (Status.FAILED, "stream_error")
        assert f"injected fault {fault}" in measured(result).error


async def test_why3_http_errors_keep_their_bounded_body(scripted, driver) -> None:
    d = driver(scripted.url)
    scripted.scripts.append(
        (429, [json.dumps({"error": {"message": "slow down " * 500}}).encode()])
    )
    scripted.scripts.append((502, [b"<html>bad gateway</html>"]))
    limited = measured(await d.run("a", ask("x")))
    assert limited.http_status == 429
    assert limited.error.startswith("slow down")
    assert len(limited.error) == 1_000
    gateway = await d.run("b", ask("x"))
    assert gateway.reason == "http_502"
    assert measured(gateway).error == "<html>bad gateway</html>"


# ---------------------------------------------------------------------- Why 4: long lines


async def test_why4_a_600_kib_event_is_read_and_a_too_long_one_fails_with_a_result(
    scripted, driver
) -> None:
    big = "x" * (600 << 10)
    script = [sse(chunk(content=big)), sse(chunk(content=" end", finish="stop")), DONE]
    scripted.scripts += [(200, script), (200, script)]
    ok = measured(await driver(scripted.url).run("big", ask("x")))
    assert ok.output_tokens == 2
    assert ok.ttft_s is not None
    result = await driver(scripted.url, max_event_bytes=256 << 10).run("big", ask("x"))
    assert (result.status, result.reason) == (Status.FAILED, "stream_too_long")
    m = measured(result)
    assert (m.http_status, m.endpoint) == (200, scripted.url)
    assert "262144" in m.error


async def test_why4_the_mock_long_event_fault_completes(mock, driver) -> None:
    d = driver(f"http://127.0.0.1:{mock.port}/v1")
    result = await d.run("long", ask("x", extra={"mock_fault": "long_event"}))
    assert result.status is Status.COMPLETED, measured(result).error


# ---------------------------------------------------------------------- anything at all


_EVENTS = st.sampled_from(
    [
        sse(chunk(content="word")),
        sse(chunk(reasoning="hmm")),
        sse(
            chunk(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}])
        ),
        sse(chunk(content="x", finish="stop")),
        sse(usage(3, 4, 1)),
        DONE,
        b"data: {not json\n\n",
        b"data: [1, 2]\n\n",
        b'data: {"choices": "no"}\n\n',
        b'data: {"choices": [{"delta": {"tool_calls": [{"index": "zero"}]}}]}\n\n',
        b": keep-alive\n\n",
        b"event: error\ndata: oops\n\n",
        sse({"error": "plain string"}),
        b"data: \xff\xfe\n\n",
        b"\r\n\r\n",
        b"data: " + b"y" * 5000,  # no newline: a line that never ends
        b"<close>",
        # The Responses API's events.
        sse({"type": "response.output_text.delta", "delta": "w"}, "response.output_text.delta"),
        sse({"type": "response.reasoning_text.delta", "delta": "h"}),
        sse({"type": "response.function_call_arguments.delta", "item_id": "fc", "delta": "{"}),
        sse({"type": "response.output_item.done", "item": {"type": "function_call", "id": 3}}),
        sse({"type": "response.completed", "response": {"usage": {"output_tokens": 2}}}),
        sse({"type": "response.completed", "response": {"usage": {"output_tokens": "x"}}}),
        sse({"type": "response.failed", "response": {"error": {"message": "no"}}}),
        # Legacy completions.
        sse({"choices": [{"text": "w", "finish_reason": None}]}),
    ]
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    status=st.sampled_from([200] * 6 + [429, 503]),
    steps=st.lists(_EVENTS, max_size=8),
    split=st.integers(min_value=1, max_value=7),
    api=st.sampled_from(["chat", "completions", "responses"]),
)
def test_a_credit_always_ends_with_a_result_whatever_the_server_does(
    status: int, steps: list[bytes], split: int, api: str
) -> None:
    # Bytes cut at arbitrary places too: the same events, split across writes.
    raw = b"".join(s for s in steps if s != b"<close>")
    pieces: list[Step] = [raw[i : i + split * 7] for i in range(0, len(raw), split * 7)]
    if b"<close>" in steps:
        pieces.append(b"<close>")

    async def scenario() -> ExecResult:
        server = Scripted()
        await server.start()
        server.scripts.append((status, pieces))
        ex = OpenAIExecutor([server.url], request_timeout_s=5.0, api=api, max_event_bytes=4096)
        try:
            return await Driver(ex).run("h", ask("x"), num_turns=2)
        finally:
            await ex.aclose()
            await server.stop()

    result = asyncio.run(scenario())
    assert result.status in (Status.COMPLETED, Status.FAILED)
    m = decode_result(result.result)
    assert m is not None
    if result.status is Status.FAILED:
        assert result.reason, m.error
        assert result.reason != "executor_error", m.error
        assert len(m.error) <= 1_000
    else:
        assert result.turn is not None
        msgspec.msgpack.decode(result.turn.request)


# ---------------------------------------------------------------------- every API, both modes


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("api", ["chat", "completions", "responses"])
async def test_every_api_runs_a_tool_loop_with_reasoning_against_the_mock(
    mock, driver, api, stream
) -> None:
    d = driver(f"http://127.0.0.1:{mock.port}/v1", api=api, stream=stream)
    thinking = {"mock_reasoning_tokens": 3}
    first = await d.run("a", ask("find it", tools=TOOLS, extra=thinking), num_turns=2)
    reply = TurnRequest(
        messages=[{"role": "tool", "content": "found"}], tools=TOOLS, output_tokens=4
    )
    second = await d.run("a", reply, turn_index=1, num_turns=2)
    m1, m2 = measured(first), measured(second)
    assert first.status is Status.COMPLETED, m1.error
    assert second.status is Status.COMPLETED, m2.error
    # Legacy completions have no tools and no reasoning: text both times.
    assert m1.tool_calls == (0 if api == "completions" else 1)
    assert m1.reasoning_tokens == (0 if api == "completions" else 3)
    assert m1.output_tokens == m1.reasoning_tokens + 6
    assert (m1.ttft_s is not None) is stream
    assert (m1.itl_s is not None) is stream
    assert m2.tool_calls == 0
    sent = json.dumps(mock.records["a"][1])
    assert '"tool_call_id"' in sent or api == "completions"


async def test_why1_the_agent_sends_first_token_for_a_tool_call_turn(
    router: FakeRouter, start_agent: StartAgent
) -> None:
    slow = MockServer(MockSettings(base_ttft_s=0.002, decode_s_per_token=0.03))
    await slow.start()
    ex = OpenAIExecutor([f"http://127.0.0.1:{slow.port}/v1"])
    try:
        await start_agent(executor=ex)
        await router.welcome()
        payload = encode_request(ask("find it", tools=TOOLS))
        await router.send(
            Dispatch(producer="p", credit=Credit(id=7, x_correlation_id="s", payload=payload))
        )
        first = await router.expect(FirstToken, skip=(Heartbeat, InFlightReport))
        done = await router.expect(Completion, skip=(Heartbeat, InFlightReport))
    finally:
        await ex.aclose()
        await slow.stop()
    assert first.credit_id == 7
    assert done.status is Status.COMPLETED
    assert done.ttft_s == first.ttft_s
    result = decode_result(done.result)
    assert result is not None
    assert result.tool_calls == 1
