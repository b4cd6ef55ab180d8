"""The codec: every message round-trips, and every bad frame becomes one typed ``DecodeError``.

A ``DecodeError`` names the direction, the field (``$.credits[0].id``; msgspec's positional
``$[1][0][0]`` is kept as ``raw_path``) and the problem, and carries a metrics ``reason``. No
msgspec exception (nor ``RecursionError``) ever leaves the codec.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings, strategies as st
from wire_strategies import (
    DIRECTIONS,
    directions_of,
    every_message_class,
    for_struct,
    members,
    minimal,
)

from protocol import codec, messages as m
from protocol.errors import DecodeError

_CASES = [(d, cls) for d in DIRECTIONS for cls in members(d)]
_IDS = [f"{cls.__name__}-{d}" for d, cls in _CASES]
_REASONS = {"malformed", "invalid", "unknown_tag", "too_deep", "too_large"}
_pack = msgspec.msgpack.encode


def _decode_error(direction: str, frame: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        DIRECTIONS[direction][1](frame)
    err = info.value
    assert type(err) is DecodeError
    assert not isinstance(err, msgspec.MsgspecError)
    assert err.__cause__ is None  # raised "from None": one error, not a msgspec chain
    assert err.__suppress_context__
    assert err.direction == direction
    assert err.reason in _REASONS
    assert str(err) == f"invalid {direction} message at {err.path}: {err.problem}"
    return err


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize(("direction", "cls"), _CASES, ids=_IDS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_every_message_round_trips_through_its_directions_decoder(
    direction: str, cls: type[m.Msg], data: st.DataObject
) -> None:
    msg = data.draw(for_struct(cls))
    frame = codec.encode(msg)
    assert DIRECTIONS[direction][1](frame) == msg
    buffer = bytearray()
    codec.encode_into(msg, buffer)
    assert buffer == frame


def test_decoders_accept_any_buffer() -> None:
    frame = codec.encode(m.Heartbeat(sent_at_s=1.5))
    for view in (frame, bytearray(frame), memoryview(frame)):
        assert codec.decode_worker_to_router(view) == m.Heartbeat(sent_at_s=1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ bad frames


def test_truncated_frame_is_malformed() -> None:
    frame = codec.encode(m.Ack(seq=70000))
    for cut in range(len(frame)):
        err = _decode_error("router->worker", frame[:cut])
        assert (err.reason, err.path, err.problem) == ("malformed", "$", "Input data was truncated")


def test_trailing_bytes_are_malformed() -> None:
    err = _decode_error("router->worker", codec.encode(m.Ack(seq=1)) + b"\x00")
    assert err.reason == "malformed"
    assert err.problem.startswith("MessagePack data is malformed: trailing characters")


@pytest.mark.parametrize("garbage", [b"\xc1", b"\xc1\x00\x00", b"\xd4\x01\x02"], ids=repr)
def test_garbage_bytes_are_malformed_or_invalid(garbage: bytes) -> None:
    for direction in DIRECTIONS:
        err = _decode_error(direction, garbage)
        assert err.path == "$"
        assert err.reason in {"malformed", "invalid"}


def test_invalid_opcode_is_malformed() -> None:
    err = _decode_error("worker->router", b"\xc1")
    assert err.reason == "malformed"
    assert err.problem == "MessagePack data is malformed: invalid opcode '\\xc1' (byte 0)"


def test_wrong_type_in_a_nested_field_names_the_field() -> None:
    frame = _pack(["submitb", [[1, "s1"], ["seven", "s2"]]])
    err = _decode_error("producer->router", frame)
    assert err.path == "$.credits[1].id"
    assert err.raw_path == "$[1][1][0]"
    assert err.problem == "Expected `int`, got `str`"
    assert err.reason == "invalid"
    assert str(err) == (
        "invalid producer->router message at $.credits[1].id: Expected `int`, got `str`"
    )


@pytest.mark.parametrize(
    ("direction", "value", "path", "problem"),
    [
        (
            "router->worker",
            ["credit", "bench", [1, "s", 0, 1, "", "p", None, None, None, 0, 0, None, False, "2"]],
            "$.credit.cancel_after_s",
            "Expected `float | null`, got `str`",
        ),
        (
            "router->worker",
            ["credit", "bench", [1, "s", 0, 1, "", "p", None, None, "fork2"]],
            "$.credit.branch_mode",
            "Invalid enum value 'fork2'",
        ),
        (
            "router->producer",
            ["outcomeb", [["outcome", 1, "completed"], ["outcome", 2, "done"]]],
            "$.outcomes[1].status",
            "Invalid enum value 'done'",
        ),
        (
            "worker->router",
            ["hello", "w1", "i", 1, 8, {"gpu": 1}],
            "$.labels[...]",
            "Expected `str`, got `int`",
        ),
        (
            "worker->router",
            ["hello", "w1", "i", 1, 8, {2: "x"}],
            "$.labels",
            "Expected `str`, got `int` (in a map key)",
        ),
        (
            "worker->router",
            ["inflight", {"bench": [1, "2"]}],
            "$.credits[...][1]",
            "Expected `int`, got `str`",
        ),
        (
            "worker->router",
            ["doneb", [["done", 1, "bench", 7, "completed", "", None, None, 1]]],
            "$.completions[0].session_ended",
            "Expected `bool`, got `int`",
        ),
        (
            "worker->router",
            ["done", 1, "bench", 7, "completed", "", None, None, False, "not bin"],
            "$.result",
            "Expected `bytes`, got `str`",
        ),
        ("router->worker", ["ack", 1.0], "$.seq", "Expected `int`, got `float`"),
        ("router->worker", ["ack"], "$", "Expected `array` of at least length 2, got 1"),
        (
            "worker->router",
            ["hello", "w1", "i", 1],
            "$",
            "Expected `array` of at least length 5, got 4",
        ),
        (
            "producer->router",
            ["submit", [1]],
            "$.credit",
            "Expected `array` of at least length 2, got 1",
        ),
        ("producer->router", {"op": "submit"}, "$", "Expected `array`, got `object`"),
        ("producer->router", [], "$", "Expected `array` of at least length 1, got 0"),
        ("producer->router", [7], "$.op", "Expected `str`, got `int`"),
        ("producer->router", "submit", "$", "Expected `array`, got `str`"),
    ],
)
def test_invalid_frames_name_the_field_and_the_problem(
    direction: str, value: object, path: str, problem: str
) -> None:
    err = _decode_error(direction, _pack(value))
    assert (err.path, err.problem, err.reason) == (path, problem, "invalid")


def test_unknown_tag() -> None:
    err = _decode_error("worker->router", _pack(["teleport", 1]))
    assert (err.path, err.raw_path, err.reason) == ("$.op", "$[0]", "unknown_tag")
    assert err.problem == "Invalid value 'teleport'"


def test_unknown_tag_of_a_nested_message() -> None:
    err = _decode_error("router->producer", _pack(["outcomeb", [["outcom", 1, "completed"]]]))
    assert (err.path, err.raw_path, err.reason) == ("$.outcomes[0].op", "$[1][0][0]", "unknown_tag")


_MISDIRECTED = [
    (cls, other)
    for cls in every_message_class()
    for other in DIRECTIONS
    if other not in directions_of(cls)
]


@pytest.mark.parametrize(
    ("cls", "direction"), _MISDIRECTED, ids=[f"{c.__name__}-to-{d}" for c, d in _MISDIRECTED]
)
def test_a_message_of_another_direction_is_an_unknown_tag(cls: type[m.Msg], direction: str) -> None:
    err = _decode_error(direction, codec.encode(minimal(cls)))
    assert (err.path, err.reason) == ("$.op", "unknown_tag")


def test_nesting_deeper_than_the_decoder_follows_is_too_deep() -> None:
    # An unknown trailing element is skipped, however deep; msgspec gives up with a
    # RecursionError at its depth limit, which must not escape as a bare traceback.
    credit = codec.encode(m.Credit(id=1, x_correlation_id="s"))
    # The tag, the credit, router_incarnation (""), then an unknown trailing element.
    frame = b"\x94\xa6submit" + credit + b"\xa0" + b"\x91" * 5000 + b"\xc0"
    err = _decode_error("producer->router", frame)
    assert (err.path, err.reason) == ("$", "too_deep")


# ------------------------------------------------------------------------------------ fuzz

_UNIONS = {d: tuple(members(d)) for d in DIRECTIONS}


def _decode_or_error(direction: str, frame: bytes) -> None:
    """A frame decodes to a message of the direction, or raises exactly ``DecodeError``."""
    try:
        msg = DIRECTIONS[direction][1](frame)
    except DecodeError as exc:
        err = exc
    else:
        assert isinstance(msg, _UNIONS[direction])
        return
    assert err.reason in _REASONS
    assert err.path.startswith("$")
    assert err.raw_path.startswith("$")


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@settings(max_examples=100, deadline=None)
@given(frame=st.binary(max_size=64))
def test_fuzz_arbitrary_bytes(direction: str, frame: bytes) -> None:
    _decode_or_error(direction, frame)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1).filter(lambda i: i >= -(2**63))
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_msgpack_arrays_with_a_valid_tag(direction: str, data: st.DataObject) -> None:
    tag = data.draw(st.sampled_from([c.__struct_config__.tag for c in _UNIONS[direction]]))
    rest = data.draw(st.lists(_VALUES, max_size=10))
    _decode_or_error(direction, _pack([tag, *rest]))


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_mutated_valid_frames(direction: str, data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(_UNIONS[direction]))
    frame = bytearray(codec.encode(data.draw(for_struct(cls))))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(frame)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "insert" or at == len(frame):
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        elif action == "flip":
            frame[at] = data.draw(st.integers(0, 255))
        else:
            del frame[at]
    _decode_or_error(direction, bytes(frame))
