"""credit-router's wire protocol: msgspec tagged unions over ZeroMQ, one union per direction.

``PROTOCOL_VERSION`` is sent in every hello. A peer of another version is refused with a
``Refusal`` naming both versions; within one version, messages evolve only by these rules
(msgspec's schema-evolution guide, adapted to array-encoded structs):

1. A new field goes at the **end** of its struct and has a default. Old peers ignore trailing
   elements they do not know; new peers fill in the default when an old peer omits it.
2. No field is removed, reordered or renamed (positions are the wire format).
3. No field changes type (a new ``Status``/``BranchMode`` value is a type change), and no tag
   changes value.
4. A new message type gets a new tag; an old peer answers it as an unknown message (counted,
   dropped), so only send it to peers whose hello shows they understand it.

Anything else is a new ``PROTOCOL_VERSION``. The hellos, the welcomes and ``Refusal`` keep their
version-1 fields in every version, so that a peer of any version can read its refusal.
``forbid_unknown_fields`` is never set on wire structs because it would break rule 1. The full
description, with a hex example of each message, is ``docs/PROTOCOL.md``;
``tests/protocol/compat`` keeps frozen copies of older definitions.
"""

from __future__ import annotations

from typing import Final

from protocol.messages import *  # noqa: F403  (re-export the message catalogue)
from protocol.messages import __all__ as _messages_all

PROTOCOL_VERSION: Final = 1
"""Incremented on any change that breaks the evolution rules above."""

__all__ = ["PROTOCOL_VERSION", *_messages_all]
