"""An incremental server-sent events decoder over raw body chunks, with a bound per event.

Why not the HTTP client's line reader: ``aiohttp``'s ``StreamReader`` raises its own
``LineTooLong`` (not a ``ClientError``) past 128 KiB, so one long event (a tool call's whole
arguments in one chunk, a long reasoning summary) killed the request with an exception nobody
caught. Why not an SSE library: ``scripts/bench_sse.py`` compares this decoder with
``httpx-sse``, ``aiohttp-sse-client`` and the official ``openai`` client at 1 ms inter-token
gaps; this one reads each body chunk once and times every event by the arrival of the chunk
that completed it, which costs a fraction of the CPU per token of the others (numbers in
docs/WORKER.md) and keeps the executor on the connection pool it already has.

The format is the WHATWG ``text/event-stream`` one: lines end in LF, CRLF or CR; ``field:
value`` (one leading space dropped); ``data`` lines of one event are joined with ``\\n``; a line
starting with ``:`` is a comment; a blank line dispatches. An event still pending when the body
ends is dispatched too (a stream cut after its last ``data:`` line is then decoded and judged by
its content, not silently dropped).
"""

from __future__ import annotations

from typing import Final

__all__ = ["EventTooLong", "SSEDecoder", "SSEEvent"]

DEFAULT_MAX_EVENT_BYTES: Final = 16 << 20


class EventTooLong(Exception):
    """One event (or one line) is longer than the decoder's bound."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"server-sent event of more than {limit} bytes ({size} so far)")
        self.size = size
        self.limit = limit


class SSEEvent:
    """One dispatched event: its ``event`` field (``""`` if none) and its joined ``data``."""

    __slots__ = ("data", "event")

    def __init__(self, event: str, data: bytes) -> None:
        self.event = event
        self.data = data

    def __repr__(self) -> str:
        return f"SSEEvent(event={self.event!r}, data={self.data[:60]!r})"


class SSEDecoder:
    """Feed body chunks, get complete events.

    Args:
        max_event_bytes: an event (its pending line plus its data so far) longer than this
            raises ``EventTooLong``; memory stays bounded whatever the server sends.
    """

    __slots__ = ("_buf", "_data", "_data_size", "_event", "max_event_bytes")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be >= 1")
        self.max_event_bytes = max_event_bytes
        self._buf = b""
        self._data: list[bytes] = []
        self._data_size = 0
        self._event = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events that ``chunk`` completes (often none or one).

        Raises:
            EventTooLong: the pending event passed ``max_event_bytes``.
        """
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
            held = buf.endswith(b"\r")
            if held:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held:
                buf += b"\r"
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) + self._data_size > self.max_event_bytes:
            raise EventTooLong(len(self._buf) + self._data_size, self.max_event_bytes)
        events: list[SSEEvent] = []
        for line in lines:
            if line:
                self._line(line)
            elif self._data or self._event:
                events.append(self._dispatch())
        return events

    def close(self) -> list[SSEEvent]:
        """The body ended: the event still pending, if any (a last line without its newline)."""
        if self._buf:
            self._line(self._buf.rstrip(b"\r"))
            self._buf = b""
        if self._data or self._event:
            return [self._dispatch()]
        return []

    def _line(self, line: bytes) -> None:
        if line[:1] == b":":
            return  # a comment (keep-alive)
        name, colon, value = line.partition(b":")
        if not colon:
            value = b""
        elif value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_bytes:
                raise EventTooLong(self._data_size, self.max_event_bytes)
        elif name == b"event":
            self._event = value.decode(errors="replace")
        # "id" and "retry" matter to reconnecting clients only; unknown fields are ignored.

    def _dispatch(self) -> SSEEvent:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        event = SSEEvent(self._event, data)
        self._data = []
        self._data_size = 0
        self._event = ""
        return event
