"""A seeded generator of synthetic agentic workloads (``credit-router run``'s built-in one).

Each root is an agent session of a few turns. Its first turn brings a larger prompt (the task,
optionally after a system prompt shared by every root: ``shared_prefix_tokens``, made of fixed
``hash_ids`` so every server can cache it), later turns add less (tool results, follow-ups). A
turn may declare FORK children (parallel continuations that share the agent's context so far)
and SPAWN children (sub-agents with a ``subagent_type`` and a fresh context), up to
``max_depth`` levels; a branch is joined at the parent's next turn unless it is ``background``.
Think times between turns are lognormal around ``think_time_s``.

The same parameters and seed always give the same workload.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Any

from loadgen.workload.model import Branch, SessionSpec, TurnSpec, Workload, compile_workload

__all__ = ["GeneratorParams", "generate"]

_SHARED_BLOCK_BASE = 1 << 40
"""``hash_ids`` of the shared system prompt: far from anything a trace would use."""


@dataclass(frozen=True)
class GeneratorParams:
    """The knobs of ``generate`` (every count is per session, drawn uniformly in its range).

    Attributes:
        sessions: root agent sessions.
        seed: the random seed.
        turns_min / turns_max: turns of a root.
        child_turns_min / child_turns_max: turns of a FORK or SPAWN child.
        first_input_tokens: new tokens of a root's first turn (±50 %).
        turn_input_tokens: new tokens of any later turn, and of a child's first (±50 %).
        output_tokens: tokens generated per turn (±50 %).
        shared_prefix_tokens: a system prompt every root starts with (0: none).
        think_time_s: median think time before a turn after the first (lognormal, sigma 0.6).
        fork_prob: chance that a turn declares FORK children.
        max_forks: at most this many FORK children per declaring turn.
        spawn_prob: chance that a turn declares SPAWN children.
        max_spawns: at most this many SPAWN children per declaring turn.
        background_prob: chance that a branch is background (never joined).
        max_depth: children of children… down to this depth (0: no children at all).
        subagent_types: the SPAWN children's types, drawn uniformly.
        arrival_rate: if set, roots get ``start_s`` from a Poisson process of this rate (per s).
        block_tokens: tokens per ``hash_ids`` block (of the shared prefix).
    """

    sessions: int = 200
    seed: int = 7
    turns_min: int = 2
    turns_max: int = 6
    child_turns_min: int = 1
    child_turns_max: int = 3
    first_input_tokens: int = 1_500
    turn_input_tokens: int = 300
    output_tokens: int = 40
    shared_prefix_tokens: int = 0
    think_time_s: float = 0.3
    fork_prob: float = 0.15
    max_forks: int = 3
    spawn_prob: float = 0.15
    max_spawns: int = 3
    background_prob: float = 0.25
    max_depth: int = 2
    subagent_types: tuple[str, ...] = ("Explore", "Plan", "general-purpose")
    arrival_rate: float | None = None
    block_tokens: int = 64

    def __post_init__(self) -> None:
        if self.sessions < 1:
            raise ValueError("sessions must be >= 1")
        pairs = [(self.turns_min, self.turns_max), (self.child_turns_min, self.child_turns_max)]
        if any(not 1 <= lo <= hi for lo, hi in pairs):
            raise ValueError("turn ranges must satisfy 1 <= min <= max")
        for name in ("fork_prob", "spawn_prob", "background_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if min(self.max_forks, self.max_spawns, self.max_depth, self.shared_prefix_tokens) < 0:
            raise ValueError("counts must be >= 0")
        if self.block_tokens < 1 or (self.arrival_rate is not None and self.arrival_rate <= 0):
            raise ValueError("block_tokens and arrival_rate must be > 0")

    @classmethod
    def names(cls) -> list[str]:
        """The parameter names (for command lines)."""
        return [f.name for f in fields(cls)]

    def with_(self, **changes: Any) -> GeneratorParams:
        """A copy with some parameters changed."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return GeneratorParams(**values)


class _Builder:
    """Draws the sessions of one workload."""

    def __init__(self, params: GeneratorParams) -> None:
        self.p = params
        self.rng = random.Random(params.seed)
        self.specs: list[SessionSpec] = []

    def around(self, mean: int) -> int:
        return max(1, round(mean * self.rng.uniform(0.5, 1.5))) if mean else 0

    def session(
        self, sid: str, depth: int, *, root: bool, subagent: str | None = None
    ) -> SessionSpec:
        p, rng = self.p, self.rng
        count = (
            rng.randint(p.turns_min, p.turns_max)
            if root
            else rng.randint(p.child_turns_min, p.child_turns_max)
        )
        spec = SessionSpec(id=sid, turns=[], subagent_type=subagent)
        self.specs.append(spec)  # before its children: a parent's line comes first
        spec.turns = [self.turn(sid, i, depth, first=root and i == 0) for i in range(count)]
        return spec

    def turn(self, sid: str, i: int, depth: int, *, first: bool) -> TurnSpec:
        p, rng = self.p, self.rng
        turn = TurnSpec(
            input_tokens=self.around(p.first_input_tokens if first else p.turn_input_tokens),
            output_tokens=self.around(p.output_tokens),
            delay_s=p.think_time_s if i else 0.0,
            delay_sigma=0.6 if i and p.think_time_s > 0 else None,
        )
        if first and p.shared_prefix_tokens:
            blocks = -(-p.shared_prefix_tokens // p.block_tokens)
            assert turn.input_tokens is not None
            turn.hash_ids = [_SHARED_BLOCK_BASE + b for b in range(blocks)]
            turn.input_tokens += p.shared_prefix_tokens
        if depth >= p.max_depth:
            return turn
        if p.max_forks and rng.random() < p.fork_prob:
            kids = [f"{sid}.f{i}.{k}" for k in range(rng.randint(1, p.max_forks))]
            turn.forks = [self.branch(kids)]
            for kid in kids:
                self.session(kid, depth + 1, root=False)
        if p.max_spawns and rng.random() < p.spawn_prob:
            kids = [f"{sid}.s{i}.{k}" for k in range(rng.randint(1, p.max_spawns))]
            turn.spawns = [self.branch(kids)]
            for kid in kids:
                kind = rng.choice(p.subagent_types) if p.subagent_types else None
                self.session(kid, depth + 1, root=False, subagent=kind)
        return turn

    def branch(self, children: list[str]) -> Branch:
        return Branch(children=children, background=self.rng.random() < self.p.background_prob)


def generate(params: GeneratorParams | None = None) -> Workload:
    """A synthetic agentic workload (module docstring), checked like a file would be."""
    p = params or GeneratorParams()
    builder = _Builder(p)
    clock = 0.0
    for r in range(p.sessions):
        spec = builder.session(f"agent-{r}", 0, root=True)
        if p.arrival_rate is not None:
            spec.start_s = clock
            clock += builder.rng.expovariate(p.arrival_rate)
    return compile_workload(
        ((0, s) for s in builder.specs),
        source="generator",
        block_tokens=p.block_tokens,
        description=f"synthetic agentic workload (seed {p.seed}, {p.sessions} roots)",
    )
