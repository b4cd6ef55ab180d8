"""The OpenAI executor against the mock server over real HTTP: history, FORK/SPAWN, metrics,
failures, cancellation, the connection pool, several endpoints; and inside a worker agent."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from loadgen.mockserver import MockServer, MockSettings
from protocol.inference import RequestResult, TurnRequest, decode_result, encode_request
from protocol.messages import BranchMode, Completion, Credit, Dispatch, Status
from tests.ports import free_port
from tests.worker_agent.conftest import FakeRouter, StartAgent, until
from worker_agent.core import SessionTable
from worker_agent.executor import ExecResult
from worker_agent.openai import OpenAIExecutor, add_arguments, executor_from_args

pytestmark = pytest.mark.integration

FAST = MockSettings(
    base_ttft_s=0.002, prefill_s_per_token=0.00002, decode_s_per_token=0.001, block_tokens=4
)


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    server = MockServer(FAST)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def url(server: MockServer) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


@pytest.fixture
async def executor(mock: MockServer) -> AsyncIterator[OpenAIExecutor]:
    ex = OpenAIExecutor([url(mock)], request_timeout_s=5.0)
    try:
        yield ex
    finally:
        await ex.aclose()


class Driver:
    """Runs credits through an executor with a session table, as the agent does."""

    def __init__(self, executor: OpenAIExecutor) -> None:
        self.executor = executor
        self.table = SessionTable()
        self.ttfts: list[float] = []
        self.ids = iter(range(1, 10_000))

    async def run(self, xid: str, request: TurnRequest | bytes, **fields: Any) -> ExecResult:
        payload = request if isinstance(request, bytes) else encode_request(request)
        credit = Credit(id=next(self.ids), x_correlation_id=xid, payload=payload, **fields)
        session = self.table.begin(credit)
        result = await self.executor.execute(credit, session, self.ttfts.append)
        completed = result.status is Status.COMPLETED
        self.table.end(credit, session, completed=completed, turn=result.turn)
        return result


def metrics(result: ExecResult) -> RequestResult:
    assert result.status is Status.COMPLETED, result
    decoded = decode_result(result.result)
    assert decoded is not None
    return decoded


def say(text: str, tokens: int = 4) -> TurnRequest:
    return TurnRequest(messages=[{"role": "user", "content": text}], output_tokens=tokens)


async def test_a_conversation_carries_its_history_and_hits_the_cache(executor, mock) -> None:
    d = Driver(executor)
    first = metrics(await d.run("s", say("tell me about the sea " * 8), num_turns=2))
    second = metrics(await d.run("s", say("and the sky?"), turn_index=1, num_turns=2))
    sent = mock.records["s"]
    answer = sent[1]["messages"][1]
    assert sent[1]["messages"][0] == sent[0]["messages"][0]
    assert answer["role"] == "assistant"
    assert len(answer["content"].split()) == 4
    assert sent[1]["messages"][2] == {"role": "user", "content": "and the sky?"}
    assert first.cached_tokens == 0
    assert second.cached_tokens is not None
    assert second.cached_tokens >= first.input_tokens  # the whole first prompt, at least
    assert second.input_tokens == first.input_tokens + 5 + 4  # + the answer + "and the sky?"
    for m in (first, second):
        assert m.output_tokens == 4
        assert m.http_status == 200
        assert m.endpoint == url(mock)
        assert m.ttft_s is not None
        assert m.e2e_s is not None
        assert m.itl_s is not None
        assert 0 < m.ttft_s < m.e2e_s
        assert m.itl_s > 0
    assert len(d.ttfts) == 2  # on_first_token once per credit
    assert "s" not in d.table  # the final turn ended the session
    # Each request's X-Request-ID comes back in its result (records join the server's logs).
    assert [first.request_id, second.request_id] == [r["request_id"] for r in sent]
    assert first.request_id != second.request_id


async def test_fork_children_inherit_the_history_and_spawn_children_do_not(executor, mock) -> None:
    d = Driver(executor)
    parent = await d.run("p", say("plan the work in three parts"), fork_count=1)
    assert parent.status is Status.COMPLETED
    fork = await d.run("f", say("part one"), parent_correlation_id="p", branch_mode=BranchMode.FORK)
    spawn = await d.run(
        "a",
        say("explore the repo"),
        parent_correlation_id="p",
        root_correlation_id="p",
        branch_mode=BranchMode.SPAWN,
    )
    parent_sent = mock.records["p"][0]["messages"]
    fork_sent = mock.records["f"][0]
    spawn_sent = mock.records["a"][0]
    assert fork_sent["messages"][:1] == parent_sent
    assert fork_sent["messages"][1]["role"] == "assistant"
    assert fork_sent["messages"][2:] == [{"role": "user", "content": "part one"}]
    assert spawn_sent["messages"] == [{"role": "user", "content": "explore the repo"}]
    assert (fork_sent["parent"], spawn_sent["parent"], spawn_sent["root"]) == ("p", "p", "p")
    assert metrics(fork).cached_tokens  # the parent's prefix is on this server
    assert metrics(spawn).cached_tokens == 0


async def test_token_counts_become_synthetic_prompts(executor, mock) -> None:
    d = Driver(executor)
    m = metrics(await d.run("s", TurnRequest(input_tokens=40, output_tokens=3)))
    assert m.input_tokens == 41  # 40 words and the role marker
    shared = TurnRequest(input_tokens=16, hash_ids=[7, 8], block_tokens=8, output_tokens=1)
    await d.run("x", shared)
    again = metrics(await d.run("y", shared))
    assert mock.records["x"][0]["messages"] == mock.records["y"][0]["messages"]
    assert again.cached_tokens == 16  # same ids, same text: 4 of the 17 tokens' blocks cached
    longer = TurnRequest(input_tokens=20, hash_ids=[7, 8], block_tokens=8, output_tokens=1)
    await d.run("z", longer)
    tail = mock.records["z"][0]["messages"][0]["content"].split()
    assert tail[:16] == mock.records["x"][0]["messages"][0]["content"].split()
    assert len(tail) == 20  # the blocks fall short: fresh words pad the rest
    default = metrics(await d.run("d", b""))
    assert (default.input_tokens, default.output_tokens) == (257, 128)


async def test_a_session_missing_here_is_padded_to_its_size(executor, mock) -> None:
    d = Driver(executor)
    request = TurnRequest(messages=[{"role": "user", "content": "go on"}], context_tokens=50)
    m = metrics(await d.run("lost", request, turn_index=2, num_turns=4))
    assert m.rebuilt
    assert m.cached_tokens == 0
    assert m.input_tokens == 1 + 50 + 1 + 2
    filler = mock.records["lost"][0]["messages"][0]["content"]
    assert len(filler.split()) == 50
    nxt = TurnRequest(
        messages=[{"role": "user", "content": "more"}], context_tokens=m.input_tokens + 128
    )
    again = metrics(await d.run("lost", nxt, turn_index=3, num_turns=4))
    assert not again.rebuilt  # its own history now holds the filler
    assert again.cached_tokens


async def test_a_stale_history_is_padded_after_what_is_held(executor, mock) -> None:
    d = Driver(executor)
    first = metrics(await d.run("s", say("one " * 40), num_turns=3))
    # Turn 1 ran on another worker (its tokens are in the producer's estimate, not here).
    held = first.input_tokens + first.output_tokens
    request = TurnRequest(messages=[{"role": "user", "content": "three"}], context_tokens=held + 60)
    third = metrics(await d.run("s", request, turn_index=2, num_turns=3))
    assert third.rebuilt
    sent = mock.records["s"][1]["messages"]
    assert sent[:2] == [*mock.records["s"][0]["messages"], sent[1]]  # the held history first
    assert len(sent[2]["content"].split()) == 60  # then the gap
    assert third.cached_tokens is not None
    assert third.cached_tokens >= first.input_tokens  # the held part is still a cache hit
    in_sync = TurnRequest(messages=[{"role": "user", "content": "x"}], context_tokens=0)
    assert not metrics(await d.run("fresh", in_sync)).rebuilt


@pytest.mark.parametrize(
    ("fault", "reason", "status"),
    [
        ("http_503", "http_503", 503),
        ("http_429", "http_429", 429),
        ("malformed", "malformed_stream", 200),
        ("truncate", "stream_incomplete", 200),
        ("disconnect", "stream_broken", 200),
    ],
)
async def test_failures_end_the_credit_failed_with_a_reason(
    executor, fault, reason, status
) -> None:
    d = Driver(executor)
    request = TurnRequest(
        messages=[{"role": "user", "content": "x"}], output_tokens=6, extra={"mock_fault": fault}
    )
    result = await d.run("s", request, num_turns=2)
    assert (result.status, result.reason) == (Status.FAILED, reason)
    detail = decode_result(result.result)
    assert detail is not None
    assert detail.http_status == status
    if fault.startswith("http_"):
        assert "injected fault" in detail.error
    assert len(detail.request_id) == 32  # a failed request's X-Request-ID too
    assert "s" not in d.table  # a failed turn drops the session


async def test_timeouts_refusals_and_bad_payloads_fail_cleanly(mock) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nobody listens
    for endpoint, timeout, request, reason in [
        (dead, 5.0, say("x"), "connection_error"),
        (url(mock), 0.3, TurnRequest(input_tokens=1, extra={"mock_fault": "stall"}), "timeout"),
        (url(mock), 5.0, msgspec.msgpack.encode({"input_tokens": "lots"}), "invalid_payload"),
    ]:
        ex = OpenAIExecutor([endpoint], request_timeout_s=timeout)
        try:
            result = await Driver(ex).run("s", request)
        finally:
            await ex.aclose()
        assert (result.status, result.reason) == (Status.FAILED, reason)


async def test_cancelling_the_task_aborts_the_request_upstream(executor, mock) -> None:
    d = Driver(executor)
    request = TurnRequest(input_tokens=3, extra={"mock_fault": "stall"})
    task = asyncio.create_task(d.run("s", request))
    await until(lambda: mock.stats.active == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: mock.stats.active == 0)
    assert mock.stats.disconnected == 1


async def test_the_connection_pool_is_bounded(mock) -> None:
    ex = OpenAIExecutor([url(mock)], pool_size=2)
    try:
        d = Driver(ex)
        results = await asyncio.gather(*(d.run(f"s{i}", say("x", 20)) for i in range(6)))
    finally:
        await ex.aclose()
    assert all(r.status is Status.COMPLETED for r in results)
    assert mock.stats.max_active == 2


async def test_sessions_spread_over_endpoints_and_keep_theirs(mock) -> None:
    other = MockServer(FAST)
    await other.start()
    ex = OpenAIExecutor([url(mock), url(other)])
    try:
        d = Driver(ex)
        roots = await asyncio.gather(
            *(d.run(f"r{i}", say("hello there"), num_turns=2, fork_count=1) for i in range(4))
        )
        homes = [metrics(r).endpoint for r in roots]
        assert sorted(homes) == sorted([url(mock), url(other)] * 2)  # least busy, in turn
        for i, home in enumerate(homes):
            turn = await d.run(f"r{i}", say("again"), turn_index=1, num_turns=2)
            fork = await d.run(
                f"k{i}", say("fork"), parent_correlation_id=f"r{i}", branch_mode=BranchMode.FORK
            )
            assert metrics(turn).endpoint == home
            assert metrics(fork).endpoint == home
            assert metrics(fork).cached_tokens
    finally:
        await ex.aclose()
        await other.stop()


async def test_without_streaming_there_is_no_ttft_but_tokens_are_counted(mock) -> None:
    ex = OpenAIExecutor([url(mock)], stream=False)
    try:
        m = metrics(await Driver(ex).run("s", say("a b c", 5)))
    finally:
        await ex.aclose()
    assert m.ttft_s is None
    assert m.itl_s is None
    assert m.output_tokens == 5
    assert m.e2e_s is not None


async def test_the_agent_reports_cancel_after_s_as_a_client_disconnect(
    router: FakeRouter, start_agent: StartAgent, mock: MockServer
) -> None:
    ex = OpenAIExecutor([url(mock)])
    await start_agent(executor=ex)
    await router.welcome()
    payload = encode_request(TurnRequest(input_tokens=5, extra={"mock_fault": "stall"}))
    await router.send(
        Dispatch(
            producer="p",
            credit=Credit(id=1, x_correlation_id="s", cancel_after_s=0.1, payload=payload),
        )
    )
    done = await router.expect(Completion)
    assert (done.status, done.reason) == (Status.CANCELLED, "client_disconnect")
    await until(lambda: mock.stats.disconnected == 1)


def test_command_line_builds_the_executor() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--executor", default="sim")
    parser.add_argument("--capacity", type=int, default=16)
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--executor",
            "openai",
            "--endpoint",
            "http://a:1/v1",
            "--endpoint",
            "http://b:2/v1/chat/completions",
            "--header",
            "X-Team: bench",
            "--extra-body",
            '{"temperature": 0}',
        ]
    )
    ex = executor_from_args(args)
    assert isinstance(ex, OpenAIExecutor)
    assert [e.url for e in ex.endpoints] == [
        "http://a:1/v1/chat/completions",
        "http://b:2/v1/chat/completions",
    ]
    assert ex.pool_size == 16
    assert ex.headers["X-Team"] == "bench"
    assert ex.extra_body == {"temperature": 0}
    assert executor_from_args(parser.parse_args([])) is None
    for bad in (
        ["--executor", "openai"],
        ["--endpoint", "ftp://x"],
        ["--header", "nocolon"],
        ["--extra-body", "[1]"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


async def test_http_errors_name_the_server_message(mock) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"messages": [{"role": "user", "content": "x"}], "mock_fault": "http_500"}
        async with http.post(f"{url(mock)}/chat/completions", json=body) as r:
            assert r.status == 500
    ex = OpenAIExecutor([url(mock)])
    try:
        request = TurnRequest(input_tokens=1, extra={"mock_fault": "http_500"})
        result = await Driver(ex).run("s", request)
    finally:
        await ex.aclose()
    detail = decode_result(result.result)
    assert detail is not None
    assert detail.error == "injected fault http_500"
    assert ex.failures == {"http_500": 1}


async def test_token_counters_sum_what_the_server_reported(executor, mock) -> None:
    """``/metrics``' token counters (``executor.tokens``) add up the completed credits' usage,
    with the report's definitions (issue 13)."""
    d = Driver(executor)
    first = metrics(await d.run("t", say("count these words " * 4), num_turns=2))
    second = metrics(await d.run("t", say("and these"), turn_index=1, num_turns=2))
    tokens = executor.tokens
    assert tokens.prompt == first.input_tokens + second.input_tokens
    assert tokens.prompt_cache_reported == tokens.prompt  # the mock reports cached tokens
    assert tokens.cached == (first.cached_tokens or 0) + (second.cached_tokens or 0) > 0
    assert tokens.completion == first.output_tokens + second.output_tokens
    assert tokens.reasoning == 0


async def test_reasoning_tokens_are_counted() -> None:
    """A server that reports ``completion_tokens_details.reasoning_tokens`` (OpenAI's usage
    format for reasoning models): counted, as part of the completion."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "choices": [{"message": {"role": "assistant", "content": "ok"}}],
                "usage": {
                    "prompt_tokens": 12,
                    "completion_tokens": 30,
                    "completion_tokens_details": {"reasoning_tokens": 28},
                },
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    ex = OpenAIExecutor([f"http://127.0.0.1:{port}/v1"], stream=False, request_timeout_s=5.0)
    try:
        result = metrics(await Driver(ex).run("r", say("think")))
        assert result.output_tokens == 30
        assert (ex.tokens.prompt, ex.tokens.completion, ex.tokens.reasoning) == (12, 30, 28)
        assert ex.tokens.prompt_cache_reported == 0  # no cached_tokens reported
    finally:
        await ex.aclose()
        await runner.cleanup()
