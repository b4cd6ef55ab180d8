"""Errors raised by the protocol layer.

A frame that does not decode raises exactly one type, ``DecodeError``, whose message names the
direction, the field and the problem. Callers count it by ``reason`` and drop the frame; nobody
sees a bare msgspec traceback.

msgspec reports the offending element of an array-encoded struct by position (``$[1][0][0]``);
``protocol.codec`` translates that into field names (``$.credits[0].id``) before raising, and
keeps msgspec's positional path in ``raw_path``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["DecodeError", "ProtocolError"]

_PATH = re.compile(r" - at `(key` in `)?(\$[^`]*)`$")


class ProtocolError(Exception):
    """Base of every protocol-level error."""


class DecodeError(ProtocolError):
    """A frame is not a valid message of the expected direction.

    Attributes:
        direction: which union was expected, e.g. ``"worker->router"``.
        path: the offending field as a JSON path with field names, e.g. ``$.credits[0].id``
            (``$.op`` is the tag, ``$`` the whole frame, ``[...]`` some value of a map).
        problem: what is wrong with it, in msgspec's words.
        reason: a stable, low-cardinality label for metrics (``malformed``, ``invalid``,
            ``unknown_tag``, ``too_deep``).
        raw_path: msgspec's own path, by position (``$[1][0][0]``); equal to ``path`` when
            no names could be given.
    """

    def __init__(
        self, direction: str, path: str, problem: str, reason: str, raw_path: str | None = None
    ) -> None:
        self.direction = direction
        self.path = path
        self.problem = problem
        self.reason = reason
        self.raw_path = path if raw_path is None else raw_path
        super().__init__(f"invalid {direction} message at {path}: {problem}")

    @classmethod
    def from_msgspec(
        cls, direction: str, exc: Exception, name_path: Callable[[str], str] | None = None
    ) -> DecodeError:
        """Translate a ``msgspec.DecodeError``/``ValidationError`` into a ``DecodeError``.

        Args:
            direction: the direction whose union was expected.
            exc: the msgspec exception.
            name_path: turns msgspec's positional path into a path with field names; it must
                not raise (return its argument when it cannot do better).
        """
        text = str(exc)
        match = _PATH.search(text)
        if match:
            raw_path, problem = match.group(2), text[: match.start()]
            if match.group(1):
                problem += " (in a map key)"
        else:
            raw_path, problem = "$", text
        if "Invalid value" in problem and raw_path.endswith("[0]"):
            reason = "unknown_tag"
        elif type(exc).__name__ == "ValidationError":
            reason = "invalid"
        else:
            reason = "malformed"
        path = raw_path if name_path is None or raw_path == "$" else name_path(raw_path)
        return cls(direction, path, problem, reason, raw_path)
