"""Old reads new, new reads old, and no silent drift from the frozen version-1 definitions.

``compat/v1.py`` is what a version-1 peer has compiled in. The evolution rules
(``protocol/__init__.py``, docs/PROTOCOL.md §9) promise that it keeps talking to the current
definitions; these tests hold the promise:

* the structure check compares every message, field by field, with the frozen copy and names
  what changed in an incompatible way;
* the v2-like messages below (a trailing field with a default) show both directions working;
* property tests send the current messages to a v1 decoder, and truncated or extended frames
  to the current decoders.
"""

from __future__ import annotations

import typing

import msgspec
import msgspec.inspect as mi
import pytest
from compat import v1
from hypothesis import given, settings, strategies as st
from wire_strategies import DIRECTIONS, every_message_class, for_struct, members

import protocol
from protocol import codec, messages as m

# -------------------------------------------------------------------- structure vs. v1


def _shape(t: mi.Type) -> str:
    """A type, described by what matters on the wire (nested structs by name only)."""
    if isinstance(t, mi.StructType | mi.EnumType):
        return t.cls.__name__
    if isinstance(t, mi.UnionType):
        return " | ".join(sorted(_shape(x) for x in t.types))
    if isinstance(t, mi.ListType):
        return f"list[{_shape(t.item_type)}]"
    if isinstance(t, mi.DictType):
        return f"dict[{_shape(t.key_type)}, {_shape(t.value_type)}]"
    return repr(t)  # scalars, constraints included (a new bound rejects old values)


def _default(f: mi.Field) -> str:
    if f.required:
        return "required"
    if f.default_factory is not msgspec.NODEFAULT:
        return f"= {f.default_factory()!r}"
    return f"= {f.default!r}"


def _field(f: mi.Field) -> str:
    return f"`{f.name}: {_shape(f.type)} {_default(f)}`"


def incompatibilities(old: type[msgspec.Struct], new: type[msgspec.Struct]) -> list[str]:
    """Every way ``new`` breaks the evolution rules with respect to ``old`` (empty if none)."""
    o, n = mi.type_info(old), mi.type_info(new)
    assert isinstance(o, mi.StructType)
    assert isinstance(n, mi.StructType)
    name = old.__name__
    problems: list[str] = []
    for attr in ("tag_field", "tag", "array_like"):
        if getattr(o, attr) != getattr(n, attr):
            problems.append(f"{name}: {attr} was {getattr(o, attr)!r}, is {getattr(n, attr)!r}")
    if n.forbid_unknown_fields:
        problems.append(f"{name}: forbid_unknown_fields is set (old peers' extras would fail)")
    for i, of in enumerate(o.fields):
        if i >= len(n.fields):
            problems.append(f"{name}: field {i} {_field(of)} was removed")
        elif (of.name, _shape(of.type), _default(of)) != (
            n.fields[i].name,
            _shape(n.fields[i].type),
            _default(n.fields[i]),
        ):
            problems.append(f"{name}: field {i} was {_field(of)}, is {_field(n.fields[i])}")
    for i, nf in enumerate(n.fields[len(o.fields) :], start=len(o.fields)):
        if nf.required:
            problems.append(f"{name}: new field {i} {_field(nf)} needs a default")
    return problems


def _enum_problems(old: type[typing.Any], new: type[typing.Any]) -> list[str]:
    was, now = [e.value for e in old], [e.value for e in new]
    if was != now:
        return [f"{old.__name__}: values were {was}, are {now} (a new value is a type change)"]
    return []


def test_current_definitions_still_match_the_frozen_v1_copy() -> None:
    problems = incompatibilities(v1.Credit, m.Credit)
    problems += _enum_problems(v1.Status, m.Status)
    problems += _enum_problems(v1.BranchMode, m.BranchMode)
    for direction, old_union in v1.UNIONS.items():
        new_by_tag = {c.__struct_config__.tag: c for c in members(direction)}
        for old_cls in typing.get_args(old_union):
            tag = old_cls.__struct_config__.tag
            if tag not in new_by_tag:
                problems.append(f"{direction}: message {old_cls.__name__} (tag {tag!r}) is gone")
            else:
                problems += incompatibilities(old_cls, new_by_tag[tag])
    assert not problems, "incompatible with protocol version 1:\n" + "\n".join(problems)


def test_version_is_still_1_while_v1_is_the_latest_frozen_copy() -> None:
    assert protocol.PROTOCOL_VERSION == v1.PROTOCOL_VERSION


def test_no_wire_struct_forbids_unknown_fields() -> None:
    structs: list[type[msgspec.Struct]] = [m.Credit, *every_message_class()]
    for cls in structs:
        assert not cls.__struct_config__.forbid_unknown_fields, cls.__name__


# The checker itself must catch what it is there to catch.


class _Reordered(m.Msg, frozen=True, kw_only=True, tag="done"):
    seq: int
    credit_id: int
    producer: str
    status: m.Status


class _Retyped(m.Msg, frozen=True, kw_only=True, tag="done"):
    seq: int
    producer: str
    credit_id: str
    status: m.Status


class _AppendedRequired(m.Completion, frozen=True, kw_only=True, tag="done"):
    tokens_out: int


class _Retagged(m.Completion, frozen=True, kw_only=True, tag="completion"):
    pass


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (_Reordered, "Completion: field 1 was `producer: StrType"),
        (_Retyped, "Completion: field 2 was `credit_id: IntType"),
        (_AppendedRequired, "Completion: new field 9 `tokens_out: IntType"),
        (_Retagged, "Completion: tag was 'done', is 'completion'"),
    ],
)
def test_the_structure_check_names_each_incompatible_change(
    new: type[msgspec.Struct], expected: str
) -> None:
    problems = incompatibilities(v1.Completion, new)
    assert any(p.startswith(expected) for p in problems), problems


def test_the_structure_check_accepts_a_defaulted_trailing_field() -> None:
    assert incompatibilities(v1.Completion, CompletionV2) == []
    assert incompatibilities(v1.Credit, CreditV2) == []


# ---------------------------------------------------- v2-like messages: a field appended


class CreditV2(m.Credit, frozen=True, kw_only=True, array_like=True, gc=False):
    """A future ``Credit``: a trailing field with a default (a map, for old peers to skip)."""

    hints: dict[str, list[int]] = msgspec.field(default_factory=dict)


class DispatchV2(m.Msg, frozen=True, kw_only=True, tag="credit"):
    producer: str
    credit: CreditV2


class CompletionV2(m.Completion, frozen=True, kw_only=True, tag="done"):
    """A future ``Completion`` with a trailing ``tokens_out``."""

    tokens_out: int | None = None


_CREDIT_KW: dict[str, typing.Any] = {
    "id": 7,
    "x_correlation_id": "sess-1",
    "turn_index": 1,
    "num_turns": 3,
    "branch_mode": "fork",
    "parent_correlation_id": "sess-0",
    "payload": b"\x01",
}
_COMPLETION_KW: dict[str, typing.Any] = {
    "seq": 5,
    "producer": "bench",
    "credit_id": 7,
    "status": "completed",
    "ttft_s": 0.25,
    "result": b"r",
}
_v2_worker_to_router = msgspec.msgpack.Decoder(CompletionV2 | m.Heartbeat)
_v2_router_to_worker = msgspec.msgpack.Decoder(DispatchV2 | m.Ack)


def test_v1_decoder_reads_v2_bytes_ignoring_the_trailing_field() -> None:
    frame = codec.encode(
        DispatchV2(producer="bench", credit=CreditV2(**_CREDIT_KW, hints={"a": [1, 2]}))
    )
    old = msgspec.msgpack.Decoder(v1.RouterToWorker).decode(frame)
    assert old == v1.Dispatch(producer="bench", credit=v1.Credit(**_CREDIT_KW))

    frame = codec.encode(CompletionV2(**_COMPLETION_KW, tokens_out=128))
    old = msgspec.msgpack.Decoder(v1.WorkerToRouter).decode(frame)
    assert old == v1.Completion(**_COMPLETION_KW)


def test_current_decoder_reads_v2_bytes_ignoring_the_trailing_field() -> None:
    frame = codec.encode(CompletionV2(**_COMPLETION_KW, tokens_out=128))
    assert codec.decode_worker_to_router(frame) == m.Completion(**_COMPLETION_KW)


def test_v2_decoder_reads_v1_bytes_filling_the_default() -> None:
    frame = msgspec.msgpack.encode(v1.Dispatch(producer="bench", credit=v1.Credit(**_CREDIT_KW)))
    new = _v2_router_to_worker.decode(frame)
    assert new == DispatchV2(producer="bench", credit=CreditV2(**_CREDIT_KW))
    assert isinstance(new, DispatchV2)
    assert new.credit.hints == {}

    frame = msgspec.msgpack.encode(v1.Completion(**_COMPLETION_KW))
    completion = _v2_worker_to_router.decode(frame)
    assert isinstance(completion, CompletionV2)
    assert completion.tokens_out is None


def test_current_decoder_reads_frames_that_omit_trailing_defaults() -> None:
    # What an old (or minimal) peer may send: only the required fields.
    frame = msgspec.msgpack.encode(["done", 5, "bench", 7, "completed"])
    assert codec.decode_worker_to_router(frame) == m.Completion(
        seq=5, producer="bench", credit_id=7, status=m.Status.COMPLETED
    )
    frame = msgspec.msgpack.encode(["credit", "bench", [7, "sess-1"]])
    assert codec.decode_router_to_worker(frame) == m.Dispatch(
        producer="bench", credit=m.Credit(id=7, x_correlation_id="sess-1")
    )


# --------------------------------------------------------- every message, property-based


def _prefix_equal(new: object, old: object) -> bool:
    """``old`` equals ``new`` with every array cut to ``old``'s length (extras ignored)."""
    if isinstance(new, list) and isinstance(old, list):
        return len(new) >= len(old) and all(map(_prefix_equal, new, old))
    if isinstance(new, dict) and isinstance(old, dict):
        return new.keys() == old.keys() and all(_prefix_equal(new[k], old[k]) for k in old)
    return new == old


_V1_DECODERS = {d: msgspec.msgpack.Decoder(u) for d, u in v1.UNIONS.items()}
# Messages added after version 1 go only to peers that list their tag (§9 rule 4): a v1 peer
# never reads one, so they are left out here (and gated in the router: test_peer_links).
_CASES = [
    (d, cls)
    for d in DIRECTIONS
    for cls in members(d)
    if cls.__struct_config__.tag not in m.AFTER_V1
]


def test_every_message_newer_than_v1_is_declared_gated() -> None:
    v1_tags = {c.__struct_config__.tag for u in v1.UNIONS.values() for c in typing.get_args(u)}
    new = {c.__struct_config__.tag for c in every_message_class()} - v1_tags
    assert new == set(m.AFTER_V1), "a message added after v1 must be in protocol.AFTER_V1"


_IDS = [f"{cls.__name__}-{d}" for d, cls in _CASES]


@pytest.mark.parametrize(("direction", "cls"), _CASES, ids=_IDS)
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_v1_peer_reads_every_current_message(
    direction: str, cls: type[m.Msg], data: st.DataObject
) -> None:
    msg = data.draw(for_struct(cls))
    frame = codec.encode(msg)
    old = _V1_DECODERS[direction].decode(frame)
    assert type(old).__name__ == cls.__name__
    assert _prefix_equal(msgspec.msgpack.decode(frame), msgspec.msgpack.decode(codec.encode(old)))


_MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)


@pytest.mark.parametrize(("direction", "cls"), _CASES, ids=_IDS)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_current_decoder_ignores_extra_trailing_elements_and_fills_missing_defaults(
    direction: str, cls: type[m.Msg], data: st.DataObject
) -> None:
    decode = DIRECTIONS[direction][1]
    msg = data.draw(for_struct(cls))
    elements = msgspec.msgpack.decode(codec.encode(msg))
    extra = data.draw(st.lists(_MSGPACK_VALUES, min_size=1, max_size=3))
    assert decode(msgspec.msgpack.encode([*elements, *extra])) == msg

    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    required = sum(f.required for f in info.fields)
    keep = data.draw(st.integers(min_value=required, max_value=len(info.fields)))
    short = decode(msgspec.msgpack.encode(elements[: 1 + keep]))
    defaults = {
        f.name: f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
        for f in info.fields[keep:]
    }
    assert short == msgspec.structs.replace(msg, **defaults)
