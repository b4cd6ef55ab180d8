"""Mooncake traces as AIPerf's ``mooncake_trace`` loader reads them (one request per JSONL row).

The spec: AIPerf's ``MooncakeTrace`` model and ``MooncakeTraceDatasetLoader``
(https://github.com/ai-dynamo/aiperf, ``src/aiperf/dataset/loader/models.py`` and
``mooncake_trace.py``), after the Mooncake FAST '25 traces
(https://github.com/kvcache-ai/Mooncake). A row has exactly one input: ``input_length``
(synthetic text, optionally made of ``hash_ids`` blocks), ``text_input``, ``messages`` (with
``tools``) or ``payload``; and optionally ``output_length``, ``timestamp`` (ms), ``delay`` (ms),
``session_id``, ``extra``, ``type: "mooncake_trace"``, ``message_mode`` and ``context_mode``.

* Rows with the same ``session_id`` are one multi-turn session, in file order; a row without
  one is a single-turn session of its own.
* ``messages`` rows are, by default (``message_mode: "history"``), the **whole** conversation
  so far, replayed as it is (AIPerf's ``message_array_with_responses``); each becomes a turn
  carrying what it adds to the previous row (``traces.delta_messages``). With
  ``message_mode: "delta"`` a row carries only its new messages and the live answers are
  threaded in (``deltas_without_responses``), which is our format's own meaning.
* ``input_length`` and ``text_input`` rows are new input each (``deltas_without_responses``),
  unless the session's rows say ``context_mode: "message_array_with_responses"``: then each
  row is the whole prompt and its ``hash_ids`` cumulative (``traces.delta_tokens``).
  ``context_mode`` must be the same on every row of a session, as in AIPerf.
* ``hash_ids`` must fit ``input_length`` and the block size (``model.hash_ids_problem``): too
  many ids is an error, too few a warning, each naming the line.
* A session starts at its first row's ``timestamp`` (relative to the earliest one); a later
  row's ``timestamp`` is the turn's ``offset_s`` from the session's first turn, its ``delay``
  the think time after the previous turn.

``payload`` (raw request bodies) is not supported: a row with one is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from loadgen.workload.model import (
    SessionSpec,
    TurnSpec,
    Workload,
    WorkloadError,
    compile_workload,
    decode_line,
    hash_ids_problem,
    prefix_stats,
    read_jsonl,
)
from loadgen.workload.traces import chain_sessions, delta_messages, delta_tokens, extends_ids

__all__ = ["MooncakeRow", "read_mooncake"]

_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
_FULL: Final = "message_array_with_responses"
_DELTAS: Final = "deltas_without_responses"
ContextMode = Literal["message_array_with_responses", "deltas_without_responses"]


class MooncakeRow(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One row of a Mooncake trace (AIPerf's ``MooncakeTrace``)."""

    type: Literal["mooncake_trace"] | None = None
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
    message_mode: Literal["history", "delta"] = "history"
    context_mode: ContextMode | None = None
    payload: Any = None
    """Raw request bodies: recognised so the error can say they are not supported."""


_decoder: Final = msgspec.json.Decoder(MooncakeRow)


def _validate(row: MooncakeRow, fail: Any) -> None:
    """AIPerf's row rules: one input mode, and what goes with which."""
    if row.payload is not None:
        fail("payload", "raw request payloads are not supported; give input_length or messages")
    modes = [
        name
        for name in ("input_length", "text_input", "messages")
        if getattr(row, name) is not None
    ]
    if not modes:
        fail(None, "a row needs input_length, text_input or messages")
    if len(modes) > 1:
        fail(modes[1], f"{' and '.join(modes)} are mutually exclusive: give one")
    if row.hash_ids is not None and row.input_length is None:
        fail("hash_ids", "only allowed with input_length")
    if row.tools is not None and row.messages is None:
        fail("tools", "only allowed with messages")
    if row.messages is not None:
        if not row.messages:
            fail("messages", "must not be empty")
        for k, message in enumerate(row.messages):
            if not isinstance(message.get("role"), str):
                fail(f"messages[{k}]", "a message needs a role")
    if row.message_mode == "delta" and row.messages is None:
        fail("message_mode", "'delta' is only valid with messages")


class _Session:
    """One session's rows, turned into turns (and parts, where a prompt does not extend)."""

    def __init__(self, sid: str, rows: list[tuple[int, MooncakeRow]], path: str, block: int):
        self.sid = sid
        self.rows = rows
        self.path = path
        self.block = block
        self.warnings: list[str] = []

    def fail(self, line: int, name: str | None, problem: str) -> None:
        raise WorkloadError(problem, path=self.path, line=line, field=name)

    def mode(self) -> str:
        """The session's context mode: explicit on every row, or implied by its rows."""
        rows = self.rows
        explicit = {r.context_mode for _, r in rows}
        line = rows[0][0]
        if len(explicit) > 1:
            self.fail(line, "context_mode", "must be the same on every row of a session")
        given = next(iter(explicit))
        messages = [r for _, r in rows if r.messages is not None]
        if messages and len(messages) != len(rows):
            self.fail(line, "messages", "a session mixes messages rows with synthetic ones")
        implied = None
        if messages:
            modes = {r.message_mode for r in messages}
            if len(modes) > 1:
                self.fail(line, "message_mode", "must be the same on every row of a session")
            implied = _DELTAS if "delta" in modes else _FULL
        if given is not None and implied is not None and given != implied:
            self.fail(line, "context_mode", f"{given!r} contradicts the rows' {implied!r}")
        return given or implied or _DELTAS

    def check_ids(self, line: int, row: MooncakeRow) -> None:
        if not row.hash_ids or row.input_length is None:
            return
        found = hash_ids_problem(row.input_length, len(row.hash_ids), self.block)
        if found is not None:
            is_error, problem = found
            if is_error:
                self.fail(line, "hash_ids", problem)
            self.warnings.append(
                str(WorkloadError(problem, path=self.path, line=line, field="hash_ids"))
            )

    def parts(self) -> list[tuple[int, SessionSpec]]:
        """The session, split where a whole prompt does not extend the previous one."""
        mode = self.mode()
        parts: list[list[tuple[int, MooncakeRow, TurnSpec]]] = []
        previous: MooncakeRow | None = None
        for line, row in self.rows:
            self.check_ids(line, row)
            turn = self._turn(row)
            if not parts or (mode == _FULL and not self._extend(previous, row, turn)):
                parts.append([])
            parts[-1].append((line, row, turn))
            previous = row
        specs = []
        for k, part in enumerate(parts):
            first = part[0][1].timestamp
            for _, row, turn in part[1:]:
                if first is not None and row.timestamp is not None:
                    # trace timing: not before this long after the part's first turn
                    turn.offset_s = max(0.0, row.timestamp - first) / 1_000
            turns = [turn for _, _, turn in part]
            specs.append(SessionSpec(id=self.sid if k == 0 else f"{self.sid}#{k}", turns=turns))
        chain_sessions(specs)
        return [(part[0][0], spec) for part, spec in zip(parts, specs, strict=True)]

    def _turn(self, row: MooncakeRow) -> TurnSpec:
        messages = row.messages
        if row.text_input is not None:
            messages = [{"role": "user", "content": row.text_input}]
        return TurnSpec(
            messages=messages,
            input_tokens=None if messages is not None else row.input_length,
            hash_ids=row.hash_ids if messages is None else None,
            output_tokens=row.output_length,
            tools=row.tools,
            extra=row.extra,
            delay_s=(row.delay or 0.0) / 1_000,
        )

    def _extend(self, previous: MooncakeRow | None, row: MooncakeRow, turn: TurnSpec) -> bool:
        """Make ``turn`` carry what ``row`` adds to ``previous`` (``False``: it does not extend
        it, so it starts a new part)."""
        if previous is None:
            return False
        if previous.messages is not None and row.messages is not None:
            added = delta_messages(previous.messages, row.messages)
            if added is None:
                return False
            turn.messages = added
            return True
        if previous.input_length is None or row.input_length is None:
            # text_input rows: each is a one-message prompt, a new chat every time
            return False
        before, now = previous.hash_ids or [], row.hash_ids or []
        if now and not extends_ids(previous.input_length, before, now, self.block):
            return False
        if row.input_length < previous.input_length:
            return False
        turn.input_tokens, ids = delta_tokens(
            previous.input_length, previous.output_length or 0, row.input_length, now, self.block
        )
        turn.hash_ids = ids or None
        return True


def read_mooncake(path: Path, *, block_tokens: int | None = None) -> Workload:
    """Read a Mooncake trace as a workload (module docstring for the mapping).

    Args:
        path: the trace.
        block_tokens: tokens per ``hash_ids`` block (default 512, as in Mooncake's traces).

    Raises:
        WorkloadError: a row that does not decode or cannot be a turn, naming line and field.
    """
    name = str(path)
    block = block_tokens or 512
    sessions: dict[str, list[tuple[int, MooncakeRow]]] = {}
    for number, line in read_jsonl(path):
        row: MooncakeRow = decode_line(_decoder, line, path=name, number=number)

        def fail(field: str | None, problem: str, number: int = number) -> None:
            raise WorkloadError(problem, path=name, line=number, field=field)

        _validate(row, fail)
        key = f"row-{number}" if row.session_id is None else str(row.session_id)
        sessions.setdefault(key, []).append((number, row))
    stamps = [rows[0][1].timestamp for rows in sessions.values()]
    origin = min((s for s in stamps if s is not None), default=0.0)
    specs: list[tuple[int, SessionSpec]] = []
    warnings: list[str] = []
    for sid, rows in sessions.items():
        session = _Session(sid, rows, name, block)
        parts = session.parts()
        warnings.extend(session.warnings)
        first = rows[0][1].timestamp
        if first is not None:
            parts[0][1].start_s = (first - origin) / 1_000
        specs.extend(parts)
    prefix = prefix_stats(r.hash_ids or [] for rows in sessions.values() for _, r in rows)
    return compile_workload(
        specs,
        source=name,
        block_tokens=block,
        description=f"Mooncake trace {path.name}",
        check_hash_ids=False,
        warnings=warnings,
        prefix=prefix,
    )
