"""A mock OpenAI-compatible inference server with a prefix cache: ``credit-router mock-server``.

It serves ``POST /v1/chat/completions`` (streaming as server-sent events, or one JSON body) like
a real engine would, minus the model. What makes it useful to a credit router is its cost model:

* **Tokens** are whitespace-separated words of the messages' text, plus one role marker per
  message (``<|user|>``). The prompt's token stream is cut into blocks of ``block_tokens``; each
  block's hash chains its predecessor's, as vLLM's automatic prefix caching keys KV blocks, so two
  prompts share a block exactly when they share the whole prefix up to it.
* **Prefix cache**: an LRU set of block hashes per server. A request's leading blocks that are
  cached are ``cached_tokens``; the prompt's blocks are inserted after prefill, and the prompt
  plus the generated answer after decode, so the next turn of a conversation (history + answer +
  new message) finds its whole history cached *on the server that answered it*, and nowhere else.
* **Time to first token** = ``base_ttft_s`` + uncached prompt tokens × ``prefill_s_per_token``;
  then one token every ``decode_s_per_token``. ``max_concurrency`` (0: unbounded) queues
  requests beyond it, and the wait counts in their TTFT.
* **Output** is exactly ``max_tokens`` words (``finish_reason: "length"``), chosen
  deterministically from the prompt's last block, and ``usage`` reports ``prompt_tokens``,
  ``completion_tokens`` and ``prompt_tokens_details.cached_tokens``.

**Agentic answers.** A request that offers ``tools`` (and no ``"tool_choice": "none"``) is
answered, unless its last message is a tool result, with one call of its first tool whose
arguments (``{"input": "<max_tokens words>"}``) stream in one fragment per token, ending
``finish_reason: "tool_calls"``. A conversation that carries a tool result for a call not made
by the assistant message before it is refused (400), as OpenAI does. **Reasoning**:
``reasoning_tokens`` (or a body's ``mock_reasoning_tokens``) words of thinking stream before the
answer in ``delta.reasoning`` (``reasoning_field``: or ``reasoning_content``), are counted in
``completion_tokens`` and in ``completion_tokens_details.reasoning_tokens``, and are cached with
the answer, so a next turn that replays them as content would be seen in its prompt.

Besides ``/v1/chat/completions`` it serves legacy ``/v1/completions`` (``prompt``; events carry
``choices[].text``) and ``/v1/responses`` (``input`` items; ``response.*`` events, reasoning as
``response.reasoning_text.delta``, calls as ``response.function_call_arguments.delta``, usage
in ``response.completed``) with the same cost model.

For tests and debugging it records, per ``X-Correlation-ID``, what each request carried (its
messages and the parent id header): ``GET /mock/sessions/{id}``. ``GET /mock/stats`` returns the
counters (requests, prompt and cached tokens, disconnects), ``POST /mock/reset`` clears cache,
counters and records. A request body may carry ``"mock_fault"`` (``http_503``, ``http_429``,
``http_500``, ``malformed``, ``truncate``, ``disconnect``, ``stall``; and half way through the
stream: ``error_event``, an ``event: error`` whose data is ``{"type": "error", "message": …}``
followed by ``[DONE]``; ``error_chunk``, a ``data: {"error": {"message": …}}``; ``long_event``,
one content event longer than ``long_event_bytes``) to make that request fail that way;
``fault_rate`` fails that fraction of requests with ``http_503``.

A client that disconnects cancels its request (the handler is cancelled, as a real engine aborts
the sequence): the disconnect is counted and nothing more is cached for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Final

import msgspec
from aiohttp import web

from protocol.inference import WORDS
from worker_agent.executor import PrefixCache

__all__ = ["BlockCache", "MockServer", "MockSettings", "block_hashes", "tokenize"]

logger = logging.getLogger(__name__)

FAULTS: Final = frozenset(
    {
        "http_503",
        "http_429",
        "http_500",
        "malformed",
        "truncate",
        "disconnect",
        "stall",
        "error_event",
        "error_chunk",
        "long_event",
    }
)
REASONING_FIELDS: Final = ("reasoning", "reasoning_content")
_RECORDS_PER_SESSION: Final = 256


@dataclass(frozen=True)
class MockSettings:
    """The mock server's cost model and limits (all durations in seconds).

    Attributes:
        model: the model name it reports (any requested name is accepted).
        base_ttft_s: fixed part of the time to first token.
        prefill_s_per_token: prefill time per uncached prompt token.
        decode_s_per_token: time between two generated tokens.
        block_tokens: tokens per KV block (the cache's unit).
        cache_blocks: the prefix cache's capacity, in blocks.
        tokens_per_chunk: generated tokens per streamed event.
        max_concurrency: requests served at once (0: unbounded); the others wait their turn.
        default_max_tokens: output length when a request gives no ``max_tokens``.
        fault_rate: fraction of requests answered ``503`` at random.
        record_sessions: sessions whose requests are kept for ``/mock/sessions`` (LRU; 0: none).
        seed: seeds the random faults.
        reasoning_tokens: words of reasoning streamed before every answer (0: none).
        reasoning_field: the delta field reasoning streams in: ``reasoning`` (vLLM ≥ 0.10)
            or ``reasoning_content`` (DeepSeek, SGLang, older vLLM).
        tool_calls: answer a request that offers tools with a call of its first tool.
        long_event_bytes: size of the ``long_event`` fault's one event.
    """

    model: str = "mock"
    base_ttft_s: float = 0.02
    prefill_s_per_token: float = 0.00005
    decode_s_per_token: float = 0.008
    block_tokens: int = 16
    cache_blocks: int = 32_768
    tokens_per_chunk: int = 1
    max_concurrency: int = 0
    default_max_tokens: int = 64
    fault_rate: float = 0.0
    record_sessions: int = 1_000
    seed: int = 0
    reasoning_tokens: int = 0
    reasoning_field: str = "reasoning"
    tool_calls: bool = True
    long_event_bytes: int = 600 << 10

    def __post_init__(self) -> None:
        if self.reasoning_field not in REASONING_FIELDS:
            raise ValueError(f"reasoning_field must be one of {REASONING_FIELDS}")
        if self.reasoning_tokens < 0 or self.long_event_bytes < 1:
            raise ValueError("reasoning_tokens must be >= 0 and long_event_bytes >= 1")
        if self.block_tokens < 1 or self.cache_blocks < 1 or self.tokens_per_chunk < 1:
            raise ValueError("block_tokens, cache_blocks and tokens_per_chunk must be >= 1")
        if min(self.base_ttft_s, self.prefill_s_per_token, self.decode_s_per_token) < 0:
            raise ValueError("modelled times must be >= 0")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {self.fault_rate}")


class _ChatRequest(msgspec.Struct, kw_only=True):
    """The fields of a request body the mock reads (others are accepted and ignored): chat
    ``messages``, legacy ``prompt`` or Responses ``input``, turned into ``messages``."""

    messages: list[dict[str, Any]] = []
    prompt: Any = None
    input: Any = None
    model: str = ""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_output_tokens: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    mock_fault: str | None = None
    mock_reasoning_tokens: int | None = None


class _BadRequest(Exception):
    """A request the mock answers with 400 (the message goes into the OpenAI error body)."""


_chat_decoder: Final = msgspec.json.Decoder(_ChatRequest)
_json: Final = msgspec.json.Encoder()


# The server's prefix cache is the simulated GPU host's: one LRU of block hashes, one model.
BlockCache = PrefixCache


def _text(content: object) -> str:
    """The text of a message's ``content``: a string, or the text parts of a parts list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def tokenize(messages: list[dict[str, Any]]) -> list[str]:
    """The mock's token stream of a prompt: per message, a role marker and its words (and for
    an assistant's tool calls, each call's name and the words of its arguments)."""
    tokens: list[str] = []
    for message in messages:
        tokens.append(f"<|{message.get('role', '')}|>")
        tokens.extend(_text(message.get("content")).split())
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                tokens.append(str(fn.get("name", "")))
                tokens.extend(str(fn.get("arguments", "")).split())
    return tokens


def _call_arguments(words: list[str]) -> list[str]:
    """A tool call's arguments as one fragment per word: ``{"input": "w1 w2 …"}``."""
    if not words:
        return ['{"input": ""}']
    pieces = [f" {w}" for w in words]
    pieces[0] = '{"input": "' + words[0]
    pieces[-1] += '"}'
    return pieces


def _from_responses_input(items: Any) -> list[dict[str, Any]]:
    """Responses ``input`` (a string, or items) as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise _BadRequest("input must be a string or a list of items")
    messages: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            raise _BadRequest("input items must be objects")
        kind = item.get("type", "message")
        if kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if messages and messages[-1].get("role") == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")}
            )
        elif kind == "message":
            messages.append({"role": item.get("role"), "content": item.get("content")})
    return messages


def _check_tool_results(messages: list[dict[str, Any]]) -> None:
    """Refuse what OpenAI refuses (400): a tool result that answers no call of the assistant
    message before it, and an assistant's call left unanswered before the next other message."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            if message.get("tool_call_id") not in calls:
                raise _BadRequest(
                    f"messages[{i}]: a 'tool' message must answer a 'tool_calls' entry of the "
                    f"assistant message before it (tool_call_id "
                    f"{message.get('tool_call_id')!r})"
                )
            calls.discard(str(message.get("tool_call_id")))
            continue
        if calls:
            raise _BadRequest(
                f"messages[{i}]: an assistant message with 'tool_calls' must be followed by "
                f"tool messages answering each of them (missing {sorted(calls)})"
            )
        if role == "assistant":
            calls = {
                str(c.get("id")) for c in message.get("tool_calls") or () if isinstance(c, dict)
            }


def block_hashes(tokens: list[str], block_tokens: int) -> list[int]:
    """One chained hash per full block of ``tokens`` (a partial last block is not cacheable)."""
    hashes = []
    previous = 0
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        previous = hash((previous, *tokens[start : start + block_tokens]))
        hashes.append(previous)
    return hashes


class _Stats:
    """The counters ``/mock/stats`` shows."""

    def __init__(self) -> None:
        self.requests = 0
        self.completed = 0
        self.failed = 0
        self.disconnected = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.active = 0
        self.max_active = 0

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(vars(self))
        doc["cache_hit_rate"] = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0
        return doc


class _Plan(msgspec.Struct):
    """What one request will cost and produce."""

    prompt: list[str]
    hashes: list[int]
    cached_tokens: int
    max_tokens: int
    ttft_s: float
    output: list[str]
    reasoning: list[str] = []
    tool: str | None = None
    """The tool to call instead of answering in text."""
    call_id: str = ""

    @property
    def completion_tokens(self) -> int:
        return len(self.reasoning) + len(self.output)

    def answer_tokens(self) -> list[str]:
        """The answer as the next turn's prompt tokenizes it (the call's name and arguments)."""
        if self.tool is None:
            return self.output
        return [self.tool, *"".join(_call_arguments(self.output)).split()]


class MockServer:
    """The mock's aiohttp application and state (cache, counters, records).

    Args:
        settings: the cost model and limits.
    """

    def __init__(self, settings: MockSettings | None = None) -> None:
        self.settings = settings or MockSettings()
        self.cache = BlockCache(self.settings.cache_blocks)
        self.stats = _Stats()
        self.records: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._rng = random.Random(self.settings.seed)
        self._ids = itertools.count(1)
        self._slots = (
            asyncio.Semaphore(self.settings.max_concurrency)
            if self.settings.max_concurrency
            else None
        )
        self._runner: web.AppRunner | None = None
        self.port = 0

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<MockServer port={self.port} requests={s.requests} active={s.active} "
            f"cached={s.cached_tokens}/{s.prompt_tokens} cache={len(self.cache)} blocks>"
        )

    # ------------------------------------------------------------------ life cycle

    def app(self) -> web.Application:
        """The aiohttp application (routes only; ``start`` runs it)."""
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/mock/stats", self._stats)
        app.router.add_get("/mock/sessions/{xid}", self._session)
        app.router.add_post("/mock/reset", self._reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``host:port`` (0: a free port); returns the port."""
        # handler_cancellation: a client that goes away cancels its request, as an engine
        # aborts the sequence (and a stalled handler does not outlive its client).
        self._runner = web.AppRunner(
            self.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        logger.info("mock server listening on http://%s:%d/v1", host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop serving (requests still running are cancelled)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ the model

    def plan(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int,
        *,
        reasoning_tokens: int = 0,
        tool: str | None = None,
    ) -> _Plan:
        """Tokenize, look the prefix up in the cache, and decide the TTFT and the output."""
        s = self.settings
        prompt = tokenize(messages)
        hashes = block_hashes(prompt, s.block_tokens)
        cached = min(self.cache.match(hashes) * s.block_tokens, len(prompt))
        ttft = s.base_ttft_s + (len(prompt) - cached) * s.prefill_s_per_token
        rng = random.Random(hashes[-1] if hashes else len(prompt))
        reasoning = rng.choices(WORDS, k=reasoning_tokens) if reasoning_tokens else []
        output = rng.choices(WORDS, k=max_tokens)
        call_id = f"call_{next(self._ids)}" if tool is not None else ""
        return _Plan(prompt, hashes, cached, max_tokens, ttft, output, reasoning, tool, call_id)

    def _remember(self, plan: _Plan) -> None:
        """Cache the prompt and what was generated: a next turn that replays the answer finds
        its history cached up to the answer (and past it only if it replays the reasoning)."""
        stream = [*plan.prompt, "<|assistant|>", *plan.reasoning, *plan.answer_tokens()]
        self.cache.insert(block_hashes(stream, self.settings.block_tokens))

    def _record(self, request: web.Request, body: _ChatRequest, plan: _Plan) -> None:
        xid = request.headers.get("X-Correlation-ID")
        if not xid or not self.settings.record_sessions:
            return
        records = self.records.get(xid)
        if records is None:
            records = self.records[xid] = []
            while len(self.records) > self.settings.record_sessions:
                self.records.popitem(last=False)
        else:
            self.records.move_to_end(xid)
        if len(records) < _RECORDS_PER_SESSION:
            records.append(
                {
                    "at_s": time.time(),
                    "parent": request.headers.get("X-Parent-Correlation-ID"),
                    "root": request.headers.get("X-Root-Correlation-ID"),
                    "request_id": request.headers.get("X-Request-ID"),
                    "messages": body.messages,
                    "prompt_tokens": len(plan.prompt),
                    "cached_tokens": plan.cached_tokens,
                    "max_tokens": plan.max_tokens,
                    "stream": body.stream,
                }
            )

    # ------------------------------------------------------------------ handlers

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "responses")

    async def _generate(self, request: web.Request, api: str) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        try:
            body = self._parse(await request.read(), api)
        except _BadRequest as exc:
            stats.failed += 1
            return _error(400, str(exc), "invalid_request_error")
        fault = body.mock_fault
        if (
            fault is None
            and self.settings.fault_rate
            and self._rng.random() < self.settings.fault_rate
        ):
            fault = "http_503"
        if fault is not None and fault.startswith("http_"):
            stats.failed += 1
            return _error(int(fault[5:]), f"injected fault {fault}", "server_error")
        max_tokens = body.max_completion_tokens or body.max_tokens or body.max_output_tokens
        if max_tokens is None:
            max_tokens = self.settings.default_max_tokens
        reasoning = body.mock_reasoning_tokens
        plan = self.plan(
            body.messages,
            max_tokens,
            # Legacy completions stream text only: no reasoning, no tool calls.
            reasoning_tokens=0
            if api == "completions"
            else self.settings.reasoning_tokens
            if reasoning is None
            else reasoning,
            tool=self._tool(body) if api != "completions" else None,
        )
        self._record(request, body, plan)
        stats.active += 1
        stats.max_active = max(stats.max_active, stats.active)
        try:
            if self._slots is None:
                return await self._serve(request, body, plan, fault, api)
            queued_at = time.perf_counter()
            async with self._slots:
                waited = time.perf_counter() - queued_at
                plan.ttft_s += waited
                return await self._serve(request, body, plan, fault, api)
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            stats.disconnected += 1
            raise
        finally:
            stats.active -= 1

    def _tool(self, body: _ChatRequest) -> str | None:
        """The tool this request's answer calls, if any (the first one offered)."""
        if not self.settings.tool_calls or not body.tools or body.tool_choice == "none":
            return None
        if body.messages and body.messages[-1].get("role") == "tool":
            return None  # the tool's result came back: answer in text
        first = body.tools[0]
        fn: Any = first.get("function")
        if not isinstance(fn, dict):
            fn = first  # the Responses API's flat form
        return str(fn.get("name") or "tool")

    def _parse(self, raw: bytes, api: str = "chat") -> _ChatRequest:
        try:
            body = _chat_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise _BadRequest(f"invalid request body: {exc}") from None
        if api == "completions":
            if not isinstance(body.prompt, str) or not body.prompt:
                raise _BadRequest("prompt must be a non-empty string")
            body.messages = [{"role": "user", "content": body.prompt}]
        elif api == "responses":
            body.messages = _from_responses_input(body.input)
        if not body.messages:
            raise _BadRequest("messages must not be empty")
        for i, message in enumerate(body.messages):
            if not isinstance(message.get("role"), str):
                raise _BadRequest(f"messages[{i}] has no role")
        _check_tool_results(body.messages)
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = getattr(body, name)
            if value is not None and not 0 <= value <= 1_000_000:
                raise _BadRequest(f"{name} must be within [0, 1000000], got {value}")
        reasoning = body.mock_reasoning_tokens
        if reasoning is not None and not 0 <= reasoning <= 1_000_000:
            raise _BadRequest(f"mock_reasoning_tokens must be within [0, 1000000]: {reasoning}")
        if body.mock_fault is not None and body.mock_fault not in FAULTS:
            raise _BadRequest(f"unknown mock_fault {body.mock_fault!r}; one of {sorted(FAULTS)}")
        return body

    async def _serve(
        self,
        request: web.Request,
        body: _ChatRequest,
        plan: _Plan,
        fault: str | None,
        api: str = "chat",
    ) -> web.StreamResponse:
        if body.stream:
            return await self._stream(request, body, plan, fault, api)
        tokens = plan.completion_tokens
        await asyncio.sleep(plan.ttft_s + tokens * self.settings.decode_s_per_token)
        self.cache.insert(plan.hashes)
        self._remember(plan)
        self._account(plan)
        fmt = _FORMATS[api](f"{next(self._ids)}", body.model or self.settings.model, self)
        return web.json_response(fmt.whole(plan), dumps=lambda doc: _json.encode(doc).decode())

    async def _stream(
        self,
        request: web.Request,
        body: _ChatRequest,
        plan: _Plan,
        fault: str | None,
        api: str = "chat",
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            await self._events(request, response, body, plan, fault, api)
        except ConnectionResetError:  # a write after the client left, before the cancellation
            self.stats.disconnected += 1
        return response

    async def _events(
        self,
        request: web.Request,
        response: web.StreamResponse,
        body: _ChatRequest,
        plan: _Plan,
        fault: str | None,
        api: str,
    ) -> None:
        if fault == "stall":
            await asyncio.sleep(3_600)
        await asyncio.sleep(plan.ttft_s)
        self.cache.insert(plan.hashes)  # prefill done: the prompt's KV is cached
        if fault == "malformed":
            self.stats.failed += 1
            await response.write(b"data: {this is not json\n\n")
            return
        fmt = _FORMATS[api](f"{next(self._ids)}", body.model or self.settings.model, self)
        head = fmt.start(plan)
        if head:
            await response.write(head)
        pieces = _pieces(plan)
        step = self.settings.tokens_per_chunk
        decode = self.settings.decode_s_per_token * step
        for start in range(0, len(pieces), step):
            if start:
                await asyncio.sleep(decode)
            if (
                fault is not None
                and start >= len(pieces) // 2
                and await self._fault(request, response, fault, fmt)
            ):
                return
            group = pieces[start : start + step]
            last = start + step >= len(pieces)
            await response.write(fmt.pieces(group, plan, last))
        await response.write(fmt.end(plan, bool((body.stream_options or {}).get("include_usage"))))
        self._remember(plan)
        self._account(plan)

    async def _fault(
        self, request: web.Request, response: web.StreamResponse, fault: str, fmt: _Format
    ) -> bool:
        """Break the stream half way as ``fault`` says; whether the stream ends here."""
        if fault == "long_event":
            padding = "x" * self.settings.long_event_bytes
            await response.write(fmt.pieces([("content", padding)], None, False))
            return False
        self.stats.failed += 1
        if fault == "error_event":
            message = "injected fault error_event: the engine failed mid-stream"
            event: dict[str, Any] = {"type": "error", "code": "server_error", "message": message}
            await response.write(_sse(event, event="error") + b"data: [DONE]\n\n")
        elif fault == "error_chunk":
            message = "injected fault error_chunk: the engine failed mid-stream"
            doc = {"error": {"message": message, "type": "server_error", "code": 500}}
            await response.write(_sse(doc) + b"data: [DONE]\n\n")
        elif fault == "disconnect" and request.transport is not None:
            request.transport.close()
        return True

    def _account(self, plan: _Plan) -> None:
        stats = self.stats
        stats.completed += 1
        stats.prompt_tokens += len(plan.prompt)
        stats.cached_tokens += plan.cached_tokens
        stats.output_tokens += plan.completion_tokens

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.settings.model, "object": "model"}]}
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _stats(self, request: web.Request) -> web.Response:
        doc = self.stats.as_dict()
        doc["cache_blocks"] = len(self.cache)
        doc["cache_evicted"] = self.cache.evicted
        doc["settings"] = asdict(self.settings)
        return web.json_response(doc)

    async def _session(self, request: web.Request) -> web.Response:
        records = self.records.get(request.match_info["xid"])
        if records is None:
            return _error(404, "no requests recorded for this session", "not_found")
        return web.json_response({"requests": records})

    async def _reset(self, request: web.Request) -> web.Response:
        self.cache.clear()
        self.stats = _Stats()
        self.records.clear()
        return web.Response(text="reset\n")


def _usage(plan: _Plan) -> dict[str, Any]:
    prompt = len(plan.prompt)
    completion = plan.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": len(plan.reasoning)},
    }


def _sse(doc: dict[str, Any], event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + _json.encode(doc) + b"\n\n"


def _pieces(plan: _Plan) -> list[tuple[str, str]]:
    """What streams, one token a piece: reasoning words, then the answer's words (or its
    call's argument fragments)."""
    pieces = [("reasoning", (" " if i else "") + w) for i, w in enumerate(plan.reasoning)]
    if plan.tool is not None:
        pieces.extend(("tool", f) for f in _call_arguments(plan.output))
    else:
        pieces.extend(("content", (" " if i else "") + w) for i, w in enumerate(plan.output))
    return pieces


class _Format:
    """How one API writes a stream (chat completions here; subclasses for the others)."""

    def __init__(self, rid: str, model: str, server: MockServer) -> None:
        self.rid = f"chatcmpl-{rid}"
        self.model = model
        self.field = server.settings.reasoning_field
        self.named = False

    def start(self, plan: _Plan) -> bytes:
        return b""

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        return _sse(
            {
                "id": self.rid,
                "object": "chat.completion.chunk",
                "model": self.model,
                "choices": [{"index": 0, **choice}],
            }
        )

    def pieces(self, group: list[tuple[str, str]], plan: _Plan | None, last: bool) -> bytes:
        """Events for ``group``'s tokens; ``last``: they end the answer (a finish reason)."""
        out = []
        for i, (kind, text) in enumerate(group):
            delta: dict[str, Any] = {"role": "assistant"}
            if kind == "reasoning":
                delta[self.field] = text
            elif kind == "content":
                delta["content"] = text
            else:
                fn: dict[str, Any] = {"arguments": text}
                call: dict[str, Any] = {"index": 0, "function": fn}
                if not self.named and plan is not None:
                    # The first fragment names the call, as OpenAI and vLLM stream it.
                    call.update(id=plan.call_id, type="function")
                    fn["name"] = plan.tool
                    self.named = True
                delta["tool_calls"] = [call]
            finish = None
            if last and plan is not None and i == len(group) - 1:
                finish = "tool_calls" if plan.tool is not None else "length"
            out.append(self._chunk({"delta": delta, "finish_reason": finish}))
        return b"".join(out)

    def end(self, plan: _Plan, include_usage: bool) -> bytes:
        tail = b""
        if include_usage:
            doc = {"id": self.rid, "object": "chat.completion.chunk", "model": self.model}
            tail = _sse({**doc, "choices": [], "usage": _usage(plan)})
        return tail + b"data: [DONE]\n\n"

    def whole(self, plan: _Plan) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": " ".join(plan.output)}
        if plan.reasoning:
            message[self.field] = " ".join(plan.reasoning)
        if plan.tool is not None:
            message["content"] = None
            message["tool_calls"] = [_chat_call(plan)]
        return {
            "id": self.rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if plan.tool is not None else "length",
                }
            ],
            "usage": _usage(plan),
        }


def _chat_call(plan: _Plan) -> dict[str, Any]:
    return {
        "id": plan.call_id,
        "type": "function",
        "function": {"name": plan.tool, "arguments": "".join(_call_arguments(plan.output))},
    }


class _CompletionsFormat(_Format):
    def __init__(self, rid: str, model: str, server: MockServer) -> None:
        super().__init__(rid, model, server)
        self.rid = f"cmpl-{rid}"

    def pieces(self, group: list[tuple[str, str]], plan: _Plan | None, last: bool) -> bytes:
        text = "".join(t for kind, t in group if kind == "content")
        doc = {
            "id": self.rid,
            "object": "text_completion",
            "model": self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": "length" if last else None}],
        }
        return _sse(doc)

    def whole(self, plan: _Plan) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "text": " ".join(plan.output), "finish_reason": "length"}],
            "usage": _usage(plan),
        }


class _ResponsesFormat(_Format):
    def __init__(self, rid: str, model: str, server: MockServer) -> None:
        super().__init__(rid, model, server)
        self.rid = f"resp_{rid}"
        self.seq = 0
        self.item = ""

    def _event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return _sse({"type": kind, "sequence_number": self.seq, **fields}, event=kind)

    def _response(self, plan: _Plan, status: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.rid,
            "object": "response",
            "status": status,
            "model": self.model,
            "output": [],
        }
        if status == "completed":
            doc["output"] = self.whole(plan)["output"]
            u = _usage(plan)
            doc["usage"] = {
                "input_tokens": u["prompt_tokens"],
                "input_tokens_details": u["prompt_tokens_details"],
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": u["completion_tokens_details"],
                "total_tokens": u["total_tokens"],
            }
        return doc

    def start(self, plan: _Plan) -> bytes:
        self.item = f"fc_{self.rid}" if plan.tool is not None else f"msg_{self.rid}"
        head = self._event("response.created", response=self._response(plan, "in_progress"))
        item: dict[str, Any]
        if plan.tool is not None:
            item = {
                "type": "function_call",
                "id": self.item,
                "call_id": plan.call_id,
                "name": plan.tool,
                "arguments": "",
                "status": "in_progress",
            }
        else:
            item = {"type": "message", "id": self.item, "role": "assistant", "content": []}
        return head + self._event("response.output_item.added", output_index=0, item=item)

    def pieces(self, group: list[tuple[str, str]], plan: _Plan | None, last: bool) -> bytes:
        out = []
        for kind, text in group:
            if kind == "reasoning":
                out.append(self._event("response.reasoning_text.delta", item_id="rs", delta=text))
            elif kind == "content":
                out.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=self.item,
                        output_index=0,
                        content_index=0,
                        delta=text,
                    )
                )
            else:
                out.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self.item,
                        output_index=0,
                        delta=text,
                    )
                )
        return b"".join(out)

    def end(self, plan: _Plan, include_usage: bool) -> bytes:
        item = self.whole(plan)["output"][0]
        return self._event("response.output_item.done", output_index=0, item=item) + self._event(
            "response.completed", response=self._response(plan, "completed")
        )

    def whole(self, plan: _Plan) -> dict[str, Any]:
        if plan.tool is not None:
            call = _chat_call(plan)
            item: dict[str, Any] = {
                "type": "function_call",
                "id": f"fc_{self.rid}",
                "call_id": plan.call_id,
                "name": plan.tool,
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
        else:
            text = " ".join(plan.output)
            item = {
                "type": "message",
                "id": f"msg_{self.rid}",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        u = _usage(plan)
        return {
            "id": self.rid,
            "object": "response",
            "status": "completed",
            "model": self.model,
            "output": [item],
            "usage": {
                "input_tokens": u["prompt_tokens"],
                "input_tokens_details": u["prompt_tokens_details"],
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": u["completion_tokens_details"],
                "total_tokens": u["total_tokens"],
            },
        }


_FORMATS: Final[dict[str, type[_Format]]] = {
    "chat": _Format,
    "completions": _CompletionsFormat,
    "responses": _ResponsesFormat,
}


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}}, status=status
    )


async def serve(settings: MockSettings, host: str, port: int, stop: asyncio.Event) -> None:
    """Run a mock server until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
    server = MockServer(settings)
    await server.start(host, port)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.stop()
        logger.info("mock server stopped: %s", server.stats.as_dict())
