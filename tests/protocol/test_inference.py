"""The bundled executors' payload and result maps: round trips, evolution both ways, bad bytes."""

from __future__ import annotations

import msgspec
import pytest

from protocol.inference import (
    RequestResult,
    TurnRequest,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
)


def test_request_round_trips_and_omits_defaults() -> None:
    request = TurnRequest(
        messages=[{"role": "user", "content": "hi"}], output_tokens=8, context_tokens=120
    )
    data = encode_request(request)
    assert decode_request(data) == request
    assert set(msgspec.msgpack.decode(data)) == {"messages", "output_tokens", "context_tokens"}


def test_request_accepts_json_and_empty_payloads() -> None:
    assert decode_request(b'{"input_tokens": 300, "output_tokens": 7}') == TurnRequest(
        input_tokens=300, output_tokens=7
    )
    assert decode_request(b"") == TurnRequest()


def test_a_bad_request_names_the_field() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.input_tokens"):
        decode_request(msgspec.msgpack.encode({"input_tokens": "many"}))


def test_result_round_trips() -> None:
    result = RequestResult(
        input_tokens=900,
        cached_tokens=640,
        output_tokens=32,
        ttft_s=0.05,
        itl_s=0.008,
        e2e_s=0.3,
        http_status=200,
        endpoint="http://127.0.0.1:8000/v1",
        reasoning_tokens=20,
        ttft_content_s=0.2,
        tool_calls=2,
    )
    assert decode_result(encode_result(result)) == result
    # The keys added for agentic streams are plain map keys: an older reader skips them.
    doc = msgspec.msgpack.decode(encode_result(result))
    assert {"reasoning_tokens", "ttft_content_s", "tool_calls"} <= doc.keys()


def test_results_evolve_both_ways() -> None:
    newer = msgspec.msgpack.encode({"input_tokens": 5, "output_tokens": 2, "gpu": "H100"})
    assert decode_result(newer) == RequestResult(input_tokens=5, output_tokens=2)
    older = msgspec.msgpack.encode({"ttft_s": 0.25})  # e.g. a result with only a TTFT
    assert decode_result(older) == RequestResult(ttft_s=0.25)


@pytest.mark.parametrize("data", [b"", b"\xc1", msgspec.msgpack.encode({"ttft_s": "x"})])
def test_an_unreadable_result_is_none(data: bytes) -> None:
    assert decode_result(data) is None
