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

For tests and debugging it records, per ``X-Correlation-ID``, what each request carried (its
messages and the parent id header): ``GET /mock/sessions/{id}``. ``GET /mock/stats`` returns the
counters (requests, prompt and cached tokens, disconnects), ``POST /mock/reset`` clears cache,
counters and records. A request body may carry ``"mock_fault"`` (``http_503``, ``http_429``,
``http_500``, ``malformed``, ``truncate``, ``disconnect``, ``stall``) to make that request fail
that way; ``fault_rate`` fails that fraction of requests with ``http_503``.

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
    {"http_503", "http_429", "http_500", "malformed", "truncate", "disconnect", "stall"}
)
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

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.cache_blocks < 1 or self.tokens_per_chunk < 1:
            raise ValueError("block_tokens, cache_blocks and tokens_per_chunk must be >= 1")
        if min(self.base_ttft_s, self.prefill_s_per_token, self.decode_s_per_token) < 0:
            raise ValueError("modelled times must be >= 0")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {self.fault_rate}")


class _ChatRequest(msgspec.Struct, kw_only=True):
    """The fields of a chat-completions body the mock reads (others are accepted and ignored)."""

    messages: list[dict[str, Any]]
    model: str = ""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    mock_fault: str | None = None


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
    """The mock's token stream of a prompt: per message, a role marker and its words."""
    tokens: list[str] = []
    for message in messages:
        tokens.append(f"<|{message.get('role', '')}|>")
        tokens.extend(_text(message.get("content")).split())
    return tokens


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

    def plan(self, messages: list[dict[str, Any]], max_tokens: int) -> _Plan:
        """Tokenize, look the prefix up in the cache, and decide the TTFT and the output."""
        s = self.settings
        prompt = tokenize(messages)
        hashes = block_hashes(prompt, s.block_tokens)
        cached = min(self.cache.match(hashes) * s.block_tokens, len(prompt))
        ttft = s.base_ttft_s + (len(prompt) - cached) * s.prefill_s_per_token
        rng = random.Random(hashes[-1] if hashes else len(prompt))
        output = rng.choices(WORDS, k=max_tokens)
        return _Plan(prompt, hashes, cached, max_tokens, ttft, output)

    def _remember(self, plan: _Plan) -> None:
        """Cache the prompt and the answer (the next turn's prompt starts with both)."""
        stream = [*plan.prompt, "<|assistant|>", *plan.output]
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
                    "messages": body.messages,
                    "prompt_tokens": len(plan.prompt),
                    "cached_tokens": plan.cached_tokens,
                    "max_tokens": plan.max_tokens,
                    "stream": body.stream,
                }
            )

    # ------------------------------------------------------------------ handlers

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        try:
            body = self._parse(await request.read())
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
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = self.settings.default_max_tokens
        plan = self.plan(body.messages, max_tokens)
        self._record(request, body, plan)
        stats.active += 1
        stats.max_active = max(stats.max_active, stats.active)
        try:
            if self._slots is None:
                return await self._serve(request, body, plan, fault)
            queued_at = time.perf_counter()
            async with self._slots:
                waited = time.perf_counter() - queued_at
                plan.ttft_s += waited
                return await self._serve(request, body, plan, fault)
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            stats.disconnected += 1
            raise
        finally:
            stats.active -= 1

    def _parse(self, raw: bytes) -> _ChatRequest:
        try:
            body = _chat_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise _BadRequest(f"invalid request body: {exc}") from None
        if not body.messages:
            raise _BadRequest("messages must not be empty")
        for i, message in enumerate(body.messages):
            if not isinstance(message.get("role"), str):
                raise _BadRequest(f"messages[{i}] has no role")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(body, name)
            if value is not None and not 0 <= value <= 1_000_000:
                raise _BadRequest(f"{name} must be within [0, 1000000], got {value}")
        if body.mock_fault is not None and body.mock_fault not in FAULTS:
            raise _BadRequest(f"unknown mock_fault {body.mock_fault!r}; one of {sorted(FAULTS)}")
        return body

    async def _serve(
        self, request: web.Request, body: _ChatRequest, plan: _Plan, fault: str | None
    ) -> web.StreamResponse:
        if body.stream:
            return await self._stream(request, body, plan, fault)
        await asyncio.sleep(plan.ttft_s + plan.max_tokens * self.settings.decode_s_per_token)
        self.cache.insert(plan.hashes)
        self._remember(plan)
        self._account(plan)
        return web.json_response(
            {
                "id": f"chatcmpl-{next(self._ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.model or self.settings.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " ".join(plan.output)},
                        "finish_reason": "length",
                    }
                ],
                "usage": _usage(plan),
            },
            dumps=lambda doc: _json.encode(doc).decode(),
        )

    async def _stream(
        self, request: web.Request, body: _ChatRequest, plan: _Plan, fault: str | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            await self._events(request, response, body, plan, fault)
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
    ) -> None:
        if fault == "stall":
            await asyncio.sleep(3_600)
        await asyncio.sleep(plan.ttft_s)
        self.cache.insert(plan.hashes)  # prefill done: the prompt's KV is cached
        if fault == "malformed":
            self.stats.failed += 1
            await response.write(b"data: {this is not json\n\n")
            return
        chunk_id = f"chatcmpl-{next(self._ids)}"
        model = body.model or self.settings.model
        step = self.settings.tokens_per_chunk
        decode = self.settings.decode_s_per_token * step
        out = plan.output
        for start in range(0, len(out), step):
            if start:
                await asyncio.sleep(decode)
            if fault in ("truncate", "disconnect") and start >= len(out) // 2:
                self._cut(request, fault)
                return
            text = (" " if start else "") + " ".join(out[start : start + step])
            last = start + step >= len(out)
            await response.write(_event(chunk_id, model, text, "length" if last else None))
        options = body.stream_options or {}
        if options.get("include_usage"):
            tail = {"id": chunk_id, "object": "chat.completion.chunk", "model": model}
            await response.write(_sse({**tail, "choices": [], "usage": _usage(plan)}))
        await response.write(b"data: [DONE]\n\n")
        self._remember(plan)
        self._account(plan)

    def _cut(self, request: web.Request, fault: str) -> None:
        """End a stream half way: cleanly without ``[DONE]``, or by closing the connection."""
        self.stats.failed += 1
        if fault == "disconnect" and request.transport is not None:
            request.transport.close()

    def _account(self, plan: _Plan) -> None:
        stats = self.stats
        stats.completed += 1
        stats.prompt_tokens += len(plan.prompt)
        stats.cached_tokens += plan.cached_tokens
        stats.output_tokens += plan.max_tokens

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
    return {
        "prompt_tokens": prompt,
        "completion_tokens": plan.max_tokens,
        "total_tokens": prompt + plan.max_tokens,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
    }


def _sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + _json.encode(doc) + b"\n\n"


def _event(chunk_id: str, model: str, text: str, finish: str | None) -> bytes:
    return _sse(
        {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            ],
        }
    )


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
