"""Errors raised by the protocol layer.

A frame that does not decode raises exactly one type, ``DecodeError``, whose message names the
direction, the field (msgspec's ``$.path``) and the problem. Callers count it by ``reason`` and
drop the frame; nobody sees a bare msgspec traceback.
"""

from __future__ import annotations

import re

__all__ = ["DecodeError", "ProtocolError"]

_PATH = re.compile(r" - at `(\$[^`]*)`$")


class ProtocolError(Exception):
    """Base of every protocol-level error."""


class DecodeError(ProtocolError):
    """A frame is not a valid message of the expected direction.

    Attributes:
        direction: which union was expected, e.g. ``"worker->router"``.
        path: the offending field as a JSON path (``$`` for the whole frame).
        problem: what is wrong with it, in msgspec's words.
        reason: a stable, low-cardinality label for metrics (``malformed``, ``invalid``,
            ``unknown_tag``, ``too_large``).
    """

    def __init__(self, direction: str, path: str, problem: str, reason: str) -> None:
        self.direction = direction
        self.path = path
        self.problem = problem
        self.reason = reason
        super().__init__(f"invalid {direction} message at {path}: {problem}")

    @classmethod
    def from_msgspec(cls, direction: str, exc: Exception) -> DecodeError:
        """Translate a ``msgspec.DecodeError``/``ValidationError`` into a ``DecodeError``."""
        text = str(exc)
        match = _PATH.search(text)
        if match:
            path, problem = match.group(1), text[: match.start()]
        else:
            path, problem = "$", text
        if "Invalid value" in problem and path.endswith("[0]"):
            reason = "unknown_tag"
        elif type(exc).__name__ == "ValidationError":
            reason = "invalid"
        else:
            reason = "malformed"
        return cls(direction, path, problem, reason)
