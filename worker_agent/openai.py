"""OpenAIExecutor: each credit as one OpenAI-compatible generation request over HTTP.

``--executor openai --endpoint http://HOST:PORT/v1`` (repeatable) makes the worker agent send
every credit it runs to the endpoint's generation API, streamed as server-sent events by
default, and measure it. ``--api`` picks the API (``worker_agent.apis``): ``chat`` (``POST
…/chat/completions``, the default), ``completions`` (legacy ``…/completions``) or ``responses``
(``…/responses``). The measurements go back to the producer as a
``protocol.inference.RequestResult`` in ``Completion.result``:

* **TTFT** (``ttft_s``): request sent → first generated token of *any* kind: content,
  reasoning (``delta.reasoning`` or ``delta.reasoning_content``) or a tool call's fragments. A
  turn answered only with tool calls has a TTFT; ``ttft_content_s`` is the time to the first
  content token, so a reasoning model shows both.
* **ITL** (``itl_s``): (last token − first token) / (output tokens − 1), where the span and the
  count both cover every kind of token (the server's ``completion_tokens`` includes reasoning).
* **E2E** (``e2e_s``), and the server's ``usage``: prompt, cached
  (``prompt_tokens_details.cached_tokens``), output and reasoning tokens
  (``completion_tokens_details.reasoning_tokens``); without ``usage``, one token per event.

Timestamps are taken once per body chunk read, as the chunk arrives (``perf_counter``), so each
event is timed by the arrival of the bytes that completed it.

Conversations (PROTOCOL.md §5.3). The payload is a ``protocol.inference.TurnRequest``: the
turn's new messages, or a token count to synthesise them from. The history is the agent's
``Session``: each finished turn's ``Turn.request`` holds this executor's record of it (the
turn's new messages, the answer's tool calls and the endpoint that answered, msgpack) and
``Turn.response`` the answer's content, so a request carries every earlier message and every
captured answer, in order. An answer that called tools is replayed as ``{"role": "assistant",
"content": …, "tool_calls": […]}`` (ids, names, arguments as the server sent them); a following
turn's ``role: tool`` messages without a ``tool_call_id`` (a workload cannot know the ids a
server will make up) answer those calls in order. Reasoning is never replayed: servers document
that earlier turns' reasoning is not sent back (DeepSeek answers 400 to a ``reasoning_content``
in the input; vLLM's and OpenAI's chat templates drop it), and as content it would make every
prompt grow by all earlier thinking. A FORK child's session starts as a copy of its parent's
history (the agent copies it); a SPAWN child starts empty. A session the worker should hold but
does not (a migrated session, or routing that ignores stickiness), or holds only in part, is
padded up to the producer's ``TurnRequest.context_tokens`` with filler tokens, so its prompt
keeps its size but the missing part shares no prefix with anything a server has cached.

Endpoints. A session keeps the endpoint its history was built on (its KV prefix lives there),
and a FORK child inherits its parent's; a new session takes the endpoint with the fewest
requests in flight (ties in turn). Connections come from one bounded ``aiohttp`` pool.

Headers: ``X-Correlation-ID`` (the session), ``X-Parent-Correlation-ID`` and
``X-Root-Correlation-ID`` for agent-tree children, so that a server-side router sees the same
sessions the credit router does, and a fresh ``X-Request-ID`` (returned in
``RequestResult.request_id``, so a run's records join the server's logs).

Failures end the credit ``failed`` with a short, stable reason, and the server's message (at
most 1,000 characters) in ``RequestResult.error``: ``http_<code>`` for an error status (the
message from its body), ``timeout``, ``connection_error``, ``stream_broken`` (the connection
died mid-body), ``malformed_stream`` (an event that is not the API's JSON: also a stream cut
inside an event), ``stream_error`` (an ``event: error``, an error object in ``data``, a failed
response), ``stream_too_long`` (one event longer than ``max_event_bytes``),
``stream_incomplete`` (the stream ended without ``[DONE]`` or a finish reason),
``malformed_response``, ``invalid_payload``, and ``executor_error`` for anything else: no
exception leaves ``execute`` but cancellation. ``cancel_after_s`` and router cancellations
cancel the task; leaving the ``async with`` closes the connection, which aborts the request
upstream.
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
from worker_agent.apis import (
    API_NAMES,
    MAX_ERROR_CHARS,
    Api,
    Generation,
    StreamFailure,
    api_named,
    error_message,
)
from worker_agent.core import LogThrottle, Session, Turn
from worker_agent.executor import ExecResult, FirstTokenCallback, TokenCounts
from worker_agent.sse import DEFAULT_MAX_EVENT_BYTES, EventTooLong, SSEDecoder
from worker_agent.tokenizer import Tokenizer, TokenizerError

__all__ = ["OpenAIExecutor", "add_arguments", "executor_from_args"]

logger = logging.getLogger(__name__)

_ERROR_BODY_BYTES: Final = 8_192
_MIN_GAP_TOKENS: Final = 16
"""A history shorter than the producer's estimate by more than this (and 5 %) is padded."""
_FORK: Final = BranchMode.FORK


class _TurnRecord(msgspec.Struct, kw_only=True):
    """What this executor keeps of a finished turn in ``Turn.request`` (a msgpack map: it
    evolves by adding keys with defaults)."""

    messages: list[dict[str, Any]]
    """The messages the turn added (filler first, for a rebuilt session)."""
    endpoint: str = ""
    tool_calls: list[dict[str, Any]] = []
    """The answer's tool calls, as chat ``tool_calls`` entries (replayed with the answer)."""


_record_decoder: Final = msgspec.msgpack.Decoder(_TurnRecord)
_record_encoder: Final = msgspec.msgpack.Encoder()
_json: Final = msgspec.json.Encoder()


class _Failure(Exception):
    """A request that failed: a short reason for the completion, details for the result."""

    def __init__(self, reason: str, *, status: int | None = None, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.detail = detail[:MAX_ERROR_CHARS]


class _Answer(msgspec.Struct):
    """What a successful response measured (times in seconds from the request's start)."""

    gen: Generation
    status: int
    ttft_s: float | None
    ttft_content_s: float | None
    decode_s: float | None
    """First token to last token (``None`` without streaming)."""
    e2e_s: float


class _Endpoint:
    """One server: its generation URL, its label in results, its requests in flight."""

    __slots__ = ("busy", "label", "url")

    def __init__(self, base: str, api: Api) -> None:
        base = base.rstrip("/")
        for suffix in ("/chat/completions", "/completions", "/responses"):
            if base.endswith(suffix):
                self.label = base.removesuffix(suffix)
                self.url = base
                break
        else:
            self.label = base
            self.url = base + api.path
        self.busy = 0


class OpenAIExecutor:
    """Runs credits as generation requests against OpenAI-compatible endpoints (module doc).

    Args:
        endpoints: base URLs (``http://HOST:PORT/v1``) or full API URLs.
        model: the model name sent when the payload names none.
        stream: stream the response (server-sent events); without it there is no TTFT or ITL.
        pool_size: at most this many connections open at once (requests beyond wait for one).
        request_timeout_s: a request (connection, response and body) taking longer fails.
        connect_timeout_s: getting a connection taking longer fails.
        headers: extra headers on every request (e.g. ``Authorization``).
        extra_body: merged into every request body (the payload's ``extra`` wins).
        default_input_tokens: synthetic input of a turn whose payload gives no messages or count.
        default_output_tokens: ``max_tokens`` of a turn whose payload does not say.
        api: ``chat``, ``completions`` or ``responses`` (``worker_agent.apis``).
        max_event_bytes: one server-sent event longer than this fails the request
            (``stream_too_long``); shorter ones are read whole, whatever their length.
        tokenizer: the model's tokenizer (``worker_agent.tokenizer``): synthetic prompts of
            exact token counts, and counts where the server reports none.

    Raises:
        ValueError: no endpoint, a bound below 1, a timeout ≤ 0, an unknown ``api``.
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
        api: str = "chat",
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        if pool_size < 1 or request_timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError("pool_size must be >= 1 and timeouts > 0")
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be >= 1")
        self.api = api_named(api)
        self.endpoints = [_Endpoint(e, self.api) for e in endpoints]
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
        self.max_event_bytes = max_event_bytes
        self.tokenizer = tokenizer
        self.requests = 0
        self.failures: dict[str, int] = {}
        self.rebuilt = 0
        self._turn = itertools.count()
        self._http: aiohttp.ClientSession | None = None
        self._throttle = LogThrottle()

    def __repr__(self) -> str:
        busy = ",".join(str(e.busy) for e in self.endpoints)
        return (
            f"<OpenAIExecutor api={self.api.name} endpoints={len(self.endpoints)} busy={busy} "
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
        """Send the credit's turn (its session's history first) and measure the response.

        Never raises but ``CancelledError``: whatever the server or the payload does, the credit
        ends with an ``ExecResult`` (``executor_error`` for what nothing else names).
        """
        try:
            return await self._execute(credit, session, on_first_token)
        except Exception as exc:  # a bug here must not lose the credit's result
            failure = _Failure("executor_error", detail=f"{type(exc).__name__}: {exc}")
            logger.exception("executor error session=%s", credit.x_correlation_id)
            return self._failed(credit, None, failure)

    async def _execute(
        self, credit: Credit, session: Session, on_first_token: FirstTokenCallback
    ) -> ExecResult:
        try:
            request = decode_request(credit.payload)
        except msgspec.DecodeError as exc:
            return ExecResult(Status.FAILED, reason="invalid_payload", result=_failed(str(exc)))
        records = [_record(turn) for turn in session.history]
        endpoint = self._pick(records)
        added, rebuilt = self._new_messages(credit, session, request)
        messages = _replay(records, session.history)
        _answer_tool_calls(messages, added)
        messages.extend(added)
        body = self._body(request, messages)
        self.requests += 1
        endpoint.busy += 1
        headers = self._headers(credit)
        request_id = headers["X-Request-ID"]
        try:
            answer = await self._send(endpoint, body, headers, on_first_token)
        except _Failure as failure:
            return self._failed(credit, endpoint, failure, request_id)
        finally:
            endpoint.busy -= 1
        return self._completed(
            credit, session, endpoint, answer, added, rebuilt, messages, request_id
        )

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
        make = self.tokenizer.text_of if self.tokenizer is not None else synthetic_text
        if rebuilt:
            self.rebuilt += 1
            filler = make(gap, seed=f"{xid}/{credit.turn_index}/context")
            added.append({"role": "user", "content": filler})
        if request.messages:
            added.extend(request.messages)
        else:
            count = request.input_tokens
            text = make(
                self.default_input_tokens if count is None else count,
                seed=f"{xid}/{credit.turn_index}",
                hash_ids=request.hash_ids,
                block_tokens=request.block_tokens or 512,
            )
            added.append({"role": "user", "content": text})
        return added, rebuilt

    def _body(self, request: TurnRequest, messages: list[dict[str, Any]]) -> bytes:
        output = request.output_tokens
        body = self.api.body(
            model=request.model or self.model,
            messages=messages,
            max_tokens=self.default_output_tokens if output is None else output,
            stream=self.stream,
            tools=request.tools,
        )
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
        status: int | None = None
        try:
            async with self._client().post(endpoint.url, data=body, headers=headers) as response:
                status = response.status
                if status >= 400:
                    detail = await response.content.read(_ERROR_BODY_BYTES)
                    raise _Failure(f"http_{status}", status=status, detail=error_message(detail))
                if self.stream:
                    return await self._read_stream(response, started, on_first_token)
                return await self._read_body(response, started)
        except StreamFailure as failure:
            raise _Failure(failure.reason, status=status, detail=failure.detail) from None
        except EventTooLong as exc:
            raise _Failure("stream_too_long", status=status, detail=str(exc)) from None
        except TimeoutError:
            raise _Failure(
                "timeout", status=status, detail="no complete response in time"
            ) from None
        except aiohttp.ClientPayloadError as exc:
            raise _Failure("stream_broken", status=status, detail=str(exc)) from None
        except aiohttp.ClientConnectionError as exc:
            raise _Failure("connection_error", status=status, detail=str(exc)) from None
        except aiohttp.ClientError as exc:
            raise _Failure("http_client_error", status=status, detail=str(exc)) from None

    async def _read_stream(
        self,
        response: aiohttp.ClientResponse,
        started: float,
        on_first_token: FirstTokenCallback,
    ) -> _Answer:
        """Read server-sent events to the end of the answer, timing every token."""
        clock = time.perf_counter
        gen = Generation()
        decoder = SSEDecoder(self.max_event_bytes)
        on_event = self.api.on_event
        async for raw in response.content.iter_any():
            now = clock()  # once per chunk: the arrival of the bytes that complete its events
            for event in decoder.feed(raw):
                seen = gen.first_s
                on_event(gen, event, now)
                if seen is None and gen.first_s is not None:
                    on_first_token(gen.first_s - started)
                if gen.done:
                    break
            if gen.done:
                break
        else:
            now = clock()
            for event in decoder.close():
                on_event(gen, event, now)
        if not gen.finished:
            raise StreamFailure("stream_incomplete", "the stream ended without [DONE] or a finish")
        return _timed(gen, response.status, started, clock())

    async def _read_body(self, response: aiohttp.ClientResponse, started: float) -> _Answer:
        """A non-streamed answer: one JSON body, no first-token time."""
        raw = await response.read()
        gen = Generation()
        try:
            self.api.on_body(gen, raw, time.perf_counter())
        except StreamFailure as failure:
            if failure.reason == "malformed_stream":
                raise StreamFailure("malformed_response", failure.detail) from None
            raise
        answer = _timed(gen, response.status, started, time.perf_counter())
        answer.ttft_s = answer.ttft_content_s = answer.decode_s = None
        return answer

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
        request_id: str,
    ) -> ExecResult:
        gen = answer.gen
        calls = gen.tool_calls()
        tok = self.tokenizer
        if gen.prompt_tokens is not None:
            prompt = gen.prompt_tokens
        else:  # the server did not say: our own count (plus a marker per message)
            count = tok.count if tok is not None else _words
            prompt = sum(count(str(m.get("content") or "")) + 1 for m in messages)
        if gen.completion_tokens is not None:
            output = gen.completion_tokens
            reasoning = gen.reasoning_tokens
            if reasoning is None and gen.reasoning_events == 0 and self.stream:
                reasoning = 0  # a stream that carried no reasoning spent none
        elif tok is not None:
            reasoning = tok.count("".join(gen.reasoning))
            arguments = "".join(c["function"]["arguments"] for c in calls)
            output = reasoning + tok.count(gen.text) + tok.count(arguments)
        else:  # one token per event (a server may pack several; it then reports usage)
            output = gen.events or len(gen.text.split())
            reasoning = gen.reasoning_events
        result = RequestResult(
            input_tokens=prompt,
            cached_tokens=gen.cached_tokens,
            output_tokens=output,
            ttft_s=answer.ttft_s,
            # Per token, not per event: an event may carry several tokens. The span and the
            # count both cover reasoning, content and tool calls.
            itl_s=answer.decode_s / (output - 1)
            if answer.decode_s is not None and output > 1
            else None,
            e2e_s=answer.e2e_s,
            http_status=answer.status,
            endpoint=endpoint.label,
            rebuilt=rebuilt,
            reasoning_tokens=min(reasoning, output) if reasoning is not None else None,
            ttft_content_s=answer.ttft_content_s,
            tool_calls=len(calls),
            request_id=request_id,
        )
        self.tokens.add(prompt, gen.cached_tokens, output, result.reasoning_tokens or 0)
        turn = None
        if credit.turn_index < credit.num_turns - 1 or credit.fork_count:
            record = _TurnRecord(messages=added, endpoint=endpoint.label, tool_calls=calls)
            turn = Turn(
                input_tokens=max(prompt - session.history_tokens, 0),
                output_tokens=output,
                request=_record_encoder.encode(record),
                response=gen.text.encode(),
            )
        return ExecResult(
            Status.COMPLETED, ttft_s=answer.ttft_s, result=encode_result(result), turn=turn
        )

    def _failed(
        self, credit: Credit, endpoint: _Endpoint | None, failure: _Failure, request_id: str = ""
    ) -> ExecResult:
        reason = failure.reason
        label = endpoint.label if endpoint is not None else ""
        self.failures[reason] = self.failures.get(reason, 0) + 1
        suppressed = self._throttle.ready(reason, asyncio.get_running_loop().time())
        if suppressed is not None:
            logger.warning(
                "request failed reason=%s endpoint=%s session=%s detail=%s suppressed=%d",
                reason,
                label,
                credit.x_correlation_id,
                failure.detail[:200],
                suppressed,
            )
        result = RequestResult(
            http_status=failure.status,
            endpoint=label,
            error=failure.detail,
            request_id=request_id,
        )
        return ExecResult(Status.FAILED, reason=reason, result=encode_result(result))


# ---------------------------------------------------------------------- helpers


def _timed(gen: Generation, status: int, started: float, end: float) -> _Answer:
    first, last = gen.first_s, gen.last_s
    return _Answer(
        gen=gen,
        status=status,
        ttft_s=None if first is None else first - started,
        ttft_content_s=None if gen.first_content_s is None else gen.first_content_s - started,
        decode_s=None if first is None or last is None else last - first,
        e2e_s=end - started,
    )


def _words(text: str) -> int:
    return len(text.split())


def _record(turn: Turn) -> _TurnRecord | None:
    """This executor's record of a finished turn (``None`` for a turn it did not run)."""
    if not turn.request:
        return None
    try:
        return _record_decoder.decode(turn.request)
    except msgspec.DecodeError:
        return None


def _replay(records: list[_TurnRecord | None], history: list[Turn]) -> list[dict[str, Any]]:
    """The conversation so far: each turn's messages, then its captured answer (content and
    tool calls; never reasoning)."""
    messages: list[dict[str, Any]] = []
    for record, turn in zip(records, history, strict=True):
        answer: dict[str, Any] = {
            "role": "assistant",
            "content": turn.response.decode(errors="replace"),
        }
        if record is not None:
            messages.extend(record.messages)
            if record.tool_calls:
                # OpenAI: content may be null when the message has tool_calls.
                answer["content"] = answer["content"] or None
                answer["tool_calls"] = record.tool_calls
        messages.append(answer)
    return messages


def _answer_tool_calls(history: list[dict[str, Any]], added: list[dict[str, Any]]) -> None:
    """Make the turn's messages answer the tool calls of the answer before them, in place.

    OpenAI's rules (strict servers enforce them, with a 400): a ``tool`` message must answer a
    ``tool_calls`` entry of the assistant message before it, and every entry must be answered
    before the next non-tool message. So: a ``tool`` message whose ``tool_call_id`` names none
    of those calls (a workload cannot know the ids a server makes up) answers the next
    unanswered one, in order; one with no call left to answer goes as a user message with the
    same content; calls the turn leaves unanswered get an empty result, before its first other
    message.
    """
    last = history[-1] if history and history[-1].get("role") == "assistant" else {}
    pending = [str(c.get("id", "")) for c in last.get("tool_calls") or ()]
    if not pending and not any(m.get("role") == "tool" for m in added):
        return
    answered = {m.get("tool_call_id") for m in added if m.get("tool_call_id") in pending}
    pending = [p for p in pending if p not in answered]
    for i, message in enumerate(added):
        if message.get("role") != "tool" or message.get("tool_call_id") in answered:
            continue
        if pending:
            added[i] = {**message, "tool_call_id": pending.pop(0)}
        else:
            added[i] = {"role": "user", "content": message.get("content", "")}
    if pending:
        at = next((i for i, m in enumerate(added) if m.get("role") != "tool"), len(added))
        added[at:at] = [{"role": "tool", "tool_call_id": p, "content": ""} for p in pending]


def _failed(detail: str) -> bytes:
    return encode_result(RequestResult(error=detail[:MAX_ERROR_CHARS]))


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
        "--api",
        choices=API_NAMES,
        default="chat",
        help="generation API: chat (/chat/completions, default), completions (legacy "
        "/completions) or responses (/responses)",
    )
    group.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a local tokenizer.json (or a model directory holding one): synthetic prompts of "
        "exact token counts, and token counts when the server reports none "
        "(needs credit-router[tokenizer])",
    )
    group.add_argument(
        "--max-event-bytes",
        type=int,
        default=DEFAULT_MAX_EVENT_BYTES,
        metavar="N",
        help="one server-sent event longer than this fails the request (default 16 MiB)",
    )
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
        if getattr(parsed, "executor", None) == "openai" and getattr(parsed, "tokenizer", None):
            try:
                parsed.tokenizer = Tokenizer(parsed.tokenizer)
            except TokenizerError as exc:
                parser.error(str(exc))
        if getattr(parsed, "max_event_bytes", 1) < 1:
            parser.error(f"--max-event-bytes must be >= 1: {parsed.max_event_bytes}")
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
        api=args.api,
        max_event_bytes=args.max_event_bytes,
        tokenizer=args.tokenizer or None,
    )
