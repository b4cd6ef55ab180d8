"""The SSE decoder: the WHATWG format, any split of the bytes, a bound on an event's size."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, strategies as st

from worker_agent.sse import EventTooLong, SSEDecoder

STREAM = (
    b": keep-alive\n\n"
    b'data: {"a": 1}\n\n'
    b"event: error\r\ndata: first\r\ndata:second\r\n\r\n"
    b"id: 7\rretry: 10\rdata:  two spaces\r\r"
    b"data\n\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    ("", b'{"a": 1}'),
    ("error", b"first\nsecond"),
    ("", b" two spaces"),
    ("", b""),
    ("", b"[DONE]"),
]


def decode(pieces: list[bytes], limit: int = 1 << 20) -> list[tuple[str, bytes]]:
    decoder = SSEDecoder(limit)
    events = [e for piece in pieces for e in decoder.feed(piece)] + decoder.close()
    return [(e.event, e.data) for e in events]


def test_fields_comments_and_every_line_end() -> None:
    assert decode([STREAM]) == EXPECTED


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_of_the_bytes_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted({0, len(STREAM), *cuts})
    pieces = [STREAM[a:b] for a, b in itertools.pairwise(points)]
    assert decode(pieces) == EXPECTED


def test_a_last_event_without_its_blank_line_is_dispatched_at_the_end() -> None:
    assert decode([b"data: cut"]) == [("", b"cut")]
    assert decode([b"data: a\n\ndata: b\n"]) == [("", b"a"), ("", b"b")]


def test_an_event_past_the_bound_raises_whether_one_line_or_many() -> None:
    with pytest.raises(EventTooLong, match="more than 100 bytes"):
        decode([b"data: " + b"x" * 200], limit=100)  # a line that never ends
    with pytest.raises(EventTooLong):
        decode([b"data: " + b"x" * 40 + b"\n"] * 4, limit=100)  # many short lines, one event
    assert decode([b"data: " + b"x" * 90 + b"\n\n"] * 3, limit=100) == [("", b"x" * 90)] * 3
