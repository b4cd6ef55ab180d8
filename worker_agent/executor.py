"""Executors: what actually runs a credit's request, behind one ``Executor`` protocol.

The agent owns the credit's life (its task, its session, its completion); an executor only turns
``(credit, session)`` into an ``ExecResult``. The contract, for this simulator and for the
OpenAI HTTP executor a later issue adds:

* ``execute`` is a coroutine run in its own task. Cancellation is ``Task.cancel()``: the
  executor must let ``CancelledError`` propagate (clean up in ``finally``); the agent knows why
  it cancelled and reports the completion.
* ``on_first_token(ttft_s)`` is called when the first token arrives (at most once; extra calls
  are ignored), so that the agent can send ``FirstToken`` while the response streams.
* A failure is either an ``ExecResult`` with ``status=FAILED`` and a short, low-cardinality
  ``reason`` (``http_503``), or an exception, reported as failed with the exception's class name.
* ``execute_nowait`` lets an executor that can answer without waiting (the zero-latency
  simulator) skip the task altogether; executors that always wait return ``None``.
* Optionally, ``execute_lone_nowait(credit)``: ``execute_nowait`` for a lone turn (no history,
  its session ends with it, no FORK children), which the agent then runs without building a
  ``Session`` or a per-credit record. Same result and side effects as ``execute_nowait``;
  ``None`` without any effect when it cannot answer at once. Not part of ``Executor``: the agent
  looks it up once (``getattr``), so executors without it need nothing.
* The session is the agent's: read ``session.history``, never keep or mutate it. A completed
  turn hands back the ``Turn`` to append (``ExecResult.turn``; it may be ``None`` for a final
  turn that declares no FORK children, whose history nobody will read).

``SimExecutor`` is a simulated GPU host: an LRU prefix cache of 64-token block hashes (the hash
chain of the session's token stream, as vLLM's automatic prefix caching keys blocks), a time to
first token that grows with the prompt tokens missing from that cache, and a decode time per
output token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Final, Protocol

import msgspec

from protocol.inference import RequestResult
from protocol.messages import Credit, Status
from worker_agent.core import Session, Turn

__all__ = [
    "ExecResult",
    "Executor",
    "FirstTokenCallback",
    "PrefixCache",
    "SimExecutor",
    "SimRequest",
    "SimResult",
]

logger = logging.getLogger(__name__)

FirstTokenCallback = Callable[[float], None]
"""Called with the time to first token, in seconds from the start of the execution."""


class ExecResult(msgspec.Struct, frozen=True, gc=False):
    """How an execution ended (the agent turns it into a ``Completion``).

    Attributes:
        status: ``COMPLETED`` or ``FAILED`` (cancellation is the agent's to report).
        reason: for ``FAILED``: short and low-cardinality, e.g. ``http_503``.
        ttft_s: time to first token, if a token came.
        result: opaque bytes for the producer.
        turn: the finished turn, appended to the session's history when completed; ``None``
            is allowed when the session ends with this turn and forks nothing (no later turn
            will read the history).
    """

    status: Status
    reason: str = ""
    ttft_s: float | None = None
    result: bytes = b""
    turn: Turn | None = None


class TokenCounts:
    """Token totals of the credits an executor completed, for ``/metrics``.

    The definitions are the report's (``loadgen.report``): ``prompt`` counts every completed
    credit's prompt tokens; ``prompt_cache_reported`` only those whose server said how many were
    cached, which ``cached`` sums. The prefix-cache hit rate is ``cached /
    prompt_cache_reported``, as in the report. ``reasoning`` is part of ``completion``.
    """

    __slots__ = ("cached", "completion", "prompt", "prompt_cache_reported", "reasoning")

    def __init__(self) -> None:
        self.prompt = 0
        self.prompt_cache_reported = 0
        self.cached = 0
        self.completion = 0
        self.reasoning = 0

    def add(self, prompt: int, cached: int | None, completion: int, reasoning: int = 0) -> None:
        """Count one completed credit's tokens."""
        self.prompt += prompt
        if cached is not None:
            self.prompt_cache_reported += prompt
            self.cached += cached
        self.completion += completion
        self.reasoning += reasoning


class Executor(Protocol):
    """Runs credits. One instance per worker agent; it may keep per-worker state (a cache)."""

    @property
    def kind(self) -> str:
        """A short label for logs and the ``Hello`` labels, e.g. ``"sim"``."""
        ...

    def execute_nowait(self, credit: Credit, session: Session) -> ExecResult | None:
        """Finish the credit synchronously if that needs no waiting, else return ``None``."""
        ...

    async def execute(
        self, credit: Credit, session: Session, on_first_token: FirstTokenCallback
    ) -> ExecResult:
        """Run the credit's request. Cancellable; must let ``CancelledError`` through."""
        ...

    async def aclose(self) -> None:
        """Release resources (connections); called once when the agent stops."""
        ...


# ------------------------------------------------------------------------------ the simulator

_TokenCount = Annotated[int, msgspec.Meta(ge=0, le=2_000_000)]


class SimRequest(msgspec.Struct, frozen=True):
    """The simulator's reading of a credit's opaque payload (a msgpack or JSON map).

    Unknown keys are ignored; missing ones take the executor's defaults.
    """

    input_tokens: _TokenCount | None = None
    output_tokens: _TokenCount | None = None


class SimResult(msgspec.Struct, frozen=True):
    """The result bytes the simulator returns to the producer (msgpack map, self-describing).

    A view of ``protocol.inference.RequestResult``, which is what the simulator writes (with
    its modelled ``itl_s`` and ``e2e_s`` too): these four keys are always present.
    """

    input_tokens: int
    """Prompt tokens: the session's history plus the turn's new input."""
    cached_tokens: int
    """Prompt tokens found in this worker's prefix cache."""
    output_tokens: int
    ttft_s: float
    """Modelled time to first token (also when ``zero_latency`` skips the wait)."""


_msgpack_request: Final = msgspec.msgpack.Decoder(SimRequest)
_json_request: Final = msgspec.json.Decoder(SimRequest)
_result_encoder: Final = msgspec.msgpack.Encoder()
_DEFAULT_REQUEST: Final = SimRequest()
_LONE_MEMO_PAYLOAD_MAX: Final = 256
"""Payloads up to this many bytes key the lone-turn memo (larger ones are parsed each time)."""
_CHAIN_MEMO_MAX: Final = 4_096
"""Hash chains kept (the oldest goes first): one per live multi-turn session at most."""
_RESULT_MEMO_MAX: Final = 4_096
"""Encoded results memoized by ``(prompt, cached, output)``: with the same token counts, most
turns of a benchmark return identical bytes, and encoding is a third of the simulator's cost."""


class PrefixCache:
    """An LRU set of KV block hashes: what a GPU host's prefix cache holds.

    Args:
        capacity_blocks: how many blocks fit; the least recently used go first.
    """

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: list[int], refresh: bool = True) -> int:
        """How many leading blocks are cached (a prefix match stops at the first miss).

        The matched blocks become the most recently used, unless ``refresh`` is false (the
        caller inserts them all at once, which does the same).
        """
        blocks = self._blocks
        hits = 0
        if not refresh:
            for h in hashes:
                if h not in blocks:
                    break
                hits += 1
            return hits
        for h in hashes:
            if h not in blocks:
                break
            blocks.move_to_end(h)
            hits += 1
        return hits

    def insert(self, hashes: list[int]) -> None:
        """Cache these blocks (most recently used), evicting the oldest beyond capacity."""
        blocks = self._blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
            self.evicted += 1

    def clear(self) -> None:
        """Forget every block."""
        self._blocks.clear()


def block_hashes(segments: list[tuple[int, int]], block_tokens: int) -> list[int]:
    """The hash chain of the full blocks of a token stream.

    The simulator has no real tokens: a stream is a list of segments ``(segment id, length)``,
    and block ``i`` hashes its predecessor's hash with the pieces of segments it covers, so two
    streams share a block hash exactly when they share the whole prefix up to that block.

    Args:
        segments: the stream, in order.
        block_tokens: tokens per block.

    Returns:
        One hash per full block (a partial last block is not cacheable).
    """
    hashes: list[int] = []
    _extend_chain(hashes, 0, [], 0, segments, block_tokens)
    return hashes


_Pieces = list[tuple[int, int, int]]


def _extend_chain(
    hashes: list[int],
    previous: int,
    pieces: _Pieces,
    filled: int,
    segments: list[tuple[int, int]],
    block_tokens: int,
) -> tuple[int, _Pieces, int]:
    """``block_hashes`` resumed: append to ``hashes`` the blocks ``segments`` complete, from the
    chain's state (last hash, pieces of the partial block, tokens in it); returns the new state.
    """
    for seg_id, length in segments:
        offset = 0
        while offset < length:
            take = block_tokens - filled
            if take > length - offset:
                take = length - offset
            pieces.append((seg_id, offset, take))
            offset += take
            filled += take
            if filled == block_tokens:
                previous = hash((previous, *pieces))
                hashes.append(previous)
                pieces = []
                filled = 0
    return previous, pieces, filled


class _Chain(msgspec.Struct, frozen=True, gc=False):
    """The block-hash chain of a history, to resume when a turn extends it."""

    history: tuple[Turn, ...]
    """The turns it covers (a lookup checks them: the chain is only reused for equal turns)."""
    block_tokens: int
    hashes: tuple[int, ...]
    previous: int
    pieces: tuple[tuple[int, int, int], ...]
    filled: int


class _Plan(msgspec.Struct, frozen=True, gc=False):
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    ttft_s: float
    decode_s: float
    prompt_blocks: list[int]
    all_blocks: list[int]
    turn: Turn


class SimExecutor:
    """A simulated GPU host with a prefix cache.

    Time to first token is ``base_ttft_s + uncached prompt tokens × prefill_s_per_token``, decode
    time ``output tokens × decode_s_per_token``. The prompt of a turn is the session's history
    (every earlier turn's input and output) plus the turn's new input, so a session's next turn
    and a FORK child's first turn find their prefix cached on this worker.

    Args:
        zero_latency: finish every credit at once, without sleeping (benchmarks of the router).
        base_ttft_s: fixed part of the time to first token.
        prefill_s_per_token: prefill time per uncached prompt token.
        decode_s_per_token: decode time per output token.
        block_tokens: tokens per KV block (the cache's unit).
        cache_blocks: the cache's capacity in blocks.
        default_input_tokens: new input tokens of a turn whose payload does not say.
        default_output_tokens: output tokens of a turn whose payload does not say.
    """

    def __init__(
        self,
        *,
        zero_latency: bool = False,
        base_ttft_s: float = 0.02,
        prefill_s_per_token: float = 0.00002,
        decode_s_per_token: float = 0.004,
        block_tokens: int = 64,
        cache_blocks: int = 65_536,
        default_input_tokens: int = 256,
        default_output_tokens: int = 32,
    ) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        if min(base_ttft_s, prefill_s_per_token, decode_s_per_token) < 0:
            raise ValueError("simulated times must be >= 0")
        self.zero_latency = zero_latency
        self.base_ttft_s = base_ttft_s
        self.prefill_s_per_token = prefill_s_per_token
        self.decode_s_per_token = decode_s_per_token
        self.block_tokens = block_tokens
        self.default_input_tokens = default_input_tokens
        self.default_output_tokens = default_output_tokens
        self.cache = PrefixCache(cache_blocks)
        self.prompt_tokens_total = 0
        self.tokens = TokenCounts()
        """Tokens of completed credits (``/metrics``)."""
        self.cached_tokens_total = 0
        self._memo: dict[tuple[int, int, int], bytes] = {}
        self._lone_memo: dict[bytes, tuple[ExecResult, int, int]] = {}
        self._chains: OrderedDict[int, _Chain] = OrderedDict()
        """Block-hash chains of the turns of sessions that go on, by the last turn's uid."""

    def __repr__(self) -> str:
        return (
            f"<SimExecutor zero_latency={self.zero_latency} cache={len(self.cache)}/"
            f"{self.cache.capacity_blocks} blocks hit_tokens={self.cached_tokens_total}/"
            f"{self.prompt_tokens_total}>"
        )

    @property
    def kind(self) -> str:
        """``"sim"``."""
        return "sim"

    def execute_nowait(self, credit: Credit, session: Session) -> ExecResult | None:
        """In ``zero_latency`` mode, the whole execution, now; otherwise ``None``."""
        if not self.zero_latency:
            return None
        if (
            not session.history
            and credit.turn_index >= credit.num_turns - 1
            and not credit.fork_count
        ):
            return self._lone_turn(credit)
        # (The insert right after the match refreshes every matched block again, in the same
        # order, before any eviction: the match need not.)
        plan = self._plan(credit, session, refresh=False)
        if isinstance(plan, ExecResult):
            return plan
        self.cache.insert(plan.all_blocks)
        return self._result(plan, 0.0)

    def execute_lone_nowait(self, credit: Credit) -> ExecResult | None:
        """``execute_nowait`` of a lone turn, one the agent runs without a ``Session``.

        A lone turn has no history and its session ends with it (a single-turn root or SPAWN
        child that declares no FORK children): the agent calls this instead of building a
        session nobody reads. Same result and counts as ``execute_nowait``; ``None`` (with no
        effect) when the execution has to wait.
        """
        if not self.zero_latency:
            return None
        hit = self._lone_memo.get(credit.payload)
        if hit is None:
            return self._lone_turn(credit)
        result, prompt, output = hit  # _lone_turn's memo hit, inlined (once per credit)
        self.prompt_tokens_total += prompt
        tokens = self.tokens
        tokens.prompt += prompt
        tokens.prompt_cache_reported += prompt
        tokens.completion += output
        return result

    async def execute(
        self, credit: Credit, session: Session, on_first_token: FirstTokenCallback
    ) -> ExecResult:
        """Sleep through prefill and decode, reporting the first token in between."""
        plan = self._plan(credit, session)
        if isinstance(plan, ExecResult):
            return plan
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        started = time.perf_counter()
        if not self.zero_latency:
            await asyncio.sleep(plan.ttft_s)
        self.cache.insert(plan.prompt_blocks)  # prefill done: the prompt's KV is cached
        ttft = time.perf_counter() - started
        on_first_token(ttft)
        if not self.zero_latency:
            await asyncio.sleep(plan.decode_s)
        self.cache.insert(plan.all_blocks)  # the response's KV is cached too
        return self._result(plan, ttft)

    async def aclose(self) -> None:
        """Nothing to release."""

    def _lone_turn(self, credit: Credit) -> ExecResult:
        """A turn without history whose session ends with it: nothing to look up or cache.

        The dominant benchmark case (single-turn sessions), so it skips the plan; no ``Turn``
        either, since no later turn will read this session's history. Its result depends on the
        payload alone, so the (frozen, shared) ``ExecResult`` is memoized by payload bytes.
        """
        payload = credit.payload
        memo = self._lone_memo
        hit = memo.get(payload)
        if hit is None:
            request = self._request(payload)
            if request is None:
                return ExecResult(Status.FAILED, reason="invalid_payload")
            new_input = request.input_tokens
            prompt = self.default_input_tokens if new_input is None else new_input
            output = request.output_tokens
            if output is None:
                output = self.default_output_tokens
            key = (prompt, 0, output)
            encoded = self._memo.get(key)
            if encoded is None:
                encoded = self._encode_result(
                    key, self.base_ttft_s + prompt * self.prefill_s_per_token
                )
            hit = (ExecResult(Status.COMPLETED, ttft_s=0.0, result=encoded), prompt, output)
            if len(payload) <= _LONE_MEMO_PAYLOAD_MAX:
                if len(memo) >= _RESULT_MEMO_MAX:
                    memo.clear()
                memo[payload] = hit
        result, prompt, output = hit
        self.prompt_tokens_total += prompt
        tokens = self.tokens  # TokenCounts.add(prompt, 0, output), inlined
        tokens.prompt += prompt
        tokens.prompt_cache_reported += prompt
        tokens.completion += output
        return result

    def _plan(self, credit: Credit, session: Session, refresh: bool = True) -> _Plan | ExecResult:
        """What executing the credit takes. ``refresh=False``: the caller inserts the plan's
        ``all_blocks`` at once, so matching the prompt need not refresh the blocks it finds
        (it still does when the plan keeps no blocks: nothing will refresh them)."""
        request = self._request(credit.payload)
        if request is None:
            return ExecResult(Status.FAILED, reason="invalid_payload")
        new_input = (
            self.default_input_tokens if request.input_tokens is None else request.input_tokens
        )
        output = (
            self.default_output_tokens if request.output_tokens is None else request.output_tokens
        )
        turn = Turn(new_input, output)
        history = session.history
        prompt = new_input
        for past in history:
            prompt += past.input_tokens + past.output_tokens
        # A turn's tokens belong to its session (and to FORK copies of it): the cache can hold
        # a prefix of this prompt only if there is history, and this turn's blocks can only be
        # matched later if the session goes on or forks. Otherwise skip the hashing and leave
        # the cache alone (inserting would only evict blocks that can still hit).
        keep = credit.turn_index < credit.num_turns - 1 or credit.fork_count > 0
        all_blocks: list[int] = []
        prompt_blocks: list[int] = []
        cached = 0
        if history or keep:
            hashes = self._hashes(history, turn, keep)
            in_prompt = hashes[: prompt // self.block_tokens]
            if history:
                cached = self.cache.match(in_prompt, refresh or not keep) * self.block_tokens
            if keep:
                prompt_blocks, all_blocks = in_prompt, hashes
        self.prompt_tokens_total += prompt
        self.cached_tokens_total += cached
        return _Plan(
            prompt_tokens=prompt,
            cached_tokens=cached,
            output_tokens=output,
            ttft_s=self.base_ttft_s + (prompt - cached) * self.prefill_s_per_token,
            decode_s=output * self.decode_s_per_token,
            prompt_blocks=prompt_blocks,
            all_blocks=all_blocks,
            turn=turn,
        )

    def _hashes(self, history: list[Turn], turn: Turn, keep: bool) -> list[int]:
        """``block_hashes`` of the history's and the turn's segments (each turn is an input and
        an output segment), resuming the chain kept for the history when there is one, and
        keeping this turn's for the next one (``keep``: the session goes on or forks).

        Same hashes as hashing the whole stream, in O(this turn) rather than O(history).
        """
        block_tokens = self.block_tokens
        chains = self._chains
        hashes: list[int]
        pieces: _Pieces
        segments: list[tuple[int, int]] = []
        known = chains.get(history[-1].uid) if history else None
        if (
            known is not None
            and known.block_tokens == block_tokens
            and known.history == tuple(history)
        ):
            hashes = list(known.hashes)
            previous, pieces, filled = known.previous, list(known.pieces), known.filled
        else:
            hashes, previous, pieces, filled = [], 0, [], 0
            for past in history:
                segments.append((2 * past.uid, past.input_tokens))
                segments.append((2 * past.uid + 1, past.output_tokens))
        segments.append((2 * turn.uid, turn.input_tokens))
        segments.append((2 * turn.uid + 1, turn.output_tokens))
        previous, pieces, filled = _extend_chain(
            hashes, previous, pieces, filled, segments, block_tokens
        )
        if keep:
            if len(chains) >= _CHAIN_MEMO_MAX:
                chains.popitem(last=False)  # the oldest
            chains[turn.uid] = _Chain(
                (*history, turn), block_tokens, tuple(hashes), previous, tuple(pieces), filled
            )
        return hashes

    @staticmethod
    def _request(payload: bytes) -> SimRequest | None:
        if not payload:
            return _DEFAULT_REQUEST
        try:
            if payload[:1] == b"{":  # JSON (as in PROTOCOL.md's examples); msgpack maps are 0x8_
                return _json_request.decode(payload)
            return _msgpack_request.decode(payload)
        except msgspec.DecodeError as exc:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("invalid sim payload: %s", exc)
            return None

    def _result(self, plan: _Plan, ttft_s: float) -> ExecResult:
        key = (plan.prompt_tokens, plan.cached_tokens, plan.output_tokens)
        encoded = self._memo.get(key)
        if encoded is None:
            encoded = self._encode_result(key, plan.ttft_s)
        self.tokens.add(plan.prompt_tokens, plan.cached_tokens, plan.output_tokens)
        return ExecResult(Status.COMPLETED, ttft_s=ttft_s, result=encoded, turn=plan.turn)

    def _encode_result(self, key: tuple[int, int, int], ttft_s: float) -> bytes:
        if len(self._memo) >= _RESULT_MEMO_MAX:
            self._memo.clear()
        prompt, cached, output = key
        encoded = _result_encoder.encode(
            RequestResult(  # the schema every bundled executor emits (protocol.inference)
                input_tokens=prompt,
                cached_tokens=cached,
                output_tokens=output,
                ttft_s=ttft_s,
                itl_s=self.decode_s_per_token if output > 1 else None,
                e2e_s=ttft_s + output * self.decode_s_per_token,
            )
        )
        self._memo[key] = encoded
        return encoded
