"""Logging set-up for the command line: text for people, or one JSON object per line.

Only ``__main__`` modules call ``configure``; library code just logs through its module logger
with %-style arguments. The JSON form is structured: a ``key=%s`` in a message becomes a field
``"key": value`` (a JSON number, boolean or string, never a Python repr), and ``msg`` keeps the
words around them, so ``"worker lost name=%s in_flight=%d"`` logs
``{"msg": "worker lost", "name": "gpu0", "in_flight": 3, ...}``. Time, level and logger come
first, then any ``extra=`` fields; journald and log shippers get one event per line.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import sys
import time
from typing import Any, Final

__all__ = ["JsonFormatter", "configure", "structured"]

_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_CONVERSION: Final = re.compile(
    r"(?:(?P<key>[A-Za-z_][\w.]*)=)?"
    r"%(?P<spec>(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%])"
)
"""One %-conversion, with the ``key=`` before it if any."""


def _value(value: Any) -> Any:
    """A JSON-native value: numbers, booleans and None as they are, bytes decoded, else str."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple | set | frozenset):
        return [_value(v) for v in value]
    if isinstance(value, dict):
        return {str(_value(k)): _value(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return _value(value.value)
    return str(value)


def structured(template: str, args: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
    """Split a %-style message into its words and its ``key=%x`` fields.

    Returns ``(msg, fields)``: ``msg`` is the template without the ``key=`` conversions, with
    the other arguments formatted in; raises ``TypeError``/``ValueError`` when the arguments
    do not fit the template (the caller falls back to the plain message).
    """
    fields: dict[str, Any] = {}
    parts: list[str] = []
    rest: list[Any] = []
    position = 0
    at = 0
    for match in _CONVERSION.finditer(template):
        spec = match.group("spec")
        if spec == "%":
            continue
        if "*" in spec or spec.startswith("("):
            raise ValueError("unsupported conversion")
        key = match.group("key")
        if key is not None:
            fields[key] = _value(args[position])
            parts.append(template[at : match.start()])
        elif spec.endswith("r") and isinstance(args[position], str | bytes):
            # A repr is for a text line's eye; in JSON the text itself reads better.
            parts.append(template[at : match.end() - 1] + "s")
            rest.append(_value(args[position]))
        else:
            parts.append(template[at : match.end()])
            rest.append(args[position])
        at = match.end()
        position += 1
    if position != len(args):
        raise TypeError("not all arguments converted")
    parts.append(template[at:])
    text = "".join(parts)
    text = text % tuple(rest) if rest else text.replace("%%", "%")
    return " ".join(text.split()).rstrip(":,;"), fields


class JsonFormatter(logging.Formatter):
    """One structured JSON object per record (see the module's docstring)."""

    @staticmethod
    def converter(seconds: float | None = None) -> time.struct_time:
        """UTC, as the ``Z`` in ``ts`` says."""
        return time.gmtime(seconds)

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        event: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        args = record.args
        try:
            if not isinstance(record.msg, str) or not isinstance(args, tuple):
                raise TypeError("not a %-template with positional arguments")
            msg, fields = structured(record.msg, args)
        except (TypeError, ValueError, IndexError):
            msg, fields = record.getMessage(), {}
        event["msg"] = msg
        for key, value in fields.items():
            event.setdefault(key, value)
        for key, value in vars(record).items():
            if key not in _STANDARD:
                event.setdefault(key, _value(value))
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send every log record to stderr, as text or JSON lines.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error`` (any case).
        fmt: ``text`` or ``json``.
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
