"""Mooncake-style traces: one request per JSONL row, grouped into sessions by ``session_id``.

A row is ``{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`` as in
the Mooncake (FAST '25) traces, plus the keys AIPerf's ``mooncake_trace`` loader accepts:
``session_id``, ``delay`` (ms), ``text_input``, ``messages``, ``tools``, ``extra``.

* Rows with the same ``session_id`` become one multi-turn session, in file order; each row is
  the turn's **new** input (as AIPerf reads them: a row that repeats the history would count it
  twice). A row without ``session_id`` is a single-turn session of its own.
* A session starts at its first row's ``timestamp`` (made relative to the earliest one); a later
  row's ``timestamp`` becomes the turn's ``offset_s`` (not before that long after the session's
  first turn), and its ``delay`` the think time after the previous turn.
* ``input_length`` with ``hash_ids`` is a synthetic prompt made of those blocks
  (``block_tokens`` each, 512 in Mooncake's traces): rows sharing leading ids share a prefix.
* ``text_input`` is one user message; ``messages`` are taken as they are.

``payload`` (raw request bodies) is not supported: a row with one is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final

import msgspec

from loadgen.workload.model import (
    SessionSpec,
    TurnSpec,
    Workload,
    WorkloadError,
    compile_workload,
    decode_line,
    read_jsonl,
)

__all__ = ["MooncakeRow", "read_mooncake"]

_NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class MooncakeRow(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One row of a Mooncake trace."""

    timestamp: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Milliseconds since the trace's start."""
    input_length: _NonNeg | None = None
    output_length: _NonNeg | None = None
    hash_ids: list[int] | None = None
    session_id: str | int | None = None
    delay: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Milliseconds of think time before this turn."""
    text_input: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] | None = None
    payload: Any = None
    """Raw request bodies: recognised so the error can say they are not supported."""


_decoder: Final = msgspec.json.Decoder(MooncakeRow)


def _turn(row: MooncakeRow, *, path: str, line: int) -> TurnSpec:
    if row.payload is not None:
        raise WorkloadError(
            "raw request payloads are not supported; give input_length or messages",
            path=path,
            line=line,
            field="payload",
        )
    messages = row.messages
    if row.text_input is not None:
        messages = [{"role": "user", "content": row.text_input}]
    if messages is None and row.input_length is None:
        raise WorkloadError(
            "a row needs input_length, text_input or messages", path=path, line=line
        )
    return TurnSpec(
        messages=messages,
        input_tokens=None if messages is not None else row.input_length,
        hash_ids=row.hash_ids if messages is None else None,
        output_tokens=row.output_length,
        tools=row.tools,
        extra=row.extra,
        delay_s=(row.delay or 0.0) / 1_000,
    )


def read_mooncake(path: Path, *, block_tokens: int = 512) -> Workload:
    """Read a Mooncake trace as a workload (module docstring for the mapping).

    Args:
        path: the trace.
        block_tokens: tokens per ``hash_ids`` block.

    Raises:
        WorkloadError: a row that does not decode or cannot be a turn, naming line and field.
    """
    name = str(path)
    sessions: dict[str, list[tuple[int, MooncakeRow]]] = {}
    for number, line in read_jsonl(path):
        row: MooncakeRow = decode_line(_decoder, line, path=name, number=number)
        key = f"row-{number}" if row.session_id is None else str(row.session_id)
        sessions.setdefault(key, []).append((number, row))
    stamps = [rows[0][1].timestamp for rows in sessions.values()]
    origin = min((s for s in stamps if s is not None), default=0.0)
    specs = []
    for sid, rows in sessions.items():
        first_line, first = rows[0]
        turns = [_turn(row, path=name, line=number) for number, row in rows]
        if first.timestamp is not None:
            for turn, (_, row) in zip(turns[1:], rows[1:], strict=True):
                if row.timestamp is not None:
                    turn.offset_s = max(0.0, row.timestamp - first.timestamp) / 1_000
        start = None if first.timestamp is None else (first.timestamp - origin) / 1_000
        specs.append((first_line, SessionSpec(id=sid, turns=turns, start_s=start)))
    return compile_workload(
        specs, source=name, block_tokens=block_tokens, description=f"Mooncake trace {path.name}"
    )
