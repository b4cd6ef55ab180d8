"""Alibaba Bailian usage traces, as AIPerf's ``bailian_trace`` loader reads them.

The spec: the Qwen Bailian usage traces (https://github.com/alibaba-edu/qwen-bailian-usagetraces-anon)
and AIPerf's ``BailianTrace`` model (https://github.com/ai-dynamo/aiperf,
``src/aiperf/dataset/loader/models.py`` and ``bailian_trace.py``). One request per JSONL row:
``chat_id``, ``parent_chat_id`` (-1 for the first request of a chat), ``timestamp`` (seconds),
``input_length``, ``output_length``, ``type`` (the request's kind: text, search, image, file),
``turn`` and ``hash_ids`` (salted SipHash ids of 16-token blocks).

* Rows linked through ``parent_chat_id`` belong to the chat of their root (a row whose parent
  is not in the file starts a chat of its own), ordered by ``turn`` then ``timestamp``; each chat
  is one session (id ``chat-<root chat_id>``).
* ``hash_ids`` are cumulative (each request's cover its whole prompt, history included), so a
  request that extends the previous one becomes a turn carrying only what it adds, and one that
  does not starts a new part of the session (``traces`` module).
* The block size is 16 tokens (``--block-tokens`` overrides it); ``hash_ids`` are checked
  against ``input_length`` as AIPerf does (``model.hash_ids_problem``).
* A chat starts at its root's ``timestamp`` (relative to the earliest); a later row's
  ``timestamp`` is the turn's ``offset_s`` from its part's first turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final

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
from loadgen.workload.traces import chain_sessions, delta_tokens, extends_ids

__all__ = ["BAILIAN_BLOCK_TOKENS", "BailianRow", "read_bailian"]

BAILIAN_BLOCK_TOKENS: Final = 16
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]


class BailianRow(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, rename={"kind": "type"}):
    """One row of a Bailian trace."""

    chat_id: int
    parent_chat_id: int = -1
    timestamp: Annotated[float, msgspec.Meta(ge=0.0)]
    """Seconds since the trace's start."""
    input_length: _NonNeg
    output_length: _NonNeg
    kind: str = ""
    """The request's ``type`` (text, search, image, file)."""
    turn: int = 1
    hash_ids: list[int] = []


_decoder: Final = msgspec.json.Decoder(BailianRow)


def _root_of(rows: dict[int, tuple[int, BailianRow]], chat: int, name: str) -> int:
    """The first request of ``chat``'s chat, through ``parent_chat_id`` (within the file)."""
    seen = {chat}
    parent = rows[chat][1].parent_chat_id
    while parent in rows:
        if parent in seen:
            raise WorkloadError(
                "parent_chat_id links form a cycle",
                path=name,
                line=rows[chat][0],
                field="parent_chat_id",
            )
        seen.add(parent)
        chat, parent = parent, rows[parent][1].parent_chat_id
    return chat


def _chat(
    root: int, members: list[tuple[int, BailianRow]], block: int, origin: float
) -> list[tuple[int, SessionSpec]]:
    """One chat's requests as a session (and its parts, where a prompt does not extend)."""
    members.sort(key=lambda pair: (pair[1].turn, pair[1].timestamp, pair[0]))
    parts: list[list[tuple[int, BailianRow, TurnSpec]]] = []
    previous: BailianRow | None = None
    for number, row in members:
        turn = TurnSpec(
            input_tokens=row.input_length,
            hash_ids=list(row.hash_ids) or None,
            output_tokens=row.output_length,
        )
        if (
            previous is not None
            and row.input_length >= previous.input_length
            and extends_ids(previous.input_length, previous.hash_ids, row.hash_ids, block)
        ):
            turn.input_tokens, ids = delta_tokens(
                previous.input_length, previous.output_length, row.input_length, row.hash_ids, block
            )
            turn.hash_ids = ids or None
        else:
            parts.append([])
        parts[-1].append((number, row, turn))
        previous = row
    sessions = []
    for k, part in enumerate(parts):
        first = part[0][1].timestamp
        for _, row, turn in part[1:]:
            turn.offset_s = round(max(0.0, row.timestamp - first), 6)
        sid = f"chat-{root}" if k == 0 else f"chat-{root}#{k}"
        sessions.append(SessionSpec(id=sid, turns=[turn for _, _, turn in part]))
    sessions[0].start_s = round(members[0][1].timestamp - origin, 6)
    chain_sessions(sessions)
    return [(part[0][0], spec) for part, spec in zip(parts, sessions, strict=True)]


def read_bailian(path: Path, *, block_tokens: int | None = None) -> Workload:
    """Read a Bailian trace as a workload (module docstring for the mapping).

    Raises:
        WorkloadError: naming the line and the field of the first problem.
    """
    name = str(path)
    block = block_tokens or BAILIAN_BLOCK_TOKENS
    rows: dict[int, tuple[int, BailianRow]] = {}
    warnings: list[str] = []
    for number, line in read_jsonl(path):
        row: BailianRow = decode_line(_decoder, line, path=name, number=number)
        if row.chat_id in rows:
            raise WorkloadError(
                f"duplicate chat_id {row.chat_id}", path=name, line=number, field="chat_id"
            )
        found = hash_ids_problem(row.input_length, len(row.hash_ids), block)
        if found is not None:
            is_error, problem = found
            error = WorkloadError(problem, path=name, line=number, field="hash_ids")
            if is_error:
                raise error
            warnings.append(str(error))
        rows[row.chat_id] = (number, row)

    chats: dict[int, list[tuple[int, BailianRow]]] = {}
    for chat in rows:
        chats.setdefault(_root_of(rows, chat, name), []).append(rows[chat])
    origin = min((r.timestamp for _, r in rows.values()), default=0.0)
    specs: list[tuple[int, SessionSpec]] = []
    for root, members in chats.items():
        specs.extend(_chat(root, members, block, origin))
    specs.sort(key=lambda pair: pair[0])
    return compile_workload(
        specs,
        source=name,
        block_tokens=block,
        description=f"Bailian trace {path.name}",
        check_hash_ids=False,
        warnings=warnings,
        prefix=prefix_stats(r.hash_ids for _, r in sorted(rows.values(), key=lambda p: p[0])),
    )
