"""OpenAIExecutor: each credit as one OpenAI-compatible chat completion over HTTP.

``--executor openai --endpoint http://HOST:PORT/v1`` (repeatable) makes the worker agent send
every credit it runs to ``POST {endpoint}/chat/completions``, streamed as server-sent events by
default, and measure it: time to first token, mean inter-token latency, end-to-end time and the
server's token counts (``usage``, with ``prompt_tokens_details.cached_tokens``). The measurements
go back to the producer as a ``protocol.inference.RequestResult`` in ``Completion.result``.

Conversations (PROTOCOL.md §5.3). The payload is a ``protocol.inference.TurnRequest``: the
turn's new messages, or a token count to synthesise them from. The history is the agent's
``Session``: each finished turn's ``Turn.request`` holds this executor's record of it (the turn's
new messages and the endpoint that answered, msgpack) and ``Turn.response`` the assistant's
reply, so a request carries every earlier user message and every captured answer, in order. A
FORK child's session starts as a copy of its parent's history (the agent copies it), so its
first request carries the parent's conversation; a SPAWN child starts empty. A session the
worker should hold but does not (a migrated session, or routing that ignores stickiness), or
holds only in part (it ran turns elsewhere and came back), is padded up to the producer's
``TurnRequest.context_tokens`` with filler tokens, so its prompt keeps its size but the missing
part shares no prefix with anything a server has cached.

Endpoints. A session keeps the endpoint its history was built on (its KV prefix lives there),
and a FORK child inherits its parent's; a new session takes the endpoint with the fewest
requests in flight (ties in turn). Connections come from one bounded ``aiohttp`` pool.

Headers: ``X-Correlation-ID`` (the session), ``X-Parent-Correlation-ID`` and
``X-Root-Correlation-ID`` for agent-tree children, a fresh ``X-Request-ID``, so that a
server-side router sees the same sessions the credit router does.

Failures end the credit ``failed`` with a short reason and details in the result: ``http_<code>``
for an error status, ``timeout``, ``connection_error``, ``stream_broken`` (the connection died
mid-body), ``malformed_stream`` (an event that is not JSON), ``stream_error`` (an error event),
``stream_incomplete`` (the stream ended without ``[DONE]`` or a finish reason),
``malformed_response``, ``invalid_payload``. ``cancel_after_s`` and router cancellations cancel
the task; leaving the ``async with`` closes the connection, which aborts the request upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import aiohttp
import msgspec

from protocol.inference import (
    RequestResult,
    TurnRequest,
    decode_request,
    encode_result,
    synthetic_text,
)
from protocol.messages import BranchMode, Credit, Status
from worker_agent.core import LogThrottle, Session, Turn
from worker_agent.executor import ExecResult, FirstTokenCallback, TokenCounts

__all__ = ["OpenAIExecutor", "add_arguments", "executor_from_args"]

logger = logging.getLogger(__name__)

_ERROR_BODY_BYTES: Final = 2_048
_MIN_GAP_TOKENS: Final = 16
"""A history shorter than the producer's estimate by more than this (and 5 %) is padded."""
_FORK: Final = BranchMode.FORK


# ------------------------------------------------------------------ what the server sends


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Chunk(msgspec.Struct):
    """One streamed event (unknown keys ignored: servers add their own)."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


class _Message(msgspec.Struct):
    content: str | None = None


class _FullChoice(msgspec.Struct):
    message: _Message | None = None
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    """A non-streamed response body."""

    choices: list[_FullChoice] = []
    usage: _Usage | None = None


class _TurnRecord(msgspec.Struct, kw_only=True):
    """What this executor keeps of a finished turn in ``Turn.request``."""

    messages: list[dict[str, Any]]
    """The messages the turn added (filler first, for a rebuilt session)."""
    endpoint: str = ""


_chunk_decoder: Final = msgspec.json.Decoder(_Chunk)
_completion_decoder: Final = msgspec.json.Decoder(_Completion)
_record_decoder: Final = msgspec.msgpack.Decoder(_TurnRecord)
_record_encoder: Final = msgspec.msgpack.Encoder()
_json: Final = msgspec.json.Encoder()


class _Failure(Exception):
    """A request that failed: a short reason for the completion, details for the result."""

    def __init__(self, reason: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.detail = detail


class _Answer(msgspec.Struct):
    """What a successful response measured."""

    text: str
    status: int
    ttft_s: float | None
    decode_s: float | None
    """First token to last token (``None`` without streaming)."""
    e2e_s: float
    usage: _Usage | None
    chunks: int


class _Endpoint:
    """One server: its completions URL, its label in results, its requests in flight."""

    __slots__ = ("busy", "label", "url")

    def __init__(self, base: str) -> None:
        base = base.rstrip("/")
        self.label = base.removesuffix("/chat/completions")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.busy = 0


class OpenAIExecutor:
    """Runs credits as chat completions against OpenAI-compatible endpoints (module docstring).

    Args:
        endpoints: base URLs (``http://HOST:PORT/v1``) or full ``…/chat/completions`` URLs.
        model: the model name sent when the payload names none.
        stream: stream the response (server-sent events); without it there is no TTFT or ITL.
        pool_size: at most this many connections open at once (requests beyond wait for one).
        request_timeout_s: a request (connection, response and body) taking longer fails.
        connect_timeout_s: getting a connection taking longer fails.
        headers: extra headers on every request (e.g. ``Authorization``).
        extra_body: merged into every request body (the payload's ``extra`` wins).
        default_input_tokens: synthetic input of a turn whose payload gives no messages or count.
        default_output_tokens: ``max_tokens`` of a turn whose payload does not say.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        model: str = "mock",
        stream: bool = True,
        pool_size: int = 64,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        default_input_tokens: int = 256,
        default_output_tokens: int = 128,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        if pool_size < 1 or request_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("pool_size must be >= 1 and timeouts > 0")
        self.endpoints = [_Endpoint(e) for e in endpoints]
        self.tokens = TokenCounts()
        """Tokens of completed credits, as the server reported them (``/metrics``)."""
        self._by_label = {e.label: e for e in self.endpoints}
        self.model = model
        self.stream = stream
        self.pool_size = pool_size
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=connect_timeout_s)
        self.headers = dict(headers or {})
        self.extra_body = dict(extra_body or {})
        self.default_input_tokens = default_input_tokens
        self.default_output_tokens = default_output_tokens
        self.requests = 0
        self.failures: dict[str, int] = {}
        self.rebuilt = 0
        self._turn = itertools.count()
        self._http: aiohttp.ClientSession | None = None
        self._throttle = LogThrottle()

    def __repr__(self) -> str:
        busy = ",".join(str(e.busy) for e in self.endpoints)
        return (
            f"<OpenAIExecutor endpoints={len(self.endpoints)} busy={busy} "
            f"requests={self.requests} failures={self.failures} rebuilt={self.rebuilt}>"
        )

    @property
    def kind(self) -> str:
        """``"openai"``."""
        return "openai"

    def execute_nowait(self, credit: Credit, session: Session) -> ExecResult | None:
        """Always ``None``: an HTTP request always waits."""
        return None

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def execute(
        self, credit: Credit, session: Session, on_first_token: FirstTokenCallback
    ) -> ExecResult:
        """Send the credit's turn (its session's history first) and measure the response."""
        try:
            request = decode_request(credit.payload)
        except msgspec.DecodeError as exc:
            return ExecResult(Status.FAILED, reason="invalid_payload", result=_failed(str(exc)))
        records = [_record(turn) for turn in session.history]
        endpoint = self._pick(records)
        added, rebuilt = self._new_messages(credit, session, request)
        messages = _replay(records, session.history)
        messages.extend(added)
        body = self._body(request, messages)
        self.requests += 1
        endpoint.busy += 1
        try:
            answer = await self._send(endpoint, body, self._headers(credit), on_first_token)
        except _Failure as failure:
            return self._failed(credit, endpoint, failure)
        finally:
            endpoint.busy -= 1
        return self._completed(credit, session, endpoint, answer, added, rebuilt, messages)

    # ------------------------------------------------------------------ building the request

    def _pick(self, records: list[_TurnRecord | None]) -> _Endpoint:
        """The endpoint holding the session's prefix, else the least busy (ties in turn)."""
        last = records[-1] if records else None
        if last is not None:
            home = self._by_label.get(last.endpoint)
            if home is not None:
                return home
        n = len(self.endpoints)
        start = next(self._turn) % n
        order = [self.endpoints[(start + i) % n] for i in range(n)]
        return min(order, key=lambda e: e.busy)

    def _new_messages(
        self, credit: Credit, session: Session, request: TurnRequest
    ) -> tuple[list[dict[str, Any]], bool]:
        """The messages this turn adds, and whether a missing history was padded."""
        added: list[dict[str, Any]] = []
        # The producer's estimate and the history held here are both the server's token
        # counts, so they agree when this worker holds the whole history. Short of it: the
        # history is missing (a migrated session, a FORK child without its parent) or stale (a
        # session that ran turns elsewhere and came back); pad the gap after what is here.
        gap = request.context_tokens - session.history_tokens
        rebuilt = gap > max(_MIN_GAP_TOKENS, request.context_tokens // 20)
        xid = credit.x_correlation_id
        if rebuilt:
            self.rebuilt += 1
            filler = synthetic_text(gap, seed=f"{xid}/{credit.turn_index}/context")
            added.append({"role": "user", "content": filler})
        if request.messages:
            added.extend(request.messages)
        else:
            count = request.input_tokens
            text = synthetic_text(
                self.default_input_tokens if count is None else count,
                seed=f"{xid}/{credit.turn_index}",
                hash_ids=request.hash_ids,
                block_tokens=request.block_tokens or 512,
            )
            added.append({"role": "user", "content": text})
        return added, rebuilt

    def _body(self, request: TurnRequest, messages: list[dict[str, Any]]) -> bytes:
        output = request.output_tokens
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": messages,
            "max_tokens": self.default_output_tokens if output is None else output,
            "stream": self.stream,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if request.tools:
            body["tools"] = request.tools
        body.update(self.extra_body)
        if request.extra:
            body.update(request.extra)
        return _json.encode(body)

    def _headers(self, credit: Credit) -> dict[str, str]:
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "X-Correlation-ID": credit.x_correlation_id,
            "X-Request-ID": uuid.uuid4().hex,
        }
        if credit.parent_correlation_id is not None:
            headers["X-Parent-Correlation-ID"] = credit.parent_correlation_id
        if credit.root_correlation_id is not None:
            headers["X-Root-Correlation-ID"] = credit.root_correlation_id
        return headers

    # ------------------------------------------------------------------ the exchange

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size)
            self._http = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
        return self._http

    async def _send(
        self,
        endpoint: _Endpoint,
        body: bytes,
        headers: dict[str, str],
        on_first_token: FirstTokenCallback,
    ) -> _Answer:
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        started = time.perf_counter()
        try:
            async with self._client().post(endpoint.url, data=body, headers=headers) as response:
                if response.status >= 400:
                    detail = await response.content.read(_ERROR_BODY_BYTES)
                    raise _Failure(
                        f"http_{response.status}",
                        status=response.status,
                        detail=_error_message(detail),
                    )
                if self.stream:
                    return await _read_stream(response, started, on_first_token)
                return await _read_body(response, started)
        except TimeoutError:
            raise _Failure("timeout", detail="no complete response in time") from None
        except aiohttp.ClientPayloadError as exc:
            raise _Failure("stream_broken", status=200, detail=str(exc)) from None
        except aiohttp.ClientConnectionError as exc:
            raise _Failure("connection_error", detail=str(exc)) from None
        except aiohttp.ClientError as exc:
            raise _Failure("http_client_error", detail=str(exc)) from None

    # ------------------------------------------------------------------ results

    def _completed(
        self,
        credit: Credit,
        session: Session,
        endpoint: _Endpoint,
        answer: _Answer,
        added: list[dict[str, Any]],
        rebuilt: bool,
        messages: list[dict[str, Any]],
    ) -> ExecResult:
        usage = answer.usage
        reasoning = 0
        if usage is not None:
            prompt, output = usage.prompt_tokens, usage.completion_tokens
            details = usage.prompt_tokens_details
            cached = details.cached_tokens if details is not None else None
            thinking = usage.completion_tokens_details
            reasoning = (thinking.reasoning_tokens or 0) if thinking is not None else 0
        else:  # the server did not say: our own estimate (words, plus a marker per message)
            prompt = sum(len(str(m.get("content", "")).split()) + 1 for m in messages)
            output, cached = answer.chunks or len(answer.text.split()), None
        result = RequestResult(
            input_tokens=prompt,
            cached_tokens=cached,
            output_tokens=output,
            ttft_s=answer.ttft_s,
            # Per token, not per event: an event may carry several tokens.
            itl_s=answer.decode_s / (output - 1)
            if answer.decode_s is not None and output > 1
            else None,
            e2e_s=answer.e2e_s,
            http_status=answer.status,
            endpoint=endpoint.label,
            rebuilt=rebuilt,
        )
        turn = None
        if credit.turn_index < credit.num_turns - 1 or credit.fork_count:
            record = _TurnRecord(messages=added, endpoint=endpoint.label)
            turn = Turn(
                input_tokens=max(prompt - session.history_tokens, 0),
                output_tokens=output,
                request=_record_encoder.encode(record),
                response=answer.text.encode(),
            )
        self.tokens.add(prompt, cached, output, reasoning)
        return ExecResult(
            Status.COMPLETED, ttft_s=answer.ttft_s, result=encode_result(result), turn=turn
        )

    def _failed(self, credit: Credit, endpoint: _Endpoint, failure: _Failure) -> ExecResult:
        reason = failure.reason
        self.failures[reason] = self.failures.get(reason, 0) + 1
        suppressed = self._throttle.ready(reason, asyncio.get_running_loop().time())
        if suppressed is not None:
            logger.warning(
                "request failed reason=%s endpoint=%s session=%s detail=%s suppressed=%d",
                reason,
                endpoint.label,
                credit.x_correlation_id,
                failure.detail[:200],
                suppressed,
            )
        result = RequestResult(
            http_status=failure.status, endpoint=endpoint.label, error=failure.detail[:1_000]
        )
        return ExecResult(Status.FAILED, reason=reason, result=encode_result(result))


# ---------------------------------------------------------------------- reading responses


async def _read_stream(
    response: aiohttp.ClientResponse, started: float, on_first_token: FirstTokenCallback
) -> _Answer:
    """Read server-sent events to ``[DONE]``, timing the first and the last token."""
    clock = time.perf_counter
    first: float | None = None
    last = started
    parts: list[str] = []
    chunks = 0
    usage: _Usage | None = None
    finished = False
    try:
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (":"), "event:", "id:", "retry:"
            data = line[5:].strip()
            if data == b"[DONE]":
                finished = True
                break
            chunk = _decode_chunk(data)
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                finished = finished or choice.finish_reason is not None
                delta = choice.delta
                text = (delta.content or delta.reasoning_content) if delta is not None else None
                if text:
                    last = clock()
                    if first is None:
                        first = last
                        on_first_token(first - started)
                    parts.append(text)
                    chunks += 1
    except ValueError as exc:  # aiohttp: a line longer than its buffer
        raise _Failure("malformed_stream", status=200, detail=str(exc)) from None
    if not finished:
        raise _Failure("stream_incomplete", status=200, detail="no [DONE] and no finish_reason")
    end = clock()
    return _Answer(
        text="".join(parts),
        status=response.status,
        ttft_s=None if first is None else first - started,
        decode_s=None if first is None else last - first,
        e2e_s=end - started,
        usage=usage,
        chunks=chunks,
    )


def _decode_chunk(data: bytes) -> _Chunk:
    try:
        chunk = _chunk_decoder.decode(data)
    except msgspec.DecodeError:
        raise _Failure("malformed_stream", status=200, detail=repr(data[:200])) from None
    if chunk.error is not None:
        raise _Failure("stream_error", status=200, detail=_error_message(chunk.error))
    return chunk


async def _read_body(response: aiohttp.ClientResponse, started: float) -> _Answer:
    """A non-streamed completion: one JSON body, no first-token time."""
    raw = await response.read()
    try:
        doc = _completion_decoder.decode(raw)
    except msgspec.DecodeError:
        raise _Failure(
            "malformed_response", status=response.status, detail=repr(raw[:200])
        ) from None
    message = doc.choices[0].message if doc.choices else None
    text = (message.content or "") if message is not None else ""
    end = time.perf_counter()
    return _Answer(
        text=text,
        status=response.status,
        ttft_s=None,
        decode_s=None,
        e2e_s=end - started,
        usage=doc.usage,
        chunks=0,
    )


def _record(turn: Turn) -> _TurnRecord | None:
    """This executor's record of a finished turn (``None`` for a turn it did not run)."""
    if not turn.request:
        return None
    try:
        return _record_decoder.decode(turn.request)
    except msgspec.DecodeError:
        return None


def _replay(records: list[_TurnRecord | None], history: list[Turn]) -> list[dict[str, Any]]:
    """The conversation so far: each turn's messages, then its captured answer."""
    messages: list[dict[str, Any]] = []
    for record, turn in zip(records, history, strict=True):
        if record is not None:
            messages.extend(record.messages)
        messages.append({"role": "assistant", "content": turn.response.decode(errors="replace")})
    return messages


def _error_message(body: object) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body as text."""
    doc: Any = body
    if isinstance(body, bytes):
        try:
            doc = json.loads(body)
        except ValueError:
            return body.decode(errors="replace")
    if isinstance(doc, dict):
        error = doc.get("error", doc)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        return json.dumps(error)[:_ERROR_BODY_BYTES]
    return str(doc)


def _failed(detail: str) -> bytes:
    return encode_result(RequestResult(error=detail[:1_000]))


# ---------------------------------------------------------------------- command line


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _json_object(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return doc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--executor openai`` options of the worker's command line."""
    group = parser.add_argument_group("openai executor (--executor openai)")
    group.add_argument(
        "--endpoint",
        action="append",
        type=_url,
        default=[],
        metavar="URL",
        help="OpenAI-compatible base URL, e.g. http://HOST:8000/v1 (repeatable)",
    )
    group.add_argument("--model", default="mock", help="model name sent (default: mock)")
    group.add_argument(
        "--no-stream", dest="stream", action="store_false", help="no SSE (then no TTFT/ITL)"
    )
    group.add_argument(
        "--http-pool", type=int, default=None, help="max open connections (default: capacity)"
    )
    group.add_argument("--request-timeout-s", type=float, default=600.0, help="per request")
    group.add_argument("--connect-timeout-s", type=float, default=10.0, help="per connection")
    group.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="extra HTTP header (repeatable)",
    )
    group.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="send 'Authorization: Bearer $VAR' when VAR is set (default OPENAI_API_KEY)",
    )
    group.add_argument(
        "--extra-body", type=_json_object, default={}, help="JSON object merged into each body"
    )
    group.add_argument(
        "--max-tokens", type=int, default=128, help="max_tokens when the payload gives none"
    )
    _require_endpoint(parser)


def _require_endpoint(parser: argparse.ArgumentParser) -> None:
    """Make ``--executor openai`` without ``--endpoint`` a usage error of ``parser`` itself.

    argparse has no cross-option check, and the worker's own checks belong to its ``__main__``:
    wrapping this parser's ``parse_known_args`` (which ``parse_args`` calls) keeps the rule next
    to the options it is about, and the error is an ordinary usage error (exit status 2).
    """
    parse_known_args = parser.parse_known_args

    def checked(
        args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = parse_known_args(args, namespace)
        if getattr(parsed, "executor", None) == "openai" and not parsed.endpoint:
            parser.error("--executor openai needs at least one --endpoint URL")
        if getattr(parsed, "http_pool", None) is not None and parsed.http_pool < 1:
            parser.error(f"--http-pool must be >= 1: {parsed.http_pool}")
        return parsed, rest

    parser.parse_known_args = checked  # type: ignore[method-assign,assignment]


def executor_from_args(args: argparse.Namespace) -> OpenAIExecutor | None:
    """The executor ``--executor openai`` asks for, or ``None`` for another executor."""
    if args.executor != "openai":
        return None
    headers = dict(args.header)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if api_key:
        headers.setdefault("Authorization", f"Bearer {api_key}")
    return OpenAIExecutor(
        args.endpoint,
        model=args.model,
        stream=args.stream,
        pool_size=args.http_pool or args.capacity,
        request_timeout_s=args.request_timeout_s,
        connect_timeout_s=args.connect_timeout_s,
        headers=headers,
        extra_body=args.extra_body,
        default_output_tokens=args.max_tokens,
    )
