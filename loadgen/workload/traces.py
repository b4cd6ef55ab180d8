"""What the trace readers share: whole prompts turned into the new input of each turn.

Our format, like AIPerf's default context mode (``deltas_without_responses``), gives each turn
only what it adds: the worker holds the session's history (earlier prompts and the answers the
server really gave) and sends it first. Several trace formats record instead each request's
**whole** prompt: Mooncake rows with ``messages`` (AIPerf's ``message_mode: history``), rows with
``context_mode: message_array_with_responses``, and the cumulative ``hash_ids`` of coding-agent
and Bailian traces (each request's ids cover its whole prompt, history included). Replayed as
they are, the history would be sent twice and long sessions would grow quadratically.

So a reader turns a session's whole prompts into turns:

* a prompt that **extends** the previous one (its leading part is the previous prompt) becomes
  a turn of the same session carrying only the rest: ``delta_messages`` drops the previous
  messages and the recorded answer after them (the live answer stands in its place);
  ``delta_tokens`` drops the previous prompt's tokens and its output, and keeps the ``hash_ids``
  of the blocks at the end of the prompt that hold the new tokens;
* a prompt that does **not** (the context was compacted or cleared, another branch of the
  chat) starts a new session with the whole prompt: ``chain_sessions`` makes it a SPAWN child
  declared by the previous part's final turn, so it still runs after it, without its history.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from loadgen.workload.model import Branch, SessionSpec, TurnSpec

__all__ = ["chain_sessions", "delta_messages", "delta_tokens", "extends_ids"]


def delta_messages(
    previous: Sequence[dict[str, Any]], current: Sequence[dict[str, Any]]
) -> list[dict[str, Any]] | None:
    """The messages ``current`` adds to ``previous`` (``None`` if it does not extend it).

    A recorded ``assistant`` message right after the previous prompt is dropped: it is the
    previous turn's answer, which the worker's history holds as the server really gave it.
    """
    n = len(previous)
    if len(current) <= n or list(current[:n]) != list(previous):
        return None
    rest = list(current[n:])
    if rest and rest[0].get("role") == "assistant":
        rest = rest[1:]
    return rest or None


def extends_ids(
    previous_tokens: int, previous_ids: Sequence[int], ids: Sequence[int], block_tokens: int
) -> bool:
    """Whether a prompt with ``ids`` begins with the previous prompt's whole blocks.

    The previous prompt's last block is usually partial, and a partial block's id changes once
    the block fills up, so only its whole blocks (``previous_tokens // block_tokens``) must match.
    """
    whole = min(previous_tokens // block_tokens, len(previous_ids))
    return len(ids) >= whole and list(ids[:whole]) == list(previous_ids[:whole])


def delta_tokens(
    previous_tokens: int,
    previous_output: int,
    tokens: int,
    ids: Sequence[int],
    block_tokens: int,
) -> tuple[int, list[int]]:
    """The new tokens of a prompt that extends the previous one, and the blocks holding them.

    The history already holds the previous prompt and its answer; the rest is new. A trace
    whose next prompt holds less than the previous answer (a client that drops reasoning
    tokens, say) still sends at least one new token. The new tokens are the prompt's last ones,
    so their blocks are its last ``ceil(new / block_tokens)`` ids.
    """
    new = max(1, tokens - previous_tokens - previous_output)
    blocks = min(len(ids), math.ceil(new / block_tokens))
    return new, list(ids[len(ids) - blocks :]) if blocks else []


def chain_sessions(parts: list[SessionSpec]) -> list[SessionSpec]:
    """Link the parts of one recorded chat that could not share a history, in order.

    Each part's final turn declares the next part as a SPAWN child (a bare id on a final turn:
    nobody joins it, and the tree lives until it ends), so the parts run one after the other
    with fresh contexts. Returns the parts (the first one is the root).
    """
    for part, nxt in itertools.pairwise(parts):
        last: TurnSpec = part.turns[-1]
        last.spawns = [*last.spawns, Branch(children=[nxt.id])]
    return parts
