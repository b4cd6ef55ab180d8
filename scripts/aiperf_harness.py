"""``make bench-peers``: AIPerf's ``StickyCreditRouter`` in the closed loop of ``bench core``.

Runs inside a throwaway virtual environment that has ``aiperf`` installed (``make bench-peers``
builds it); it imports nothing from this project, so the project's own environment never needs
AIPerf. Prints one JSON object per run on stdout.

The router is the real class with its real ``__init__``, ``send_credit`` and return handler;
only its communication layer is replaced by one whose ``send_to`` records ``(worker, credit)``
and does nothing else (no encode, no socket), the same "no I/O" footing as our core bench.
The loop matches ``loadgen/bench/core.py``: ``concurrency`` credits in flight, every round
returns each dispatched credit from its worker and sends one new credit per return, either
right after each return (``--order interleaved``) or after all of the round's returns
(``--order returns-first``). A
*decision* is one ``send_credit`` plus its ``CreditReturn`` through the router's handler.
Credits and returns are built before the timed loop; GC is off inside it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import time
import uuid
from types import SimpleNamespace
from typing import Any, ClassVar


class _Client:
    """Stands in for AIPerf's streaming ROUTER / PULL clients: records sends, nothing else."""

    def __init__(self, outbox: list[tuple[str, Any]]) -> None:
        self.outbox = outbox

    def register_receiver(self, handler: Any) -> None:
        self.handler = handler

    async def send_to(self, identity: str, message: Any) -> None:
        self.outbox.append((identity, message))


class _Comms:
    outbox: ClassVar[list[tuple[str, Any]]] = []

    def __init__(self, config: Any = None) -> None:
        pass

    def create_streaming_router_client(self, **_: Any) -> _Client:
        return _Client(_Comms.outbox)

    def create_streaming_pull_client(self, *_: Any, **__: Any) -> _Client:
        return _Client(_Comms.outbox)


def _router_class() -> Any:
    """AIPerf's sticky router class, found by name in the installed package."""
    from aiperf.common.mixins import communication_mixin

    # The mixin resolves its comms class through AIPerf's plugin registry; hand it ours.
    communication_mixin.plugins = SimpleNamespace(get_class=lambda *_: _Comms)  # type: ignore[attr-defined]
    from aiperf.credit import sticky_router

    return sticky_router.StickyCreditRouter


def _credits(kind: str, total: int, concurrency: int) -> list[Any]:
    from aiperf.common.enums import CreditPhase
    from aiperf.credit.structs import Credit

    def credit(i: int, session: str, turn: int, turns: int) -> Any:
        return Credit(
            id=i,
            phase=CreditPhase.PROFILING,
            conversation_id="c",
            x_correlation_id=session,
            turn_index=turn,
            num_turns=turns,
            issued_at_ns=0,
        )

    if kind == "single_turn":
        return [credit(i, uuid.uuid4().hex, 0, 1) for i in range(total)]
    turns = 5
    sessions = [uuid.uuid4().hex for _ in range(concurrency)]
    out: list[Any] = []
    generation = 0
    while len(out) < total:
        for slot in range(concurrency):
            turn = generation % turns
            if turn == 0 and generation:
                sessions[slot] = uuid.uuid4().hex
            out.append(credit(len(out), sessions[slot], turn, turns))
            if len(out) == total:
                break
        generation += 1
    return out


async def _closed_loop(
    cls: Any, workers: int, credits: list[Any], concurrency: int, order: str = "interleaved"
) -> float:
    from aiperf.credit.messages import CreditReturn, WorkerDispatchable

    _Comms.outbox = outbox = []
    run = SimpleNamespace(cfg=SimpleNamespace(comm_config=SimpleNamespace(comm_backend="bench")))
    router = cls(run=run, service_id="bench-router")
    handle = router._handle_router_message
    for i in range(workers):
        wid = f"worker-{i:04d}"
        await handle(wid, WorkerDispatchable(worker_id=wid))
    returns = {c.id: CreditReturn(credit=c) for c in credits}
    feed = iter(credits)
    send = router.send_credit
    remaining = len(credits) - concurrency
    interleaved = order == "interleaved"
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    for _ in range(concurrency):
        await send(next(feed))
    while outbox:
        # One round, grouped by worker in order of first dispatch, as our core hands a round's
        # dispatches out (``take_effects().dispatch`` is one batch per worker).
        rounds: dict[str, list[Any]] = {}
        for worker, credit in outbox:
            rounds.setdefault(worker, []).append(credit)
        outbox.clear()
        # "returns-first": a round's returns all arrive before its sends, so each send picks
        # among many workers with free slots (the loop; AIPerf scans them all).
        returned = 0
        for worker, sent in rounds.items():
            for credit in sent:
                await handle(worker, returns[credit.id])
                returned += 1
                if interleaved and remaining > 0:
                    remaining -= 1
                    await send(next(feed))
        for _ in range(0 if interleaved else min(returned, remaining)):
            remaining -= 1
            await send(next(feed))
    elapsed = time.perf_counter() - start
    gc.enable()
    if any(w.in_flight_credits for w in router._workers.values()):
        raise RuntimeError("AIPerf router did not drain: the loop lost credits")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=["single_turn", "sticky_5_turn"], required=True)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--credits", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=1024)
    parser.add_argument("--order", choices=["interleaved", "returns-first"], default="interleaved")
    args = parser.parse_args()
    cls = _router_class()
    credits = _credits(args.scenario, args.credits, args.concurrency)
    elapsed = asyncio.run(_closed_loop(cls, args.workers, credits, args.concurrency, args.order))
    print(
        json.dumps(
            {
                "system": f"aiperf {importlib.metadata.version('aiperf')} {cls.__name__}",
                "scenario": args.scenario,
                "order": args.order,
                "workers": args.workers,
                "credits": args.credits,
                "decisions_per_s": args.credits / elapsed,
            }
        )
    )


if __name__ == "__main__":
    main()
