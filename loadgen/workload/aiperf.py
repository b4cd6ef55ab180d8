"""AIPerf's ``dag_jsonl`` conversation files, read as a workload.

One conversation per line, as AIPerf's ``DagConversation`` / ``DagTurn`` models describe it:

* conversation: ``session_id``, ``turns``, ``pre_session_spawns``, and for a request-less
  coordinator ``orchestrator: true`` with conversation-level ``spawns``, optional ``rounds`` and
  ``think_time_ms`` (``think_time_sigma``, ``think_time_min_ms``, ``think_time_max_ms``);
  ``context_mode`` if present must be ``deltas_without_responses`` (the only mode whose history
  is what this worker keeps: authored deltas plus the live answers).
* turn: ``messages`` (each with a ``role``), ``model``, ``max_tokens``, ``tools``, ``extra``
  (or its older name ``extra_body``), ``delay`` (ms), ``forks`` and ``spawns``.

The mapping to ``SessionSpec``:

* ``forks``: a bare id is a FORK that ends its parent, so AIPerf allows it on the final turn
  only (and so do we); ``{"child": id, "background": true}`` forks and lets the parent go on.
* ``spawns``: bare ids form one branch joined at the next turn; ``{"children": […],
  "join_at": k}`` is joined at turn k.
* ``pre_session_spawns``: SPAWN children started with the conversation, before its turn 0.
* an orchestrator without ``rounds`` is one request-less turn that spawns its children in the
  background; with ``rounds: N`` it is N+1 request-less turns, round k spawning the children and
  round k+1 waiting for them after ``think_time_ms``; the last turn is the final gate.

Unknown keys are errors naming the line and the field, as in AIPerf.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final

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

__all__ = ["DagConversation", "DagFork", "DagSpawn", "DagTurn", "read_aiperf_dag"]

_SUPPORTED_CONTEXT: Final = "deltas_without_responses"
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


class DagConversation(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One line of a ``dag_jsonl`` file."""

    session_id: Annotated[str, msgspec.Meta(min_length=1)]
    turns: list[DagTurn] = []
    pre_session_spawns: list[str] = []
    orchestrator: bool = False
    spawns: list[str] = []
    rounds: Annotated[int, msgspec.Meta(ge=1)] | None = None
    think_time_ms: _Ms | None = None
    think_time_sigma: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    think_time_min_ms: _Ms | None = None
    think_time_max_ms: _Ms | None = None
    context_mode: str | None = None


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
        if conv.context_mode not in (None, _SUPPORTED_CONTEXT):
            self.fail("context_mode", f"only {_SUPPORTED_CONTEXT!r} is supported")
        if conv.orchestrator:
            return self._orchestrator()
        if not conv.turns:
            self.fail("turns", "must not be empty unless orchestrator is true")
        for name in ("rounds", "think_time_ms", "think_time_sigma"):
            if getattr(conv, name) is not None:
                self.fail(name, "only valid on an orchestrator conversation")
        if conv.spawns:
            self.fail("spawns", "conversation-level spawns are for orchestrators; use turn spawns")
        turns = [self._turn(i, t) for i, t in enumerate(conv.turns)]
        return SessionSpec(
            id=conv.session_id, turns=turns, pre_spawns=list(conv.pre_session_spawns)
        )

    def _turn(self, i: int, turn: DagTurn) -> TurnSpec:
        if not turn.messages:
            self.fail(f"turns[{i}].messages", "must not be empty")
        final = i == len(self.conv.turns) - 1
        forks: list[str | Branch] = []
        for k, fork in enumerate(turn.forks):
            if isinstance(fork, str):
                if not final:
                    self.fail(
                        f"turns[{i}].forks[{k}]",
                        "a bare fork ends its parent, so only the final turn may have one; "
                        'use {"child": …, "background": true} to fork and go on',
                    )
                forks.append(fork)
            else:
                forks.append(Branch(children=[fork.child], background=fork.background))
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
        if not conv.spawns:
            self.fail("spawns", "an orchestrator needs conversation-level spawns")
        if conv.pre_session_spawns:
            self.fail("pre_session_spawns", "not on an orchestrator: use spawns")
        if conv.think_time_ms is not None and conv.rounds is None:
            self.fail("think_time_ms", "needs rounds (it is the wait between rounds)")
        think = _seconds(conv.think_time_ms) or 0.0
        children = list(conv.spawns)
        if conv.rounds is None:
            turns = [TurnSpec(spawns=[Branch(children=children, background=True)])]
        else:
            turns = [
                self._round([Branch(children=children, join_at=k + 1)], think if k else 0.0)
                for k in range(conv.rounds)
            ]
            turns.append(self._round([], think))  # the final gate
        return SessionSpec(id=conv.session_id, turns=turns, orchestrator=True)

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


def read_aiperf_dag(path: Path) -> Workload:
    """Read an AIPerf ``dag_jsonl`` file as a workload (module docstring for the mapping).

    Raises:
        WorkloadError: naming the line and the field of the first problem.
    """
    name = str(path)
    specs = []
    for number, line in read_jsonl(path):
        conv: DagConversation = decode_line(_decoder, line, path=name, number=number)
        specs.append((number, _Converter(conv, path=name, line=number).session()))
    return compile_workload(specs, source=name, description=f"AIPerf dag_jsonl {path.name}")
