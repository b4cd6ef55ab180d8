"""What the opaque bytes of a credit carry for the bundled executors: request in, metrics out.

The router never reads ``Credit.payload`` or ``Completion.result`` (PROTOCOL.md §3: ``bin``,
opaque). Producers and workers agree on their meaning among themselves; this module is that
agreement for the producers and executors shipped here (the replayer, ``SimExecutor``,
``OpenAIExecutor``), so that any of them can be paired with any other:

* ``TurnRequest`` goes in ``Credit.payload``: what one turn sends (its new messages, or a token
  count to synthesise a prompt from), how many tokens to generate, and the producer's estimate of
  the session's history so a worker that lacks that history can rebuild a prompt of its size.
* ``RequestResult`` comes back in ``Completion.result`` and therefore ``Outcome.result``: what
  the request measured (time to first token, mean inter-token latency, end-to-end time) and the
  token counts the server reported, including prompt tokens served from its prefix cache.

Both are msgpack **maps** (field names on the wire, unlike the array-encoded protocol messages):
they are small next to a request, self-describing in a records file, and they evolve by adding
keys. Readers ignore keys they do not know and take the default for keys that are missing, so a
newer executor's result decodes with an older reader and the other way round. Fields that equal
their default are left out of the bytes. A JSON object with the same keys is accepted as a
payload too (``decode_request`` looks at the first byte).

``synthetic_text`` is how a turn given as a token count becomes text, so that every executor
sends the same words for the same turn (and shared ``hash_ids`` blocks share a prefix).
"""

from __future__ import annotations

import random
import zlib
from typing import Annotated, Any, Final

import msgspec

__all__ = [
    "WORDS",
    "RequestResult",
    "TurnRequest",
    "decode_request",
    "decode_result",
    "encode_request",
    "encode_result",
    "synthetic_text",
]

_WORD_TEXT: Final = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their can been has more if will would "
    "other when what so no out up into them some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since "
    "against go came right used take three"
)
WORDS: Final = tuple(_WORD_TEXT.split())
"""Common one-token English words: synthetic text is made of them, so that a real tokenizer
counts about one token per word (and the mock server, which counts words, exactly one)."""

_Count = Annotated[int, msgspec.Meta(ge=0, le=10_000_000)]
_Seconds = Annotated[float, msgspec.Meta(ge=0.0)]


class TurnRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One turn's request, as a producer describes it in ``Credit.payload``.

    A turn gives either ``messages`` or a token count (``input_tokens``, optionally made of shared
    ``hash_ids`` blocks); an executor that needs text synthesises it from the count. The session's
    history (earlier turns and their answers, or a FORK parent's) is the worker's: the payload
    carries only what is new.
    """

    messages: list[dict[str, Any]] | None = None
    """The turn's new messages, OpenAI chat format (``{"role": …, "content": …}``)."""
    input_tokens: _Count | None = None
    """Without ``messages``: a synthetic user message of about this many tokens."""
    hash_ids: list[int] | None = None
    """Synthetic prompt made of these blocks, in order (Mooncake ``hash_ids``): the same id
    always gives the same text, so traces that share ids share prompt prefixes."""
    block_tokens: _Count | None = None
    """Tokens per ``hash_ids`` block (Mooncake traces use 512)."""
    output_tokens: _Count | None = None
    """Tokens to generate (``max_tokens``); the executor's default when absent."""
    model: str | None = None
    """Overrides the executor's model name for this turn."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI tool definitions, sent as they are."""
    extra: dict[str, Any] | None = None
    """Merged into the top level of the request body (``temperature``, ``ignore_eos``…)."""
    context_tokens: _Count = 0
    """The producer's estimate of the tokens already in the session's history (for a FORK
    child's first turn: its parent's). A worker that does not hold that history (a migrated
    session, or routing that ignores stickiness) pads the prompt with this many filler tokens,
    so the prompt keeps its size and pays its full prefill."""


class RequestResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one executed turn measured, in ``Completion.result`` (and ``Outcome.result``).

    Times are measured by the worker, from just before the request is sent. Token counts are the
    server's (``usage``) when it reports them, else the executor's own count.
    """

    input_tokens: _Count = 0
    """Prompt tokens: the whole prompt, history included. A failed request's token counts are
    unknown (readers should not take this default as a count)."""
    cached_tokens: _Count | None = None
    """Prompt tokens served from the server's prefix cache (OpenAI
    ``usage.prompt_tokens_details.cached_tokens``); ``None`` when the server does not say."""
    output_tokens: _Count = 0
    """Generated tokens."""
    ttft_s: _Seconds | None = None
    """Time to the first generated token of any kind: content, reasoning or a tool call's
    arguments (``None`` without streaming, or if none came)."""
    itl_s: _Seconds | None = None
    """Mean inter-token latency: (last token − first token) / (output tokens − 1), where both
    times and the count cover every kind of generated token."""
    e2e_s: _Seconds | None = None
    """End-to-end request time: request sent to last byte received."""
    http_status: int | None = None
    """The HTTP status of the response, for HTTP executors."""
    endpoint: str = ""
    """Which server ran it (an executor may spread sessions over several)."""
    rebuilt: bool = False
    """The worker lacked the session's history and padded the prompt instead (see
    ``TurnRequest.context_tokens``)."""
    error: str = ""
    """For a failed request: detail beyond the completion's short reason (the server's message,
    at most 1,000 characters)."""
    reasoning_tokens: _Count | None = None
    """Of ``output_tokens``, those the model spent reasoning (OpenAI
    ``usage.completion_tokens_details.reasoning_tokens``, else the executor's count of reasoning
    events); ``None`` when unknown. Content tokens are the rest."""
    ttft_content_s: _Seconds | None = None
    """Time to the first *content* token. ``ttft_s`` counts any generated token (reasoning or a
    tool call's arguments too), so a reasoning model shows its thinking time as the difference;
    ``None`` for a turn that produced no content (only tool calls) or without streaming."""
    tool_calls: _Count = 0
    """Tool calls the answer made."""
    request_id: str = ""
    """The ``X-Request-ID`` header the executor sent with the request (HTTP executors), so
    the credit's record can be joined with the server's own logs; empty when none was sent."""


_request_msgpack: Final = msgspec.msgpack.Decoder(TurnRequest)
_request_json: Final = msgspec.json.Decoder(TurnRequest)
_result_msgpack: Final = msgspec.msgpack.Decoder(RequestResult)
_encoder: Final = msgspec.msgpack.Encoder()


def encode_request(request: TurnRequest) -> bytes:
    """``request`` as payload bytes (a msgpack map)."""
    return _encoder.encode(request)


def decode_request(payload: bytes) -> TurnRequest:
    """A payload's ``TurnRequest`` (msgpack map, or JSON object if it starts with ``{``).

    Empty bytes are an empty request (every field at its default).

    Raises:
        msgspec.DecodeError: the payload is neither, or a field has the wrong type (the message
            names the field, e.g. ``$.input_tokens``).
    """
    if not payload:
        return TurnRequest()
    if payload[:1] == b"{":
        return _request_json.decode(payload)
    return _request_msgpack.decode(payload)


def encode_result(result: RequestResult) -> bytes:
    """``result`` as result bytes (a msgpack map)."""
    return _encoder.encode(result)


def decode_result(data: bytes) -> RequestResult | None:
    """The ``RequestResult`` in result bytes, or ``None`` if empty or not one.

    Results come from workers the reader does not control, so a bad one is not an error here:
    the caller counts the credit without metrics.
    """
    if not data:
        return None
    try:
        return _result_msgpack.decode(data)
    except msgspec.DecodeError:
        return None


def synthetic_text(
    tokens: int, *, seed: str = "", hash_ids: list[int] | None = None, block_tokens: int = 512
) -> str:
    """The text an executor sends for a turn given as a token count: ``tokens`` words.

    Without ``hash_ids`` the words are drawn from a generator seeded with ``seed`` (executors
    use the session id and the turn index, so every turn of every session is new text). With
    ``hash_ids`` the text is the concatenation of one ``block_tokens``-word block per id, each
    seeded by its id alone, cut to ``tokens`` words (and padded with fresh words if the blocks
    fall short): two prompts with the same leading ids share that prefix, as in the trace.

    Args:
        tokens: words to produce.
        seed: seeds the words when there are no ``hash_ids``.
        hash_ids: Mooncake-style block ids.
        block_tokens: words per block.
    """
    words: list[str] = []
    for block in hash_ids or ():
        if len(words) >= tokens:
            break
        words.extend(random.Random(block).choices(WORDS, k=block_tokens))
    if len(words) < tokens:
        rng = random.Random(zlib.crc32(seed.encode()))
        words.extend(rng.choices(WORDS, k=tokens - len(words)))
    return " ".join(words[:tokens])
