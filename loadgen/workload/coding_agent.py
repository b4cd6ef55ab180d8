"""Coding-agent traces (the kv-cache-tester format) with their sub-agents, as AIPerf reads them.

The spec: the trace format of kv-cache-tester (https://github.com/callanjfox/kv-cache-tester,
``docs/trace_replay_tester.md``), as AIPerf's ``weka_trace`` loader models it
(https://github.com/ai-dynamo/aiperf, ``src/aiperf/dataset/loader/weka_trace_models.py``).
A trace is one JSON object (a file holds one, one per line, or a directory holds one per
``.json`` file):

* ``id``, ``models``, ``block_size`` (tokens per ``hash_ids`` block), ``hash_id_scope``
  (``local``: ids are the trace's own; ``global``: shared between traces), ``tool_tokens`` and
  ``system_tokens`` (the prompt's tools and system prefix), ``totals`` (ignored), ``requests``;
* a request ``{"type": "n" | "s", "t": s, "model", "in", "out", "hash_ids", "input_types",
  "output_types", "stop", "api_time": s, "think_time": s, "ttft": s}`` (``s``: streaming, with
  ``ttft``); each request's ``hash_ids`` cover its **whole** prompt (cumulative);
* a sub-agent ``{"type": "subagent", "t", "agent_id", "subagent_type", "status",
  "duration_ms", "total_tokens", "tool_use_count", "models", "tool_tokens", "system_tokens",
  "requests": [...]}`` whose inner requests are that sub-agent's own conversation.

The mapping:

* the trace's requests are one session (id: the trace's ``id``), its turns in order; each
  sub-agent is a SPAWN child (id ``<trace>::sa:<agent_id>``) carrying ``subagent_type``
  verbatim, declared by the parent's last request before the marker (so it starts when that
  request completes, and its first request waits until the recorded time) and joined before
  the parent's next request, as AIPerf's SPAWN_JOIN does; ``status: "async_launched"`` is a
  background sub-agent nobody waits for. A marker before the parent's first request starts
  with the trace (``pre_spawns``).
* cumulative ``hash_ids`` become what each request adds to the previous one (``traces``
  module): the worker's history holds the rest; a request that does not extend the previous
  one (a compacted context) starts a new part of the session. The trace's ``block_size`` is the
  workload's ``block_tokens``.
* ``hash_id_scope: "local"``: ids are renumbered per trace, so two traces' id 7 are different
  blocks — except the whole blocks of the tools and system prefix (``tool_tokens +
  system_tokens``), which are keyed by those two counts and the block's place: traces and
  sub-agents recorded with the same tools and system prompt share that prefix, as the same
  client version's prompts do.
* timing: a request waits for the idle gap the trace recorded after what it depended on (the
  previous request's end, ``t + api_time``, and the sub-agents joined before it):
  ``t - max(ends)``, at least 0 (AIPerf's end-to-start delay). Without ``api_time`` the
  recorded ``think_time`` is used, else the gap between starts.
* ``t``, ``think_time``, ``api_time`` and ``ttft`` are kept in the turn's ``recorded``, and so
  in each credit's record, to compare the replay with the trace.
* ``out`` is ``max_tokens`` (at least 1, as in AIPerf); the trace's ``model`` is not sent (the
  run's ``--model`` is).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from loadgen.workload.model import (
    Branch,
    Recorded,
    SessionSpec,
    TurnSpec,
    Workload,
    WorkloadError,
    compile_workload,
    describe,
    hash_ids_problem,
    prefix_stats,
)
from loadgen.workload.traces import chain_sessions, delta_tokens, extends_ids

__all__ = ["CodingAgentTrace", "read_coding_agent", "sniff_coding_agent"]

_Seconds = Annotated[float, msgspec.Meta(ge=0.0)]
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
_EPSILON_S: Final = 1e-6
_SHARED_PREFIX: Final = 1 << 62
"""Ids of tools-and-system prefix blocks: far from the renumbered per-trace ids."""


class TraceRequest(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="n"
):
    """A request (``type: "n"``)."""

    t: float
    """Start, in seconds from the trace's start."""
    input_tokens: _NonNeg = msgspec.field(name="in")
    output_tokens: _NonNeg = msgspec.field(name="out")
    model: str | None = None
    hash_ids: list[int] = []
    input_types: list[str] = []
    output_types: list[str] = []
    stop: str = ""
    api_time: float | None = None
    think_time: float | None = None


class StreamingRequest(TraceRequest, tag="s"):
    """A streaming request (``type: "s"``, with ``ttft``)."""

    ttft: float | None = None


class Subagent(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="subagent"
):
    """A sub-agent marker with its own requests."""

    t: float
    agent_id: str
    subagent_type: str
    status: str = ""
    duration_ms: float | None = None
    total_tokens: int | None = None
    tool_use_count: int | None = None
    requests: list[TraceRequest | StreamingRequest] = []
    models: list[str] = []
    tool_tokens: _NonNeg = 0
    system_tokens: _NonNeg = 0


class CodingAgentTrace(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One trace."""

    id: Annotated[str, msgspec.Meta(min_length=1)]
    block_size: Annotated[int, msgspec.Meta(ge=1)]
    models: list[str] = []
    hash_id_scope: Literal["local", "global"] = "local"
    tool_tokens: _NonNeg = 0
    system_tokens: _NonNeg = 0
    requests: list[TraceRequest | StreamingRequest | Subagent]
    totals: dict[str, Any] | None = None


_decoder: Final = msgspec.json.Decoder(CodingAgentTrace)


def sniff_coding_agent(first: dict[str, Any]) -> bool:
    """Whether a decoded JSON object looks like a trace of this format."""
    return "requests" in first and "block_size" in first


@dataclass
class _Source:
    """Where a trace came from, for messages."""

    path: str
    line: int | None


@dataclass
class _Chain:
    """One agent's requests (the trace's own, or a sub-agent's), in order."""

    sid: str
    requests: list[TraceRequest]
    starts: list[float]
    """Absolute start of each request (seconds on the trace's clock)."""
    where: list[str]
    """The field path of each request, for messages."""
    subagent_type: str | None = None
    turn_of: list[tuple[int, int]] = field(default_factory=list)
    """Request k -> (part, turn within the part)."""
    parts: list[SessionSpec] = field(default_factory=list)


def _end(start: float, req: TraceRequest) -> float:
    return start + max(req.api_time or 0.0, 0.0)


class _Reader:
    """One trace to session templates."""

    def __init__(self, trace: CodingAgentTrace, src: _Source, block: int) -> None:
        self.trace = trace
        self.src = src
        self.block = block
        self.warnings: list[str] = []
        self.prompts: list[list[int]] = []
        self.trace_key = zlib.crc32(trace.id.encode())
        self.prefix_ids: dict[int, int] = {}
        self.prefix_variants: dict[tuple[int, int, int], int] = {}

    def error(self, name: str, problem: str) -> WorkloadError:
        return WorkloadError(problem, path=self.src.path, line=self.src.line, field=name)

    # ------------------------------------------------------------------ block ids

    def ids(self, req: TraceRequest, where: str, tools: int, system: int) -> list[int]:
        """The request's ids, checked, renumbered per trace (the shared prefix aside)."""
        found = hash_ids_problem(req.input_tokens, len(req.hash_ids), self.block)
        if found is not None:
            is_error, problem = found
            if is_error:
                raise self.error(f"{where}.hash_ids", problem)
            self.warnings.append(str(self.error(f"{where}.hash_ids", problem)))
        if self.trace.hash_id_scope == "global":
            return list(req.hash_ids)
        prefix_blocks = (tools + system) // self.block
        out = []
        for j, local in enumerate(req.hash_ids):
            shared = self.prefix_ids.get(local)
            if shared is None and j < prefix_blocks:
                slot = (tools, system, j)
                variant = self.prefix_variants.get(slot, 0)
                self.prefix_variants[slot] = variant + 1
                shared = _SHARED_PREFIX | zlib.crc32(f"{tools}/{system}/{j}/{variant}".encode())
                self.prefix_ids[local] = shared
            out.append(
                shared if shared is not None else (self.trace_key << 31) | (local & 0x7FFFFFFF)
            )
        return out

    # ------------------------------------------------------------------ chains

    def chain(
        self, chain: _Chain, tools: int, system: int, first_delay: float, ready: list[float]
    ) -> None:
        """Turn ``chain``'s requests into its parts; ``ready[k]``: when request k may start."""
        parts: list[list[TurnSpec]] = []
        previous: tuple[TraceRequest, list[int]] | None = None
        for k, req in enumerate(chain.requests):
            ids = self.ids(req, chain.where[k], tools, system)
            self.prompts.append(ids)
            start = chain.starts[k]
            if k == 0:
                delay = first_delay
            elif chain.requests[k - 1].api_time is None and req.think_time is not None:
                delay = max(req.think_time, 0.0)
            else:
                delay = max(0.0, start - ready[k])
            turn = TurnSpec(
                input_tokens=req.input_tokens,
                hash_ids=ids or None,
                output_tokens=max(1, req.output_tokens),
                delay_s=round(delay, 6),
                recorded=Recorded(
                    t_s=start,
                    think_time_s=req.think_time,
                    api_time_s=req.api_time,
                    ttft_s=getattr(req, "ttft", None),
                ),
            )
            extended = False
            if previous is not None:
                before, before_ids = previous
                if req.input_tokens >= before.input_tokens and extends_ids(
                    before.input_tokens, before_ids, ids, self.block
                ):
                    turn.input_tokens, new_ids = delta_tokens(
                        before.input_tokens, before.output_tokens, req.input_tokens, ids, self.block
                    )
                    turn.hash_ids = new_ids or None
                    extended = True
            if not extended:
                parts.append([])
            parts[-1].append(turn)
            chain.turn_of.append((len(parts) - 1, len(parts[-1]) - 1))
            previous = (req, ids)
        chain.parts = [
            SessionSpec(
                id=chain.sid if p == 0 else f"{chain.sid}#{p}",
                turns=turns,
                subagent_type=chain.subagent_type if p == 0 else None,
            )
            for p, turns in enumerate(parts)
        ]

    def sessions(self) -> list[SessionSpec]:
        trace = self.trace
        own: list[tuple[int, TraceRequest]] = []
        markers: list[tuple[int, int, Subagent]] = []  # (index, own requests before it, marker)
        for i, entry in enumerate(trace.requests):
            if isinstance(entry, Subagent):
                markers.append((i, len(own), entry))
            else:
                own.append((i, entry))
        if not own:
            raise self.error("requests", "the trace has no requests of its own (type n or s)")
        root = _Chain(
            sid=trace.id,
            requests=[r for _, r in own],
            starts=[r.t for _, r in own],
            where=[f"requests[{i}]" for i, _ in own],
        )
        # When each own request may start: after the previous one and the sub-agents before it.
        ready = [0.0] + [_end(root.starts[k - 1], root.requests[k - 1]) for k in range(1, len(own))]
        children: list[tuple[int, Subagent, _Chain]] = []
        names: set[str] = set()
        for i, before, marker in markers:
            if not marker.requests:
                self.warnings.append(
                    str(self.error(f"requests[{i}].requests", "a sub-agent without requests"))
                )
                continue
            sid = f"{trace.id}::sa:{marker.agent_id}"
            while sid in names:
                sid += "'"
            names.add(sid)
            starts = [
                r.t + marker.t if r.t + _EPSILON_S < marker.t else r.t for r in marker.requests
            ]
            sub = _Chain(
                sid=sid,
                requests=list(marker.requests),
                starts=starts,
                where=[f"requests[{i}].requests[{j}]" for j in range(len(marker.requests))],
                subagent_type=marker.subagent_type,
            )
            end = (
                marker.t + marker.duration_ms / 1000
                if marker.duration_ms is not None
                else max(_end(s, r) for s, r in zip(starts, marker.requests, strict=True))
            )
            background = marker.status == "async_launched"
            if before < len(own) and not background and before > 0:
                ready[before] = max(ready[before], end)
            # it starts when the declaring request completes (a marker before any: with the trace)
            if before:
                parent_end = _end(root.starts[before - 1], root.requests[before - 1])
            else:
                parent_end = root.starts[0]
            sub_ready = [0.0] + [
                _end(starts[k - 1], sub.requests[k - 1]) for k in range(1, len(starts))
            ]
            self.chain(
                sub,
                marker.tool_tokens,
                marker.system_tokens,
                max(0.0, starts[0] - parent_end),
                sub_ready,
            )
            children.append((before, marker, sub))
        self.chain(root, trace.tool_tokens, trace.system_tokens, 0.0, ready)
        for before, marker, sub in children:
            chain_sessions(sub.parts)
            if before == 0:
                root.parts[0].pre_spawns.append(sub.sid)
                continue
            part, turn = root.turn_of[before - 1]
            declaring = root.parts[part].turns[turn]
            last = turn == len(root.parts[part].turns) - 1
            background = marker.status == "async_launched" and not last
            declaring.spawns = [
                *declaring.spawns,
                Branch(children=[sub.sid], background=background),
            ]
        chain_sessions(root.parts)
        out = list(root.parts)
        for _, _, sub in children:
            out.extend(sub.parts)
        return out


def _decode(data: bytes, src: _Source) -> CodingAgentTrace:
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        name, problem = describe(exc)
        raise WorkloadError(problem, path=src.path, line=src.line, field=name) from None
    except msgspec.DecodeError as exc:
        raise WorkloadError(f"not a JSON object: {exc}", path=src.path, line=src.line) from None


def _traces(path: Path) -> list[tuple[bytes, _Source]]:
    """The traces in a file (one JSON object, or one per line) or a directory of ``.json``."""
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".json")
            if not files:
                raise WorkloadError("no .json trace files in this directory", path=str(path))
            return [(p.read_bytes(), _Source(str(p), None)) for p in files]
        data = path.read_bytes()
    except OSError as exc:
        raise WorkloadError(f"cannot read: {exc.strerror}", path=str(path)) from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    lines = [(n, line.strip()) for n, line in enumerate(data.splitlines(), 1) if line.strip()]
    whole = len(lines) > 1 and all(line.startswith(b"{") for _, line in lines)
    if whole:
        try:  # one trace per line (JSONL), unless the lines are one pretty-printed object
            msgspec.json.decode(lines[0][1])
        except msgspec.DecodeError:
            whole = False
    if whole:
        return [(line, _Source(str(path), n)) for n, line in lines]
    return [(data, _Source(str(path), None))]


def read_coding_agent(path: Path, *, block_tokens: int | None = None) -> Workload:
    """Read coding-agent traces as a workload (module docstring for the mapping).

    Args:
        path: a trace file (one JSON object, or one per line) or a directory of them.
        block_tokens: overrides the traces' ``block_size`` (then checked against it).

    Raises:
        WorkloadError: naming the file, the line (JSONL) and the field of the first problem.
    """
    specs: list[tuple[int, SessionSpec]] = []
    warnings: list[str] = []
    prompts: list[list[int]] = []
    block: int | None = block_tokens
    for data, src in _traces(path):
        trace = _decode(data, src)
        if block is None:
            block = trace.block_size
        elif block_tokens is None and trace.block_size != block:
            raise WorkloadError(
                f"block_size {trace.block_size} differs from the first trace's {block}",
                path=src.path,
                line=src.line,
                field="block_size",
            )
        reader = _Reader(trace, src, block)
        specs.extend((src.line or 0, spec) for spec in reader.sessions())
        warnings.extend(reader.warnings)
        prompts.extend(reader.prompts)
    assert block is not None
    return compile_workload(
        specs,
        source=str(path),
        block_tokens=block,
        description=f"coding-agent trace {path.name}",
        check_hash_ids=False,
        warnings=warnings,
        prefix=prefix_stats(prompts),
    )
