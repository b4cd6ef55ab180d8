"""Structure-aware fuzz of the four decoders, judged by an independent model of the rules.

``tests/protocol/test_codec.py`` fuzzes with random bytes, random values after a valid tag and
byte flips of valid frames, and checks only that nothing but ``DecodeError`` comes out. Here
every frame is built from a valid message by a structural mutation, written with any msgpack
header widths, and the decoder's answer is compared with ``wire.Oracle`` — the protocol's
decoding rules (docs/PROTOCOL.md §3–§4.1) computed from the message definitions alone:

* a frame the oracle accepts must decode, to exactly the message it predicts (defaults filled,
  unknown trailing elements dropped), and re-encode to the same message;
* a frame it rejects must raise ``DecodeError`` — never another exception — with the reason it
  predicts and a path naming the field at fault (or msgspec's positional path for it).

Mutations: wrong wire types at every field position (tag, fields, nested credits and
completions, list items, map keys and values), integers at and past the int64/uint64 limits
(msgpack cannot carry more than 64 bits, so "huge" integers arrive as floats, digit strings or
bin), unknown and swapped tags, every structural truncation of every array, every byte prefix,
oversize strings, blobs, lists and maps one past each bound, length headers claiming 4 GiB,
depth bombs in typed and in skipped positions, invalid UTF-8, and extension types.
"""

from __future__ import annotations

import math
import time
import typing

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import given, strategies as st

from protocol import codec, messages as m
from protocol.errors import DecodeError
from tests.fuzz import wire
from tests.fuzz.profiles import budget
from tests.fuzz.wire import (
    DIRECTIONS,
    F32,
    BadUtf8,
    Ext,
    Oracle,
    Raw,
    Rejected,
    TooDeep,
    members,
    nest,
    pack,
    same,
    tag_of,
    to_tree,
)

ORACLE = Oracle()
REASONS = {"malformed", "invalid", "unknown_tag", "too_deep", "too_large"}
CASES = [(d, cls) for d in DIRECTIONS for cls in members(d)]
ALL_TAGS = sorted({tag_of(cls) for _, cls in CASES})

HOSTILE: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    float(2**64),  # a "huge int" can only travel as a float…
    "18446744073709551616",  # …or as digits
    0.5,
    -0.0,
    1e300,
    math.inf,
    -math.inf,
    math.nan,
    F32(1.5),
    "",
    "x",
    "completed",
    "fork",
    "é" * 257,
    b"",
    b"\x00",
    [],
    [0],
    ["x"],
    [[]],
    {},
    {"k": "v"},
    {"k": 1},
    {"k": [1]},
    {1: "v"},
    Ext(1, b"\x00"),
    Ext(-1, b"\x00\x00\x00\x00"),  # a msgpack timestamp
    BadUtf8(b"\xff"),
    BadUtf8(b"\xed\xa0\x80"),  # a UTF-16 surrogate, not valid UTF-8
    nest(40),
    nest(40, as_map=True),
]
"""Values of every msgpack kind, and the edges of each, to put where they do not belong."""

BOMBS: list[Raw] = [
    Raw(b"\xdd\xff\xff\xff\xff", kind="bomb-array"),
    Raw(b"\xdf\xff\xff\xff\xff", kind="bomb-map"),
    Raw(b"\xdb\xff\xff\xff\xff", kind="bomb-str"),
    Raw(b"\xc6\xff\xff\xff\xff", kind="bomb-bin"),
    wire.nest_raw(20_000),
    wire.nest_raw(20_000, as_map=True),
]
"""Length headers claiming 4 GiB with nothing behind them, and nesting 20000 deep."""


# ------------------------------------------------------------------------------- checking


def check_error(err: DecodeError, direction: str) -> None:
    """The ``DecodeError`` contract (docs/PROTOCOL.md §4)."""
    assert type(err) is DecodeError
    assert err.__cause__ is None
    assert err.direction == direction
    assert err.reason in REASONS
    assert err.path.startswith("$")
    assert err.raw_path.startswith("$")
    assert str(err) == f"invalid {direction} message at {err.path}: {err.problem}"


def _under(found: str, expected: str) -> bool:
    return found == expected or found.startswith((expected + ".", expected + "["))


def check(direction: str, tree: object, frame: bytes | None = None) -> object | None:
    """Decode ``tree`` (written as ``frame``, or minimally) and compare with the oracle."""
    if frame is None:
        frame = pack(tree)
    try:
        expected = ORACLE.expect(direction, tree)
        verdict: Exception | None = None
    except (Rejected, TooDeep) as exc:
        verdict = exc
    decode = DIRECTIONS[direction][1]
    if verdict is not None:
        with pytest.raises(DecodeError) as info:
            decode(frame)
        err = info.value
        check_error(err, direction)
        if isinstance(verdict, TooDeep):
            assert err.reason == "too_deep", err
        elif isinstance(verdict, Rejected):
            assert err.reason in verdict.reasons, f"{err} (expected {verdict})"
            if verdict.paths is not None:
                assert any(
                    _under(found, p) for p in verdict.paths for found in (err.path, err.raw_path)
                ), f"{err} (expected {verdict})"
        return None
    try:
        msg = decode(frame)
    except DecodeError as err:
        raise AssertionError(f"valid frame refused: {err} (frame {frame.hex()[:200]})") from None
    assert verdict is None, f"decoded {msg!r} but expected {verdict}"
    assert isinstance(msg, tuple(members(direction)))
    assert same(to_tree(msg), expected), f"{to_tree(msg)!r} != {expected!r}"
    again = decode(codec.encode(msg))
    assert same(to_tree(again), to_tree(msg))
    return msg


# ----------------------------------------------------------------------------- strategies

_EDGE_INTS = [0, 1, -1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**31) - 1]


def for_type(t: mi.Type) -> st.SearchStrategy[typing.Any]:
    """Valid values of wire type ``t``, edges included (long strings at their bound)."""
    if isinstance(t, mi.IntType):
        return st.integers(-(2**63), 2**64 - 1) | st.sampled_from(_EDGE_INTS)
    if isinstance(t, mi.FloatType):
        return st.floats()
    if isinstance(t, mi.StrType):
        top = t.max_length or 64
        return st.text(max_size=6) | st.sampled_from(["", "x" * top, "é" * top, "🙂" * top])
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=6)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.EnumType):
        return st.sampled_from(list(t.cls))
    if isinstance(t, mi.UnionType):
        return st.one_of([for_type(x) for x in t.types])
    if isinstance(t, mi.ListType):
        return st.lists(for_type(t.item_type), max_size=2)
    if isinstance(t, mi.DictType):
        return st.dictionaries(for_type(t.key_type), for_type(t.value_type), max_size=2)
    if isinstance(t, mi.StructType):
        return for_struct(t.cls)
    raise TypeError(f"no strategy for {t!r}")


def for_struct(cls: type[msgspec.Struct]) -> st.SearchStrategy[typing.Any]:
    """Instances of ``cls`` with every field drawn."""
    info = wire.struct_info(cls)
    return st.builds(cls, **{f.name: for_type(f.type) for f in info.fields})


_cases = st.sampled_from(CASES)


def draw_case(data: st.DataObject) -> tuple[str, list[object]]:
    direction, cls = data.draw(_cases, label="message")
    return direction, to_tree(data.draw(for_struct(cls)))


def widths(data: st.DataObject) -> wire.Width:
    """Header widths drawn per header: peers may write any form the format allows."""
    return lambda kind, shortest: data.draw(st.integers(0, 3))


# ----------------------------------------------------------------------------------- tests


@given(data=st.data())
@budget(60)
def test_any_header_widths_decode_alike(data: st.DataObject) -> None:
    direction, tree = draw_case(data)
    assert check(direction, tree, pack(tree, widths(data))) is not None


@given(data=st.data())
@budget(30, long_share=0.3)
def test_every_byte_prefix_is_malformed(data: st.DataObject) -> None:
    direction, tree = draw_case(data)
    frame = pack(tree, widths(data))
    decode = DIRECTIONS[direction][1]
    for cut in range(len(frame)):
        with pytest.raises(DecodeError) as info:
            decode(frame[:cut])
        check_error(info.value, direction)
        assert (info.value.reason, info.value.path) == ("malformed", "$"), cut
    for extra in (b"\x00", b"\xc1", frame):
        with pytest.raises(DecodeError) as info:
            decode(frame + extra)
        assert info.value.reason == "malformed"


@given(data=st.data())
@budget(30)
def test_every_structural_truncation(data: st.DataObject) -> None:
    """Cut every array (the message, a credit, a batch, an id list) at every length."""
    direction, tree = draw_case(data)
    arrays = [()] + [
        p.steps
        for p in wire.positions(direction, tree)
        if isinstance(wire.get(tree, p.steps), list)
    ]
    for steps in arrays:
        length = len(typing.cast(list[object], wire.get(tree, steps)))
        for keep in range(length):
            check(direction, wire.truncated(tree, steps, keep))


@given(data=st.data())
@budget(20, long_share=0.1)
def test_every_wrong_value_at_every_position(data: st.DataObject) -> None:
    direction, tree = draw_case(data)
    own_tags = [tag_of(c) for c in members(direction)]
    for pos in wire.positions(direction, tree):
        values = HOSTILE + ALL_TAGS if pos.type is None else HOSTILE + own_tags[:2]
        for value in values:
            check(direction, wire.replaced(tree, pos.steps, value))


@given(data=st.data())
@budget(25, long_share=0.3)
def test_bombs_at_every_position_fail_fast(data: st.DataObject) -> None:
    direction, tree = draw_case(data)
    targets = [p.steps for p in wire.positions(direction, tree)]
    started = time.perf_counter()
    for steps in targets:
        for bomb in BOMBS:
            check(direction, wire.replaced(tree, steps, bomb))
    for steps in [(), *targets]:  # as unknown trailing elements of every array
        if isinstance(wire.get(tree, steps), list):
            for bomb in BOMBS:
                check(direction, wire.appended(tree, steps, [bomb]))
    # No allocation, no walk: each bomb costs about what a normal frame costs.
    assert time.perf_counter() - started < 0.5 + 0.01 * len(targets) * len(BOMBS)


_EXTRA = st.sampled_from([*HOSTILE, nest(60), wire.nest_raw(5_000)])


def _oversize(pos: wire.Position, value: object) -> typing.Any:
    """A value one past the bound of ``pos``'s type, if it has one."""
    t = pos.type
    if isinstance(t, mi.UnionType):
        t = wire._unwrap(t)
    bound = getattr(t, "max_length", None)
    if bound is None:
        return None
    if isinstance(t, mi.StrType):
        return "é" * (bound + 1)
    if isinstance(t, mi.BytesType):
        return b"\x00" * (bound + 1)
    if isinstance(t, mi.ListType) and isinstance(value, list):
        return [*value, *([value[0]] * (bound + 1 - len(value)))] if value else [0] * (bound + 1)
    if isinstance(t, mi.DictType) and isinstance(value, dict):
        first = next(iter(value.values()), [] if isinstance(t.value_type, mi.ListType) else "")
        return {f"k{i}": first for i in range(bound + 1)}
    return None


@given(data=st.data())
@budget(100)
def test_random_structural_mutations(data: st.DataObject) -> None:
    """Several mutations on one message: replace, truncate, append, swap tags, blow bounds."""
    direction, tree = draw_case(data)
    current: object = tree
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        if not isinstance(current, list) or not current or not isinstance(current[0], str):
            break
        try:
            ORACLE.expect(direction, current)
            spots = list(wire.positions(direction, current))
        except (Rejected, TooDeep, KeyError):
            spots = []  # no longer a known message: mutate the outer array only
        spot = data.draw(st.sampled_from(spots), label="at") if spots else None
        steps = spot.steps if spot else ()
        target = wire.get(current, steps)
        action = data.draw(
            st.sampled_from(["replace", "truncate", "append", "tag", "oversize"]), label="how"
        )
        if action == "replace" and spot is not None:
            current = wire.replaced(current, steps, data.draw(_EXTRA, label="value"))
        elif action == "truncate" and isinstance(target, list):
            current = wire.truncated(current, steps, data.draw(st.integers(0, len(target))))
        elif action == "append" and isinstance(target, list):
            extra = data.draw(st.lists(_EXTRA, min_size=1, max_size=3), label="extra")
            current = wire.appended(current, steps, extra)
        elif action == "tag":
            current = wire.replaced(current, (0,), data.draw(st.sampled_from(ALL_TAGS)))
        elif action == "oversize" and spot is not None:
            big = _oversize(spot, target)
            if big is not None:
                current = wire.replaced(current, steps, big)
    check(direction, current, pack(current, widths(data)))


def _bounded_positions() -> list[tuple[str, type[m.Msg], tuple[int | str, ...], str, int]]:
    """Every bounded field of every message: (direction, class, steps, path, bound)."""
    out = []
    for direction, cls in CASES:
        tree = to_tree(_maximal(cls))
        for pos in wire.positions(direction, tree):
            t = wire._unwrap(pos.type) if pos.type is not None else None
            bound = getattr(t, "max_length", None)
            if bound is not None:
                out.append((direction, cls, pos.steps, pos.where[0], bound))
    return out


def _maximal(cls: type[msgspec.Struct]) -> typing.Any:
    """An instance with every optional field set and every container holding one item."""
    info = wire.struct_info(cls)
    return cls(**{f.name: _one(f.type) for f in info.fields})


def _one(t: mi.Type) -> object:
    if isinstance(t, mi.UnionType):
        return _one(wire._unwrap(t))
    if isinstance(t, mi.ListType):
        return [_one(t.item_type)]
    if isinstance(t, mi.DictType):
        return {"k": _one(t.value_type)}
    if isinstance(t, mi.StructType):
        return _maximal(t.cls)
    if isinstance(t, mi.EnumType):
        return next(iter(t.cls))
    simple = {mi.IntType: 1, mi.FloatType: 0.5, mi.StrType: "s", mi.BytesType: b"b"}
    return simple.get(type(t), False)


_BOUNDED = _bounded_positions()


@pytest.mark.parametrize(
    ("direction", "cls", "steps", "path", "bound"),
    _BOUNDED,
    ids=[f"{c.__name__}-{d}-{p}" for d, c, _, p, _ in _BOUNDED],
)
def test_each_bound_holds_exactly(
    direction: str, cls: type[m.Msg], steps: tuple[int | str, ...], path: str, bound: int
) -> None:
    """At its bound a field decodes; one past it, the frame is invalid at that field.

    Strings are bounded in characters, not bytes: multi-byte characters at the bound pass.
    """
    tree = to_tree(_maximal(cls))
    value = wire.get(tree, steps)
    at: object
    past: object
    if isinstance(value, str):
        at, past = "🙂" * bound, "🙂" * (bound + 1)
    elif isinstance(value, bytes):
        at, past = b"\xff" * bound, b"\xff" * (bound + 1)
    elif isinstance(value, list):
        at, past = value * bound, value * (bound + 1)
    else:
        assert isinstance(value, dict)
        item = next(iter(value.values()))
        at = {f"k{i}": item for i in range(bound)}
        past = {f"k{i}": item for i in range(bound + 1)}
    assert check(direction, wire.replaced(tree, steps, at)) is not None
    decode = DIRECTIONS[direction][1]
    with pytest.raises(DecodeError) as info:
        decode(pack(wire.replaced(tree, steps, past)))
    check_error(info.value, direction)
    assert (info.value.reason, info.value.path) == ("invalid", path)


_MSGPACK_BYTES = st.sampled_from(
    [
        *(0x00, 0x01, 0x7F, 0x80, 0x81, 0x8F, 0x90, 0x91, 0x92, 0x93, 0x9A, 0x9F, 0xA0, 0xA2),
        *(0xA4, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xCA, 0xCB, 0xCC, 0xCF, 0xD3, 0xD4, 0xD9, 0xDC),
        *(0xDD, 0xDF, 0xE0, 0xFF),
    ]
)


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@given(
    head=st.sampled_from([pack([t])[1:] for t in ALL_TAGS] + [b""]),
    body=st.lists(_MSGPACK_BYTES | st.integers(0, 255), max_size=300).map(bytes),
    count=st.integers(0, 20),
)
@budget(100)
def test_msgpack_shaped_bytes(direction: str, head: bytes, body: bytes, count: int) -> None:
    """Bytes made of msgpack headers after an array header and a real tag."""
    frame = (bytes([0x90 | min(count, 15)]) if count < 16 else b"\xdc\x00" + bytes([count])) + head
    frame += body
    try:
        msg = DIRECTIONS[direction][1](frame)
    except DecodeError as err:
        check_error(err, direction)
    else:
        assert isinstance(msg, tuple(members(direction)))
        assert same(to_tree(DIRECTIONS[direction][1](codec.encode(msg))), to_tree(msg))
