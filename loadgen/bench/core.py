"""``credit-router bench core``: the routing core alone, closed loop, no I/O.

Each scenario keeps ``concurrency`` credits in flight: every round takes the core's dispatches,
completes each batch from its worker (as a worker's ``CompletionBatch`` would arrive), and submits
one new credit per completion. A *decision* is one credit routed and its completion accounted
(a send + completion pair), the unit AIPerf's router figures use (119 k single-turn and 263 k
sticky per second at 64 workers on this machine class, ``docs/AIPERF.md`` §4).

Credits and completions are built before the timed loop: they are made by producers and
workers, not by the router. ``bytes_per_session`` is measured with ``tracemalloc`` over live
sticky entries, their key strings included.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

from protocol import PROTOCOL_VERSION, Completion, Credit, Status
from router_service.core.router import RouterCore

__all__ = ["run"]


def _core(workers: int, capacity: int) -> RouterCore:
    core = RouterCore(protocol_version=PROTOCOL_VERSION, max_sessions=10_000_000)
    for i in range(workers):
        core.worker_hello(
            f"worker-{i:04d}",
            incarnation="bench",
            protocol_version=PROTOCOL_VERSION,
            capacity=capacity,
            labels={},
            in_flight={},
            now=0.0,
        )
    core.take_effects()
    return core


def _credits(kind: str, total: int, concurrency: int) -> list[Credit]:
    """``total`` credits in submission order; sticky sessions interleave ``concurrency`` wide."""
    if kind == "single_turn":
        return [Credit(id=i, x_correlation_id=uuid.uuid4().hex) for i in range(total)]
    turns = 5
    sessions = [uuid.uuid4().hex for _ in range(concurrency)]
    out: list[Credit] = []
    cid = 0
    generation = 0
    while cid < total:
        for slot in range(concurrency):
            turn = generation % turns
            if turn == 0 and generation:
                sessions[slot] = uuid.uuid4().hex
            out.append(
                Credit(id=cid, x_correlation_id=sessions[slot], turn_index=turn, num_turns=turns)
            )
            cid += 1
            if cid == total:
                break
        generation += 1
    return out


def _closed_loop(
    core: RouterCore,
    credits: list[Credit],
    concurrency: int,
    batch: int,
    order: str = "interleaved",
) -> float:
    """Run every credit through ``core``; returns seconds spent. One submit call per batch.

    ``order``: ``"interleaved"`` submits new credits right after each completion call;
    ``"returns-first"`` completes the whole round first, then submits as many new credits
    (so each routing decision sees many workers with free slots)."""
    done = {
        c.id: Completion(seq=c.id, producer="bench", credit_id=c.id, status=Status.COMPLETED)
        for c in credits
    }
    feed: Iterator[Credit] = iter(credits)
    submit, complete, take = core.submit, core.complete, core.take_effects
    first = [next(feed) for _ in range(concurrency)]
    now = 1.0
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    for i in range(0, len(first), batch):
        submit("bench", first[i : i + batch], now)
    remaining = len(credits) - concurrency
    interleaved = order == "interleaved"
    while True:
        effects = take()
        if not effects.to_worker:
            break
        returned = 0
        for worker, item in effects.to_worker:
            if not isinstance(item, tuple):
                continue
            sent = item[1]
            for i in range(0, len(sent), batch):
                chunk = sent[i : i + batch]
                complete(worker, [done[c.id] for c in chunk], now)
                if not interleaved:
                    returned += len(chunk)
                elif remaining > 0:
                    n = min(len(chunk), remaining)
                    remaining -= n
                    submit("bench", [next(feed) for _ in range(n)], now)
        while returned and remaining > 0:
            n = min(batch, returned, remaining)
            returned -= n
            remaining -= n
            submit("bench", [next(feed) for _ in range(n)], now)
        now += 0.001
    elapsed = time.perf_counter() - start
    gc.enable()
    assert core.stats.outcomes["completed"] == len(credits), "bench lost credits"
    return elapsed


def _bytes_per_session(sessions: int = 50_000) -> float:
    core = _core(8, capacity=sessions)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    credits = [
        Credit(id=i, x_correlation_id=str(uuid.uuid4()), num_turns=5) for i in range(sessions)
    ]
    core.submit("bench", credits, 1.0)
    effects = core.take_effects()
    for worker, item in effects.to_worker:
        if not isinstance(item, tuple):
            continue
        producer, sent = item
        core.complete(
            worker,
            [
                Completion(seq=0, producer=producer, credit_id=c.id, status=Status.COMPLETED)
                for c in sent
            ],
            2.0,
        )
    del credits, effects, sent, item
    core.take_effects()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(core.sessions) == sessions
    return used / sessions


def run(
    *, credits: int = 400_000, concurrency: int = 1024, repeat: int = 3
) -> list[dict[str, Any]]:
    """Run every scenario ``repeat`` times; each result row reports the best and the median."""
    rows: list[dict[str, Any]] = []
    for kind in ("single_turn", "sticky_5_turn"):
        for workers in (8, 64):
            for batch in (64, 1):
                n = credits if batch > 1 else credits // 4
                rates = []
                for _ in range(repeat):
                    core = _core(workers, capacity=10 * concurrency)
                    elapsed = _closed_loop(core, _credits(kind, n, concurrency), concurrency, batch)
                    rates.append(n / elapsed)
                rates.sort()
                rows.append(
                    {
                        "bench": "core",
                        "scenario": kind,
                        "workers": workers,
                        "batch": batch,
                        "concurrency": concurrency,
                        "credits": n,
                        "decisions_per_s_best": round(rates[-1]),
                        "decisions_per_s_median": round(rates[len(rates) // 2]),
                        "target_decisions_per_s": 1_000_000,
                    }
                )
    rows.append(
        {
            "bench": "core",
            "scenario": "memory",
            "bytes_per_live_session": round(_bytes_per_session(), 1),
            "target_bytes_per_live_session": 400,
        }
    )
    return rows
