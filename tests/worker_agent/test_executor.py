"""The simulated GPU host: payloads, the hash chain, the prefix cache, timing, cancellation."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from protocol.inference import decode_result
from protocol.messages import BranchMode, Credit, Status
from worker_agent.core import Session, SessionTable, Turn
from worker_agent.executor import (
    ExecResult,
    PrefixCache,
    SimExecutor,
    SimResult,
    block_hashes,
)


def credit(session: str = "s", turn_index: int = 0, payload: bytes = b"", **kw: object) -> Credit:
    return Credit(
        id=turn_index,
        x_correlation_id=session,
        turn_index=turn_index,
        payload=payload,
        **kw,  # type: ignore[arg-type]
    )


def tokens(input_tokens: int, output_tokens: int) -> bytes:
    return msgspec.msgpack.encode({"input_tokens": input_tokens, "output_tokens": output_tokens})


def decode(result: ExecResult | None) -> SimResult:
    assert result is not None
    assert result.status is Status.COMPLETED
    return msgspec.msgpack.decode(result.result, type=SimResult)


def run(
    sim: SimExecutor, session: Session, payload: bytes = b"", *, final: bool = False
) -> SimResult:
    """One zero-latency turn, appended to the session's history as the agent would."""
    index = len(session.history)
    turn = credit(session.x_correlation_id, index, payload, num_turns=index + (1 if final else 2))
    result = sim.execute_nowait(turn, session)
    out = decode(result)
    assert result is not None
    if result.turn is not None:  # none for a final turn: no later turn reads the history
        session.history.append(result.turn)
    return out


# ------------------------------------------------------------------------------------ payloads


def test_empty_payload_takes_the_defaults() -> None:
    sim = SimExecutor(zero_latency=True, default_input_tokens=100, default_output_tokens=9)
    result = run(sim, Session("s"))
    assert (result.input_tokens, result.output_tokens, result.cached_tokens) == (100, 9, 0)


@pytest.mark.parametrize(
    "payload",
    [
        tokens(300, 7),
        b'{"input_tokens": 300, "output_tokens": 7, "turn": 1}',  # JSON, extra keys ignored
        msgspec.msgpack.encode({"input_tokens": 300, "output_tokens": 7, "model": "x"}),
    ],
)
def test_payload_msgpack_or_json(payload: bytes) -> None:
    result = run(SimExecutor(zero_latency=True), Session("s"), payload)
    assert (result.input_tokens, result.output_tokens) == (300, 7)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgspec.msgpack.encode({"input_tokens": -1}),
        msgspec.msgpack.encode({"input_tokens": "many"}),
        msgspec.msgpack.encode([1, 2]),
        b'{"output_tokens": 3.5}',
    ],
)
def test_invalid_payload_fails_the_credit(payload: bytes) -> None:
    sim = SimExecutor(zero_latency=True)
    result = sim.execute_nowait(credit(payload=payload), Session("s"))
    assert result == ExecResult(Status.FAILED, reason="invalid_payload")


def test_result_is_a_self_describing_map() -> None:
    result = SimExecutor(zero_latency=True).execute_nowait(credit(), Session("s"))
    assert result is not None
    assert set(msgspec.msgpack.decode(result.result)) == {
        "input_tokens",
        "cached_tokens",
        "output_tokens",
        "ttft_s",
        "itl_s",
        "e2e_s",
    }
    decoded = decode_result(result.result)  # protocol.inference's schema, read back
    assert decoded is not None
    assert (decoded.input_tokens, decoded.cached_tokens, decoded.output_tokens) == (256, 0, 32)
    assert decoded.ttft_s is not None
    assert decoded.e2e_s == pytest.approx(decoded.ttft_s + 32 * 0.004)


# -------------------------------------------------------------------------------- prefix cache


def test_hash_chain_identifies_whole_prefixes() -> None:
    stream = [(1, 100), (2, 100)]
    hashes = block_hashes(stream, 64)
    assert len(hashes) == 3  # 200 tokens: three full blocks, the partial fourth is not cached
    assert block_hashes([(1, 100), (3, 100)], 64)[:1] == hashes[:1]  # shared first block
    assert block_hashes([(1, 100), (3, 100)], 64)[1:] != hashes[1:]
    assert block_hashes([(9, 100), (2, 100)], 64)[0] != hashes[0]
    assert block_hashes([*stream, (4, 60)], 64)[:3] == hashes  # extending keeps the prefix


def test_prefix_cache_matches_leading_blocks_and_evicts_lru() -> None:
    cache = PrefixCache(3)
    cache.insert([1, 2, 3])
    assert cache.match([1, 2, 9, 3]) == 2  # stops at the first miss
    cache.insert([4])  # evicts 3, the least recently used (1 and 2 were just matched)
    assert cache.match([3]) == 0
    assert cache.match([1, 2, 4]) == 3
    assert cache.evicted == 1
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixCache(0)


def test_next_turn_hits_the_cache_and_is_faster_than_a_cold_prompt() -> None:
    sim = SimExecutor(zero_latency=True, base_ttft_s=0.01, prefill_s_per_token=0.001)
    session = Session("s")
    first = run(sim, session, tokens(256, 32))
    second = run(sim, session, tokens(256, 32))
    assert second.input_tokens == 256 + 32 + 256
    assert second.cached_tokens == 256 + 0  # four full blocks of the first turn's 288 tokens
    cold = run(sim, Session("cold"), tokens(second.input_tokens, 32))
    assert cold.cached_tokens == 0
    assert second.ttft_s < cold.ttft_s
    assert first.ttft_s == pytest.approx(0.01 + 256 * 0.001)
    assert sim.cached_tokens_total == 256


def test_a_session_that_cannot_go_on_leaves_the_cache_alone() -> None:
    sim = SimExecutor(zero_latency=True)
    run(sim, Session("single"), tokens(1000, 100), final=True)  # single turn, no children
    assert len(sim.cache) == 0  # nothing could ever match its blocks
    session = Session("s")
    run(sim, session, tokens(1000, 100))
    blocks = len(sim.cache)
    assert blocks == 1100 // 64
    last = run(sim, session, tokens(100, 10), final=True)
    assert last.cached_tokens == blocks * 64  # the final turn still finds its prefix
    assert len(sim.cache) == blocks  # ... and adds nothing


def test_fork_child_shares_its_parents_prefix_spawn_child_does_not() -> None:
    sim = SimExecutor(zero_latency=True)
    table = SessionTable()
    parent_credit = Credit(id=1, x_correlation_id="p", num_turns=2, fork_count=1)
    parent = table.begin(parent_credit)
    result = sim.execute_nowait(parent_credit, parent)
    assert result is not None
    table.end(parent_credit, parent, completed=True, turn=result.turn)
    kinds = {"fork": BranchMode.FORK, "spawn": BranchMode.SPAWN}
    hits = {}
    for name, mode in kinds.items():
        child = Credit(
            id=2, x_correlation_id=name, parent_correlation_id="p", branch_mode=mode, num_turns=2
        )
        hits[name] = decode(sim.execute_nowait(child, table.begin(child))).cached_tokens
    assert hits["fork"] > 0
    assert hits["spawn"] == 0


# ------------------------------------------------------------------------------------- timing


async def test_zero_latency_never_sleeps() -> None:
    sim = SimExecutor(zero_latency=True, decode_s_per_token=10.0)
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await sim.execute(credit(payload=tokens(10, 1000)), Session("s"), calls.append)
    assert loop.time() - started < 0.5
    assert decode(result).output_tokens == 1000
    assert calls == [pytest.approx(0.0, abs=0.05)]


async def test_latency_mode_reports_first_token_then_decodes() -> None:
    sim = SimExecutor(base_ttft_s=0.03, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    assert sim.execute_nowait(credit(), Session("s")) is None
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await sim.execute(credit(payload=tokens(10, 30)), Session("s"), calls.append)
    elapsed = loop.time() - started
    assert len(calls) == 1
    assert calls[0] >= 0.025
    assert result.ttft_s == calls[0]
    assert elapsed >= calls[0] + 0.025  # 30 tokens of decode
    assert decode(result).ttft_s == pytest.approx(0.03)


async def test_cancellation_propagates_out_of_the_executor() -> None:
    sim = SimExecutor(base_ttft_s=10.0)
    task = asyncio.create_task(sim.execute(credit(), Session("s"), lambda _: None))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="block_tokens"):
        SimExecutor(block_tokens=0)
    with pytest.raises(ValueError, match=">= 0"):
        SimExecutor(decode_s_per_token=-1.0)


def test_turn_sizes_come_from_the_payload() -> None:
    sim = SimExecutor(zero_latency=True)
    result = sim.execute_nowait(credit(payload=tokens(12, 3), num_turns=2), Session("s"))
    assert result is not None
    assert isinstance(result.turn, Turn)
    assert (result.turn.input_tokens, result.turn.output_tokens) == (12, 3)
    last = sim.execute_nowait(credit(payload=tokens(12, 3)), Session("t"))
    assert last is not None
    assert last.turn is None  # a lone final turn: nobody will read its history
    assert decode(last).input_tokens == 12


# ------------------------------------------------------------------- the per-credit shortcuts


def segments_of(turns: list[Turn]) -> list[tuple[int, int]]:
    out = []
    for t in turns:
        out += [(2 * t.uid, t.input_tokens), (2 * t.uid + 1, t.output_tokens)]
    return out


def test_resumed_hash_chain_equals_hashing_the_whole_stream() -> None:
    sim = SimExecutor(zero_latency=True, block_tokens=16)
    history: list[Turn] = []
    for size in (5, 40, 16, 1, 33, 0, 70):  # partial blocks carried across turns
        turn = Turn(size, size // 3 + 1)
        hashes = sim._hashes(history, turn, True)  # resumed from the previous turn's chain
        assert hashes == block_hashes(segments_of([*history, turn]), 16)
        history.append(turn)
    # A FORK copy of the history resumes the same chain and then goes its own way.
    child = list(history)
    child_turn = Turn(9, 9)
    assert sim._hashes(child, child_turn, True) == block_hashes(
        segments_of([*child, child_turn]), 16
    )
    # A history that ends in a known turn after another prefix is hashed whole, not resumed.
    other = [Turn(7, 7), history[-1]]
    last = Turn(3, 3)
    assert sim._hashes(other, last, True) == block_hashes(segments_of([*other, last]), 16)


def test_matching_without_refresh_then_inserting_leaves_the_same_lru() -> None:
    def cache() -> PrefixCache:
        c = PrefixCache(8)
        c.insert([1, 2, 3, 4, 5, 6, 7, 8])
        return c

    refreshed, lazy = cache(), cache()
    prompt, stream = [2, 3, 9], [2, 3, 9, 10, 11]
    assert refreshed.match(prompt) == lazy.match(prompt, refresh=False) == 2
    refreshed.insert(stream)
    lazy.insert(stream)
    assert list(refreshed._blocks) == list(lazy._blocks) == [4, 5, 6, 7, 8, 2, 3, 9, 10, 11][-8:]


def test_lone_turn_fast_path_matches_execute_nowait_and_counts_once() -> None:
    fast, general = SimExecutor(zero_latency=True), SimExecutor(zero_latency=True)
    for payload in (b"", tokens(12, 3), tokens(12, 3), b"\xc1", b"{}"):
        lone = credit(payload=payload)
        assert fast.execute_lone_nowait(lone) == general.execute_nowait(lone, Session("s"))
    assert fast.prompt_tokens_total == general.prompt_tokens_total
    assert [getattr(fast.tokens, n) for n in fast.tokens.__slots__] == [
        getattr(general.tokens, n) for n in general.tokens.__slots__
    ]
    assert SimExecutor().execute_lone_nowait(credit()) is None  # with latency: a task
