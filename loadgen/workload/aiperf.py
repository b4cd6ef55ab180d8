"""AIPerf's ``dag_jsonl`` conversation files, read as a workload.

The spec: AIPerf's ``DagConversation`` / ``DagTurn`` / ``DagRound`` models and its
``dag_jsonl`` loader (https://github.com/ai-dynamo/aiperf,
``src/aiperf/dataset/loader/dag_jsonl_models.py``). One conversation per line:

* conversation: ``session_id``, ``turns``, ``pre_session_spawns``, ``context_mode``; a
  request-less coordinator has ``orchestrator: true`` with conversation-level ``spawns``, and
  optionally ``rounds`` (a count, or a list of ``{"spawns": […], "think_time_ms": …}``) and
  ``think_time_ms`` (``think_time_sigma``, ``think_time_min_ms``, ``think_time_max_ms``);
* turn: ``messages`` (each with a ``role``), ``model``, ``max_tokens``, ``tools``, ``extra``
  (or its older name ``extra_body``), ``delay`` (ms), ``forks`` and ``spawns``.

The mapping to ``SessionSpec``:

* ``context_mode``: ``deltas_without_responses`` (the default) is our own meaning: each turn's
  messages are appended to the history with the live answers. With
  ``message_array_with_responses`` each turn's messages are the whole conversation; a turn
  becomes what it adds to the previous one (``traces.delta_messages``), and one that does not
  extend it is an error naming it.
* ``forks``: a FORK ends its parent unless ``background`` (bare id, or ``{"child": id}``), so
  AIPerf allows that only on the final turn (and so do we); ``{"child": id, "background":
  true}`` forks and lets the parent go on.
* ``spawns``: bare ids form one branch joined at the next turn; ``{"children": […],
  "join_at": k}`` is joined at turn k.
* ``pre_session_spawns``: SPAWN children started with the conversation, before its turn 0.
* an orchestrator without ``rounds`` is one request-less turn spawning its children in the
  background; with N rounds it is N+1 request-less turns: round k spawns its children (the
  shared ``spawns``, or its own), round k+1 waits for them, and the last turn is the terminal
  gate. The think time is waited before rounds 1..N-1 (round k's own ``think_time_ms``, else
  the conversation's), never before the gate; AIPerf puts round 0's on turn 0 as its delay,
  which the first turn of a root never waits for, so neither do we. The orchestrator's
  children have no parent (``parent_correlation_id`` unset), as in AIPerf.
* a ``system`` message is only allowed where it seeds a history: turn 0 of a conversation that
  is not a FORK child (chat templates drop a system message in the middle), as in AIPerf.

Unknown keys are errors naming the line and the field, as in AIPerf; every error names AIPerf's
fields (``session_id``, ``pre_session_spawns``), not ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from loadgen.workload.model import (
    Branch,
    SessionSpec,
    TurnSpec,
    Workload,
    WorkloadError,
    compile_workload,
    decode_line,
    read_jsonl,
)
from loadgen.workload.traces import delta_messages

__all__ = ["DagConversation", "DagFork", "DagRound", "DagSpawn", "DagTurn", "read_aiperf_dag"]

_FULL: Final = "message_array_with_responses"
_NAMES: Final = {"id": "session_id", "pre_spawns": "pre_session_spawns"}
_Ms = Annotated[float, msgspec.Meta(ge=0.0)]


class DagFork(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``{"child": id, "background": bool}``."""

    child: Annotated[str, msgspec.Meta(min_length=1)]
    background: bool = False


class DagSpawn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``{"children": [ids], "join_at": turn}``."""

    children: Annotated[list[str], msgspec.Meta(min_length=1)]
    join_at: int | None = None


class DagTurn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One turn of a DAG conversation."""

    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] | None = None
    extra_body: dict[str, Any] | None = None
    forks: list[str | DagFork] = []
    spawns: list[str | DagSpawn] = []
    delay: _Ms = 0.0


class DagRound(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One round of an orchestrator's list-form ``rounds``: its own spawns and think time."""

    spawns: Annotated[list[str], msgspec.Meta(min_length=1)]
    think_time_ms: _Ms | None = None


class DagConversation(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One line of a ``dag_jsonl`` file."""

    session_id: Annotated[str, msgspec.Meta(min_length=1)]
    turns: list[DagTurn] = []
    pre_session_spawns: list[str] = []
    orchestrator: bool = False
    spawns: list[str] = []
    rounds: Annotated[int, msgspec.Meta(ge=1)] | list[DagRound] | None = None
    think_time_ms: _Ms | None = None
    think_time_sigma: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    think_time_min_ms: _Ms | None = None
    think_time_max_ms: _Ms | None = None
    context_mode: Literal["deltas_without_responses", "message_array_with_responses"] | None = None


_decoder: Final = msgspec.json.Decoder(DagConversation)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1_000


class _Converter:
    """One conversation to one ``SessionSpec``; errors name its line."""

    def __init__(self, conv: DagConversation, *, path: str, line: int) -> None:
        self.conv = conv
        self.path = path
        self.line = line

    def fail(self, name: str, problem: str) -> None:
        raise WorkloadError(problem, path=self.path, line=self.line, field=name)

    def session(self) -> SessionSpec:
        conv = self.conv
        self._check_think()
        if conv.orchestrator:
            return self._orchestrator()
        if not conv.turns:
            self.fail("turns", "must not be empty unless orchestrator is true")
        for name in (
            "rounds",
            "think_time_ms",
            "think_time_sigma",
            "think_time_min_ms",
            "think_time_max_ms",
        ):
            if getattr(conv, name) is not None:
                self.fail(name, "only valid on an orchestrator conversation")
        if conv.spawns:
            self.fail("spawns", "conversation-level spawns are for orchestrators; use turn spawns")
        turns = [self._turn(i, t) for i, t in enumerate(conv.turns)]
        if conv.context_mode == _FULL:
            for i in range(len(turns) - 1, 0, -1):
                added = delta_messages(conv.turns[i - 1].messages, conv.turns[i].messages)
                if added is None:
                    self.fail(
                        f"turns[{i}].messages",
                        f"with context_mode {_FULL!r} each turn is the whole conversation: "
                        "it must begin with the previous turn's messages",
                    )
                turns[i].messages = added
        return SessionSpec(
            id=conv.session_id, turns=turns, pre_spawns=list(conv.pre_session_spawns)
        )

    def _turn(self, i: int, turn: DagTurn) -> TurnSpec:
        if not turn.messages:
            self.fail(f"turns[{i}].messages", "must not be empty")
        final = i == len(self.conv.turns) - 1
        forks: list[str | Branch] = []
        for k, fork in enumerate(turn.forks):
            background = not isinstance(fork, str) and fork.background
            if not background and not final:
                self.fail(
                    f"turns[{i}].forks[{k}]",
                    "a fork that is not background ends its parent, so only the final turn "
                    'may have one; use {"child": …, "background": true} to fork and go on',
                )
            if isinstance(fork, str):
                forks.append(fork)
            elif background:
                forks.append(Branch(children=[fork.child], background=True))
            else:
                forks.append(fork.child)
        spawns: list[str | Branch] = [
            s if isinstance(s, str) else Branch(children=s.children, join_at=s.join_at)
            for s in turn.spawns
        ]
        return TurnSpec(
            messages=turn.messages,
            output_tokens=turn.max_tokens,
            model=turn.model,
            tools=turn.tools,
            extra=turn.extra if turn.extra is not None else turn.extra_body,
            delay_s=turn.delay / 1_000,
            forks=forks,
            spawns=spawns,
        )

    def _orchestrator(self) -> SessionSpec:
        conv = self.conv
        if conv.turns:
            self.fail("turns", "an orchestrator's turns are synthesised: leave them empty")
        if conv.pre_session_spawns:
            self.fail("pre_session_spawns", "not on an orchestrator: use spawns")
        if conv.think_time_ms is not None and conv.rounds is None:
            self.fail("think_time_ms", "needs rounds (it is the wait between rounds)")
        rounds: list[tuple[list[str], float | None]]
        if isinstance(conv.rounds, list):
            if not conv.rounds:
                self.fail("rounds", "must not be empty")
            if conv.spawns:
                self.fail("spawns", "with a list of rounds, each round gives its own spawns")
            rounds = [(list(r.spawns), r.think_time_ms) for r in conv.rounds]
        else:
            if not conv.spawns:
                self.fail("spawns", "an orchestrator needs conversation-level spawns")
            if conv.rounds is None:
                children = list(conv.spawns)
                turns = [TurnSpec(spawns=[Branch(children=children, background=True)])]
                return SessionSpec(id=conv.session_id, turns=turns, orchestrator=True)
            rounds = [(list(conv.spawns), None)] * conv.rounds
        turns = []
        for k, (children, think_ms) in enumerate(rounds):
            ms = think_ms if think_ms is not None else conv.think_time_ms
            # Round 0's think time is turn 0's delay in AIPerf, which a root's first turn
            # never waits for; the terminal gate waits for nothing but its joins.
            think = (_seconds(ms) or 0.0) if k else 0.0
            turns.append(self._round([Branch(children=children, join_at=k + 1)], think))
        turns.append(self._round([], 0.0))  # the terminal gate
        return SessionSpec(id=conv.session_id, turns=turns, orchestrator=True)

    def _check_think(self) -> None:
        """AIPerf's think-time rules: a distribution needs its median, clamps a distribution."""
        conv = self.conv
        if conv.think_time_sigma is not None and conv.think_time_ms is None:
            rounds = conv.rounds if isinstance(conv.rounds, list) else []
            if not any(r.think_time_ms is not None for r in rounds):
                self.fail("think_time_sigma", "needs think_time_ms (the median it samples around)")
        clamps = conv.think_time_min_ms is not None or conv.think_time_max_ms is not None
        if clamps and conv.think_time_sigma is None:
            self.fail("think_time_min_ms", "the clamps need think_time_sigma (a distribution)")
        low, high = conv.think_time_min_ms, conv.think_time_max_ms
        if low is not None and high is not None and low > high:
            self.fail("think_time_min_ms", "must not exceed think_time_max_ms")

    def _round(self, spawns: list[str | Branch], think_s: float) -> TurnSpec:
        """A request-less turn: wait ``think_s`` (sampled if asked), then spawn."""
        conv = self.conv
        jitter = think_s > 0
        return TurnSpec(
            spawns=spawns,
            delay_s=think_s,
            delay_sigma=conv.think_time_sigma if jitter else None,
            delay_min_s=_seconds(conv.think_time_min_ms) if jitter else None,
            delay_max_s=_seconds(conv.think_time_max_ms) if jitter else None,
        )


def read_aiperf_dag(path: Path, *, block_tokens: int | None = None) -> Workload:
    """Read an AIPerf ``dag_jsonl`` file as a workload (module docstring for the mapping).

    Raises:
        WorkloadError: naming the line and the field of the first problem.
    """
    name = str(path)
    specs = []
    seeds: dict[str, tuple[int, bool]] = {}
    for number, line in read_jsonl(path):
        conv: DagConversation = decode_line(_decoder, line, path=name, number=number)
        specs.append((number, _Converter(conv, path=name, line=number).session()))
        seeds[conv.session_id] = (number, conv.context_mode == _FULL)
    workload = compile_workload(
        specs,
        source=name,
        block_tokens=block_tokens or 512,
        description=f"AIPerf dag_jsonl {path.name}",
        names=_NAMES,
    )
    for sid, spec in workload.sessions.items():
        number, full = seeds[sid]
        if full:
            continue  # every turn is a whole conversation: each may open with its system
        for i, turn in enumerate(spec.turns):
            if i == 0 and sid not in workload.fork_children:
                continue
            for k, message in enumerate(turn.messages or ()):
                if message.get("role") == "system":
                    raise WorkloadError(
                        "a system message only seeds a history: turn 0 of a conversation that "
                        "is not a FORK child (chat templates drop it elsewhere)",
                        path=name,
                        line=number,
                        field=f"turns[{i}].messages[{k}]",
                    )
    return workload
