"""An in-process simulation: a built-in agentic workload routed through the real core.

This is ``credit-router run``'s embedded default until the distributed runtime replaces it: no
sockets, a simulated clock, and simulated GPU workers whose time to first token grows with the
prompt tokens missing from their prefix cache. It shows, in seconds, what the router is for:
every turn of a session and every FORK child on the worker that holds the history, SPAWN
sub-agents spread out, nothing leaked, every credit ending exactly once.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from protocol import PROTOCOL_VERSION, BranchMode, Completion, Credit, Status
from router_service.core.invariants import check_invariants, check_no_leak
from router_service.core.router import RouterCore

__all__ = ["main"]

PREFILL_S_PER_TOKEN = 0.00002
DECODE_S_PER_TOKEN = 0.004
TURN_TOKENS = 600
OUTPUT_TOKENS = 120


@dataclass
class _Session:
    sid: str
    num_turns: int
    mode: BranchMode | None = None
    parent: str | None = None
    subagent: str | None = None
    turn: int = 0
    forks_at: dict[int, int] = field(default_factory=dict)
    spawns_at: dict[int, int] = field(default_factory=dict)
    history: int = 0
    """Tokens of history so far (prompt grows every turn)."""


def _workload(rng: random.Random, roots: int) -> list[_Session]:
    sessions = []
    for r in range(roots):
        s = _Session(f"root-{r}", rng.randint(2, 6))
        for turn in range(s.num_turns):
            if rng.random() < 0.15:
                s.forks_at[turn] = rng.randint(1, 2)
            if rng.random() < 0.15:
                s.spawns_at[turn] = rng.randint(1, 3)
        sessions.append(s)
    return sessions


class _Simulation:
    """Producer, workers and clock around one RouterCore."""

    def __init__(self, seed: int, workers: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.core = RouterCore(protocol_version=PROTOCOL_VERSION)
        self.names = [f"gpu-{i}" for i in range(workers)]
        for name in self.names:
            self.core.worker_hello(
                name,
                incarnation="sim",
                protocol_version=PROTOCOL_VERSION,
                capacity=16,
                labels={"sim": "1"},
                in_flight={},
                now=0.0,
            )
        self.cache: dict[str, set[str]] = {n: set() for n in self.names}
        self.ids = itertools.count()
        self.seq = itertools.count()
        self.clock = 0.0
        self.events: list[tuple[float, int, str]] = []
        self.by_credit: dict[int, tuple[_Session, Credit]] = {}
        self.placed: dict[str, set[str]] = {}
        self.ttfts: list[float] = []
        self.cached_turns = 0
        self.statuses: dict[str, int] = {}

    def submit(self, s: _Session, now: float) -> None:
        credit = Credit(
            id=next(self.ids),
            x_correlation_id=s.sid,
            turn_index=s.turn,
            num_turns=s.num_turns,
            parent_correlation_id=s.parent,
            branch_mode=s.mode,
            fork_count=s.forks_at.get(s.turn, 0),
            subagent_type=s.subagent,
            agent_depth=0 if s.parent is None else 1,
        )
        self.by_credit[credit.id] = (s, credit)
        self.core.submit("sim", [credit], now)

    def execute(self, worker: str, credit: Credit, now: float) -> None:
        """A simulated GPU host runs one turn; TTFT pays for the uncached prompt."""
        s, _ = self.by_credit[credit.id]
        self.placed.setdefault(s.sid, set()).add(worker)
        # FORK children inherit the parent's history, so its prefix counts as cached.
        prefix_owner = s.parent if s.mode is BranchMode.FORK and s.turn == 0 else s.sid
        hit = prefix_owner in self.cache[worker]
        self.cached_turns += hit
        new_tokens = TURN_TOKENS + (0 if hit else s.history)
        ttft = new_tokens * PREFILL_S_PER_TOKEN + self.rng.uniform(0.005, 0.02)
        self.ttfts.append(ttft)
        self.cache[worker].add(s.sid)
        done_at = now + ttft + OUTPUT_TOKENS * DECODE_S_PER_TOKEN
        heapq.heappush(self.events, (done_at, credit.id, worker))

    def on_completed(self, credit: Credit, now: float) -> None:
        """The producer's reaction: start declared children, then the next turn."""
        s, _ = self.by_credit[credit.id]
        s.history += TURN_TOKENS + OUTPUT_TOKENS
        rng = self.rng
        for k in range(credit.fork_count):
            sid = f"{s.sid}/fork{credit.turn_index}.{k}"
            child = _Session(sid, rng.randint(1, 3), BranchMode.FORK, s.sid, history=s.history)
            self.submit(child, now)
        for k in range(s.spawns_at.get(credit.turn_index, 0)):
            sid = f"{s.sid}/spawn{credit.turn_index}.{k}"
            sub = _Session(sid, rng.randint(2, 4), BranchMode.SPAWN, s.sid, subagent="Explore")
            self.submit(sub, now)
        s.turn += 1
        if s.turn < s.num_turns:
            self.submit(s, now)

    def pump(self, now: float) -> None:
        fx = self.core.take_effects()
        for worker, item in fx.to_worker:
            if isinstance(item, tuple):  # a dispatch chunk (producer, credits)
                for credit in item[1]:
                    self.execute(worker, credit, now)
        for outs in fx.outcomes.values():
            for o in outs:
                self.statuses[o.status.value] = self.statuses.get(o.status.value, 0) + 1
                if o.status is Status.COMPLETED:
                    self.on_completed(self.by_credit[o.credit_id][1], now)

    def run(self, roots: int) -> None:
        for s in _workload(self.rng, roots):
            self.submit(s, self.rng.uniform(0.0, 5.0))
        self.pump(0.0)
        core = self.core
        while self.events:
            self.clock, cid, worker = heapq.heappop(self.events)
            done = Completion(
                seq=next(self.seq), producer="sim", credit_id=cid, status=Status.COMPLETED
            )
            core.complete(worker, [done], self.clock)
            s, credit = self.by_credit[cid]
            if s.mode is BranchMode.FORK and credit.turn_index + 1 == credit.num_turns:
                core.child_release(worker, "sim", s.sid, self.clock)
            self.pump(self.clock)
            if cid % 997 == 0:
                check_invariants(core)
        check_invariants(core)
        check_no_leak(core)

    def report(self) -> int:
        placed = self.placed
        forks = [k for k in placed if "/fork" in k]
        fork_ok = sum(placed[k] <= placed[k.rsplit("/", 1)[0]] for k in forks)
        own = [k for k in placed if "/fork" not in k]
        sticky_ok = sum(len(placed[k]) == 1 for k in own)
        loads = dict.fromkeys(self.names, 0)
        for workers in placed.values():
            for w in workers:
                loads[w] += 1
        ttfts = sorted(self.ttfts)
        stats = self.core.stats
        p50, p99 = ttfts[len(ttfts) // 2] * 1e3, ttfts[int(len(ttfts) * 0.99)] * 1e3
        print(
            f"credit-router simulation (seed {self.seed}): {stats.submitted} credits, "
            f"{len(placed)} sessions on {len(self.names)} workers, {self.clock:.1f} s simulated"
        )
        print(f"  outcomes           {self.statuses}")
        print(f"  sticky sessions    {sticky_ok}/{len(own)} stayed on one worker")
        print(f"  FORK children      {fork_ok}/{len(forks)} ran on their parent's worker")
        print(f"  SPAWN sub-agents   {sum('/spawn' in k for k in placed)} routed as own sessions")
        print(f"  prefix-cache hits  {self.cached_turns / max(1, len(ttfts)):.1%} of turns")
        print(f"  TTFT p50/p99       {p50:.1f} / {p99:.1f} ms")
        print(
            f"  balance            min {min(loads.values())} / max {max(loads.values())} "
            "sessions per worker"
        )
        print("  leaks              none (sticky table, aliases and per-worker counts are empty)")
        return 0 if self.statuses.get("completed") == stats.submitted else 1


def main(*, seed: int, sessions: int, workers: int) -> int:
    """Run the simulation and print a summary; returns the exit status."""
    sim = _Simulation(seed, workers)
    sim.run(sessions)
    return sim.report()
