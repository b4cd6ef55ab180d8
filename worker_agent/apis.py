"""The three OpenAI-style generation APIs the ``OpenAIExecutor`` speaks, as adapters.

Each adapter builds a request body from a chat-format conversation and reads the answer, streamed
(server-sent events, fed one at a time to ``on_event``) or whole (``on_body``), into a
``Generation``: what was generated (content, tool calls; reasoning is only counted), when (first
token of any kind, first content token, last token) and the server's ``usage``.

* ``chat``: ``POST …/chat/completions``. Deltas carry ``content``, reasoning in either field
  servers use (``reasoning_content``: DeepSeek, SGLang, older vLLM; ``reasoning``: vLLM ≥ 0.10,
  OpenRouter, Ollama) and ``tool_calls`` fragments (``index``, then ``id``, ``function.name``
  and pieces of ``function.arguments``). ``usage.completion_tokens_details.reasoning_tokens``
  splits the output. Ends at ``data: [DONE]`` (or the body's end after a finish reason).
* ``completions``: legacy ``POST …/completions``: ``prompt`` is the conversation as text,
  events carry ``choices[].text``.
* ``responses``: ``POST …/responses``: ``input`` items (messages, ``function_call`` and
  ``function_call_output``), events ``response.output_text.delta``,
  ``response.reasoning_text.delta`` / ``response.reasoning_summary_text.delta``,
  ``response.function_call_arguments.delta``, ``response.output_item.added/done``, usage in
  ``response.completed``; ``response.failed`` and ``error`` fail.

Errors, whatever the API: an SSE event named ``error``, a ``data`` object that is an error
(``{"error": {"message": …}}`` as OpenAI and vLLM send it, or a bare ``{"object"|"type":
"error", "message": …}``), a ``data`` line that is not JSON. Each raises ``StreamFailure`` with
a stable reason and the server's message cut to ``MAX_ERROR_CHARS``.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

import msgspec

from worker_agent.sse import SSEEvent

__all__ = [
    "API_NAMES",
    "MAX_ERROR_CHARS",
    "Api",
    "Generation",
    "StreamFailure",
    "api_named",
    "error_message",
]

ApiName = Literal["chat", "completions", "responses"]
API_NAMES: Final = ("chat", "completions", "responses")
MAX_ERROR_CHARS: Final = 1_000
"""A server's error message is kept to this many characters (results stay small)."""


class StreamFailure(Exception):
    """The answer is an error, or unreadable: a stable ``reason`` and the server's ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail[:MAX_ERROR_CHARS]


def error_message(doc: object) -> str:
    """The message of an error body or event, in any of the shapes servers send, bounded.

    ``{"error": {"message": …}}`` (OpenAI, vLLM), ``{"error": "…"}``, ``{"message": …}`` (a
    bare error object, the Responses API's ``error`` event), ``{"detail": …}`` (FastAPI); bytes
    that are not JSON are the message themselves.
    """
    if isinstance(doc, bytes | bytearray):
        raw = bytes(doc)
        try:
            doc = json.loads(raw)
        except ValueError:
            return raw[: MAX_ERROR_CHARS * 4].decode(errors="replace").strip()[:MAX_ERROR_CHARS]
    if isinstance(doc, dict):
        inner = doc.get("error")
        if isinstance(inner, dict | str):
            return error_message(inner) if isinstance(inner, dict) else inner[:MAX_ERROR_CHARS]
        for key in ("message", "detail"):
            if key in doc and doc[key] is not None:
                value = doc[key]
                text = value if isinstance(value, str) else json.dumps(value)
                return text[:MAX_ERROR_CHARS]
        return json.dumps(doc)[:MAX_ERROR_CHARS]
    return str(doc)[:MAX_ERROR_CHARS]


# ---------------------------------------------------------------------- what was generated


class _ToolCall:
    """One tool call being assembled from fragments."""

    __slots__ = ("arguments", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []

    def as_message(self, index: int) -> dict[str, Any]:
        """The call as a chat ``tool_calls`` entry (what a later turn's history carries)."""
        return {
            "id": self.id or f"call_{index}",
            "type": "function",
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


class Generation:
    """What one response generated and when (``perf_counter`` seconds).

    Attributes:
        first_s: first generated token of any kind (content, reasoning, tool call).
        first_content_s: first content token (``None`` for a turn of only reasoning and calls).
        last_s: last generated token.
        content: the content text, in pieces.
        reasoning_events, content_events, tool_events: events that carried each kind (the
            token count when the server reports no ``usage``: one token an event).
        prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens: the server's usage
            (``None`` where it said nothing).
        finished: a finish reason, ``[DONE]`` or a completed response arrived.
        done: nothing more to read (``[DONE]``, or the Responses API's final event).
    """

    __slots__ = (
        "by_item",
        "cached_tokens",
        "completion_tokens",
        "content",
        "content_events",
        "done",
        "finished",
        "first_content_s",
        "first_s",
        "last_s",
        "prompt_tokens",
        "reasoning",
        "reasoning_events",
        "reasoning_tokens",
        "tool_events",
        "tools",
    )

    def __init__(self) -> None:
        self.first_s: float | None = None
        self.first_content_s: float | None = None
        self.last_s: float | None = None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        """Reasoning text: counted (with ``--tokenizer``), never replayed."""
        self.content_events = 0
        self.reasoning_events = 0
        self.tool_events = 0
        self.tools: dict[int, _ToolCall] = {}
        self.by_item: dict[str, int] = {}
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.reasoning_tokens: int | None = None
        self.finished = False
        self.done = False

    def _token(self, now: float) -> None:
        if self.first_s is None:
            self.first_s = now
        self.last_s = now

    def add_content(self, text: str, now: float) -> None:
        self._token(now)
        if self.first_content_s is None:
            self.first_content_s = now
        self.content.append(text)
        self.content_events += 1

    def add_reasoning(self, text: str, now: float) -> None:
        self._token(now)
        self.reasoning.append(text)
        self.reasoning_events += 1

    def tool(self, index: int) -> _ToolCall:
        call = self.tools.get(index)
        if call is None:
            call = self.tools[index] = _ToolCall()
        return call

    def add_arguments(self, call: _ToolCall, text: str, now: float) -> None:
        self._token(now)
        call.arguments.append(text)
        self.tool_events += 1

    @property
    def text(self) -> str:
        return "".join(self.content)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls made, in index order, as chat ``tool_calls`` entries."""
        return [self.tools[i].as_message(i) for i in sorted(self.tools)]

    @property
    def events(self) -> int:
        """Events that carried generated tokens."""
        return self.content_events + self.reasoning_events + self.tool_events

    def usage(self, usage: _Usage | None) -> None:
        if usage is None:
            return
        self.prompt_tokens = _first(usage.prompt_tokens, usage.input_tokens)
        self.completion_tokens = _first(usage.completion_tokens, usage.output_tokens)
        prompt = _first(usage.prompt_tokens_details, usage.input_tokens_details)
        if prompt is not None and prompt.cached_tokens is not None:
            self.cached_tokens = prompt.cached_tokens
        output = _first(usage.completion_tokens_details, usage.output_tokens_details)
        if output is not None and output.reasoning_tokens is not None:
            self.reasoning_tokens = output.reasoning_tokens


def _first(a: Any, b: Any) -> Any:
    return a if a is not None else b


# ---------------------------------------------------------------------- wire shapes


class _Details(msgspec.Struct):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    """Chat/completions names and the Responses API's, in one (unknown keys ignored)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    input_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: Any = None


class _ToolDelta(msgspec.Struct):
    index: int | None = None
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolDelta] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    message: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    """A chat or completions event, or a whole body (unknown keys ignored: servers add theirs)."""

    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None
    object: Any = None
    type: Any = None
    message: Any = None


class _RespEvent(msgspec.Struct):
    """A Responses API event."""

    type: str = ""
    delta: Any = None
    item_id: str | None = None
    output_index: int | None = None
    item: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    message: Any = None
    code: Any = None
    error: Any = None


_chunk: Final = msgspec.json.Decoder(_Chunk)
_resp_event: Final = msgspec.json.Decoder(_RespEvent)
_usage_convert: Final = msgspec.convert


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        # A cut or garbled event, or one of the wrong shape: either way not what the API sends.
        raise StreamFailure("malformed_stream", f"{exc}: {data[:200]!r}") from None


def _string(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


# ---------------------------------------------------------------------- the adapters


class Api:
    """One API: its path, its request body, how to read its answer (module docstring)."""

    name: str = "chat"
    path: str = "/chat/completions"

    def body(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        stream: bool,
        tools: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if tools:
            body["tools"] = tools
        return body

    def on_event(self, gen: Generation, event: SSEEvent, now: float) -> None:
        """Take one event into ``gen`` (sets ``gen.done`` at the end of the stream).

        Raises:
            StreamFailure: an error event, or an event that is not the API's.
        """
        data = event.data
        if data == b"[DONE]":
            gen.finished = gen.done = True
            return
        if event.event == "error":
            raise StreamFailure("stream_error", error_message(data))
        chunk: _Chunk = _decode(_chunk, data)
        if chunk.error is not None:
            raise StreamFailure("stream_error", error_message(chunk.error))
        if chunk.object == "error" or chunk.type == "error":
            raise StreamFailure("stream_error", error_message(data))
        gen.usage(chunk.usage)
        for choice in chunk.choices or ():
            if choice.finish_reason is not None:
                gen.finished = True
            self._choice(gen, choice.delta or choice.message, choice.text, now)

    def on_body(self, gen: Generation, raw: bytes, now: float) -> None:
        """Take a whole (non-streamed) response body into ``gen``."""
        chunk: _Chunk = _decode(_chunk, raw)
        if chunk.error is not None:
            raise StreamFailure("stream_error", error_message(chunk.error))
        gen.usage(chunk.usage)
        choices = chunk.choices or []
        if choices:
            self._choice(gen, choices[0].message or choices[0].delta, choices[0].text, now)
        gen.finished = gen.done = True

    @staticmethod
    def _choice(gen: Generation, delta: _Delta | None, text: str | None, now: float) -> None:
        if text:
            gen.add_content(text, now)
        if delta is None:
            return
        # Reasoning first: a server that puts both in one event generated the reasoning first.
        thought = delta.reasoning_content or delta.reasoning
        if thought:
            gen.add_reasoning(thought, now)
        for piece in delta.tool_calls or ():
            call = gen.tool(piece.index if piece.index is not None else len(gen.tools))
            if piece.id:
                call.id = piece.id
            fn = piece.function
            if fn is not None:
                if fn.name:
                    call.name = fn.name
                gen.add_arguments(call, _string(fn.arguments), now)
        if delta.content:
            gen.add_content(delta.content, now)


class _Completions(Api):
    name = "completions"
    path = "/completions"

    def body(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        stream: bool,
        tools: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt_text(messages),
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """A conversation as one legacy-completions prompt: each message's text, a line each."""
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        lines.append(str(content or ""))
    return "\n".join(lines)


class _Responses(Api):
    name = "responses"
    path = "/responses"

    def body(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        stream: bool,
        tools: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "input": responses_input(messages),
            "max_output_tokens": max_tokens,
            "stream": stream,
            # The history is ours to send each turn, not the server's to keep.
            "store": False,
        }
        if tools:
            body["tools"] = [_responses_tool(t) for t in tools]
        return body

    def on_event(self, gen: Generation, event: SSEEvent, now: float) -> None:
        data = event.data
        if data == b"[DONE]":
            gen.finished = gen.done = True
            return
        doc: _RespEvent = _decode(_resp_event, data)
        kind = doc.type or event.event
        if kind == "error" or event.event == "error":
            raise StreamFailure("stream_error", error_message(data))
        if kind == "response.output_text.delta":
            if doc.delta:
                gen.add_content(_string(doc.delta), now)
        elif kind.startswith("response.reasoning") and kind.endswith(".delta"):
            if doc.delta:
                gen.add_reasoning(_string(doc.delta), now)
        elif kind == "response.function_call_arguments.delta":
            index = self._index(gen, doc.item_id, doc.output_index)
            gen.add_arguments(gen.tool(index), _string(doc.delta), now)
        elif kind in ("response.output_item.added", "response.output_item.done"):
            self._item(gen, doc, now)
        elif kind in ("response.completed", "response.incomplete"):
            response = doc.response or {}
            gen.usage(_response_usage(response.get("usage"), data))
            gen.finished = gen.done = True
        elif kind == "response.failed":
            response = doc.response or {}
            raise StreamFailure("stream_error", error_message(response.get("error") or data))

    def on_body(self, gen: Generation, raw: bytes, now: float) -> None:
        try:
            doc = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise StreamFailure("malformed_response", f"{exc}: {raw[:200]!r}") from None
        if not isinstance(doc, dict):
            raise StreamFailure("malformed_response", repr(raw[:200]))
        if doc.get("error"):
            raise StreamFailure("stream_error", error_message(doc["error"]))
        for index, item in enumerate(doc.get("output") or ()):
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                for part in item.get("content") or ():
                    if isinstance(part, dict) and part.get("text"):
                        gen.add_content(str(part["text"]), now)
            elif item.get("type") == "reasoning":
                summary = item.get("summary") or item.get("content") or ()
                gen.add_reasoning(_string(summary), now)
            elif item.get("type") == "function_call":
                self._item(gen, _RespEvent(item=item, output_index=index), now)
        try:
            gen.usage(_response_usage(doc.get("usage"), raw))
        except StreamFailure as failure:
            raise StreamFailure("malformed_response", failure.detail) from None
        gen.finished = gen.done = True

    @staticmethod
    def _index(gen: Generation, item_id: str | None, output_index: int | None) -> int:
        if item_id is not None and item_id in gen.by_item:
            return gen.by_item[item_id]
        index = output_index if output_index is not None else len(gen.tools)
        if item_id is not None:
            gen.by_item[item_id] = index
        return index

    def _item(self, gen: Generation, doc: _RespEvent, now: float) -> None:
        item = doc.item or {}
        if item.get("type") != "function_call":
            return
        index = self._index(gen, item.get("id"), doc.output_index)
        call = gen.tool(index)
        call.id = str(item.get("call_id") or item.get("id") or call.id)
        call.name = str(item.get("name") or call.name)
        arguments = item.get("arguments")
        if arguments:  # the whole arguments (output_item.done): they win over the fragments
            if not call.arguments:
                gen.add_arguments(call, _string(arguments), now)
            else:
                call.arguments = [_string(arguments)]


def _response_usage(usage: Any, data: bytes) -> _Usage | None:
    try:
        converted: _Usage | None = _usage_convert(usage, _Usage | None)
    except msgspec.ValidationError as exc:
        raise StreamFailure("malformed_stream", f"{exc}: {data[:200]!r}") from None
    return converted


def responses_input(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as Responses API ``input`` items.

    Messages stay messages (``role`` and ``content``); an assistant message's ``tool_calls``
    become ``function_call`` items after it, and a ``tool`` message a ``function_call_output``.
    """
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id", ""),
                    "output": _string(message.get("content")),
                }
            )
            continue
        content = message.get("content")
        if content or role != "assistant":
            items.append({"role": role, "content": content if content is not None else ""})
        for call in message.get("tool_calls") or ():
            fn = call.get("function") or {}
            items.append(
                {
                    "type": "function_call",
                    "call_id": call.get("id", ""),
                    "name": fn.get("name", ""),
                    "arguments": _string(fn.get("arguments")),
                }
            )
    return items


def _responses_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A chat tool definition (``{"type": "function", "function": {…}}``) in the flat form."""
    fn = tool.get("function")
    if tool.get("type") == "function" and isinstance(fn, dict):
        return {"type": "function", **fn}
    return tool


_APIS: Final[dict[str, Api]] = {
    "chat": Api(),
    "completions": _Completions(),
    "responses": _Responses(),
}


def api_named(name: str) -> Api:
    """The adapter for ``chat``, ``completions`` or ``responses``.

    Raises:
        ValueError: another name.
    """
    try:
        return _APIS[name]
    except KeyError:
        raise ValueError(f"unknown API {name!r}; one of {', '.join(API_NAMES)}") from None
