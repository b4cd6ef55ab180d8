"""The wire format of docs/PROTOCOL.md §2-§4, written from the document alone.

Every payload is one msgpack array ``[tag, field_1, …]`` (§3); a ``Credit`` is an untagged
array of its 15 fields (§10). Only plain lists go over the wire: no project code is used.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

PROTOCOL_VERSION = 1

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def encode(message: list[Any]) -> bytes:
    """One payload frame: the msgpack array of a message (§3)."""
    return _encoder.encode(message)


def decode(frame: bytes) -> list[Any] | None:
    """The message array of a frame, or None for a frame that is not a tagged array (§4)."""
    try:
        message = _decoder.decode(frame)
    except msgspec.DecodeError:
        return None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        return None
    return message


def field(message: list[Any], index: int, default: Any = None) -> Any:
    """Field at position ``index`` (1-based after the tag); a missing trailing one is its default
    (§4 rule 3), extra trailing elements are ignored (§4 rule 2)."""
    return message[index] if index < len(message) else default


def new_incarnation(prefix: str) -> str:
    """Random per process start (§5.1)."""
    return f"{prefix}-{secrets.token_hex(4)}"


def credit(  # the 15 fields of Credit, §10, in order
    credit_id: int,
    x_correlation_id: str,
    *,
    turn_index: int = 0,
    num_turns: int = 1,
    conversation_id: str = "",
    phase: str = "profiling",
    parent_correlation_id: str | None = None,
    root_correlation_id: str | None = None,
    branch_mode: str | None = None,
    fork_count: int = 0,
    agent_depth: int = 0,
    subagent_type: str | None = None,
    allow_migration: bool = False,
    cancel_after_s: float | None = None,
    payload: bytes = b"",
) -> list[Any]:
    """A ``Credit`` as its untagged 15-element array (§3, §10)."""
    return [
        credit_id,
        x_correlation_id,
        turn_index,
        num_turns,
        conversation_id,
        phase,
        parent_correlation_id,
        root_correlation_id,
        branch_mode,
        fork_count,
        agent_depth,
        subagent_type,
        allow_migration,
        cancel_after_s,
        payload,
    ]


# Positions of Credit's fields (§10).
C_ID, C_XCID, C_TURN, C_NUM_TURNS = 0, 1, 2, 3
C_PARENT, C_BRANCH = 6, 8
C_CANCEL_AFTER = 13
