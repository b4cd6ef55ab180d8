"""A hand-written msgpack writer and a reference model of the protocol's decoding rules.

Two tools for the decoder fuzz, independent of msgspec so that they can disagree with it:

* ``pack(value, choose)`` writes a Python tree (``None``, ``bool``, ``int``, ``float``, ``str``,
  ``bytes``, ``list``, ``dict``, and the markers ``Raw``, ``Ext``, ``F32``, ``BadUtf8``) as
  msgpack, letting the caller pick every header's width: peers in other languages may write
  ``uint 32`` for ``1`` or ``str 8`` for a tag (docs/PROTOCOL.md §3 allows any int and str
  format), and the decoder must read them all alike.
* ``Oracle`` decides from the message definitions (``msgspec.inspect``) and the rules of
  docs/PROTOCOL.md §3-§4.1 alone whether a tree is a valid message of a direction; if so, what
  it must decode to (defaults filled, unknown trailing elements dropped, ints in float fields
  made floats); if not, which field is at fault and with which ``DecodeError.reason``.

Trees are what ``msgspec.to_builtins(msg, builtin_types=(bytes,))`` gives for a message:
``[tag, field_1, …]`` with nested credits as untagged lists.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import typing
from collections.abc import Callable, Iterator
from typing import Final

import msgspec
import msgspec.inspect as mi

from protocol import codec, messages as m

# ------------------------------------------------------------------------------- the writer


@dataclasses.dataclass(frozen=True)
class Raw:
    """Bytes written verbatim (a hand-made header, a length bomb)."""

    data: bytes
    kind: str = "raw"
    """What the oracle should take it for: a value kind, or ``raw`` (unknown)."""


@dataclasses.dataclass(frozen=True)
class Ext:
    """A msgpack extension value (the protocol uses none)."""

    code: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class F32:
    """A float written as ``float 32`` (readers must accept it; its value is exact)."""

    value: float


@dataclasses.dataclass(frozen=True)
class BadUtf8:
    """A msgpack str whose bytes are not UTF-8."""

    data: bytes


Width = Callable[[str, int], int]
"""``choose(kind, minimal) -> header width index``: 0 for the shortest form, more for wider."""


def minimal(kind: str, shortest: int) -> int:
    """Always the shortest encoding (what msgspec writes)."""
    return shortest


def pack(value: object, choose: Width = minimal) -> bytes:
    """Encode ``value`` as msgpack, with header widths picked by ``choose``."""
    out = bytearray()
    _pack(value, choose, out)
    return bytes(out)


def _pack(value: object, choose: Width, out: bytearray) -> None:  # noqa: C901 - one branch per type
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, int):
        _pack_int(value, choose, out)
    elif isinstance(value, float):
        out += b"\xcb" + struct.pack(">d", value)
    elif isinstance(value, F32):
        out += b"\xca" + struct.pack(">f", value.value)
    elif isinstance(value, str):
        _header(out, len(data := value.encode()), choose, "str", (0xA0, 31), 0xD9)
        out += data
    elif isinstance(value, BadUtf8):
        _header(out, len(value.data), choose, "str", (0xA0, 31), 0xD9)
        out += value.data
    elif isinstance(value, bytes | bytearray):
        _header(out, len(value), choose, "bin", None, 0xC4)
        out += value
    elif isinstance(value, list | tuple):
        _header(out, len(value), choose, "array", (0x90, 15), None)
        for item in value:
            _pack(item, choose, out)
    elif isinstance(value, dict):
        _header(out, len(value), choose, "map", (0x80, 15), None)
        for k, v in value.items():
            _pack(k, choose, out)
            _pack(v, choose, out)
    elif isinstance(value, Ext):
        n = len(value.data)
        fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
        if n in fixed:
            out.append(fixed[n])
        else:
            out += b"\xc7" + struct.pack(">B", n)
        out += struct.pack(">b", value.code) + value.data
    elif isinstance(value, Raw):
        out += value.data
    else:
        raise TypeError(f"cannot pack {value!r}")


def _header(
    out: bytearray,
    n: int,
    choose: Width,
    kind: str,
    fix: tuple[int, int] | None,
    first8: int | None,
) -> None:
    """A length header: fix form, then 8 (str/bin only), 16 and 32 bits."""
    forms: list[tuple[int, bytes]] = []  # (capacity, header)
    if fix is not None and n <= fix[1]:
        forms.append((fix[1], bytes([fix[0] | n])))
    if first8 is not None and n <= 0xFF:
        forms.append((0xFF, bytes([first8, n])))
    base16 = {"str": 0xDA, "bin": 0xC5, "array": 0xDC, "map": 0xDE}[kind]
    if n <= 0xFFFF:
        forms.append((0xFFFF, bytes([base16]) + struct.pack(">H", n)))
    forms.append((0xFFFFFFFF, bytes([base16 + 1]) + struct.pack(">I", n)))
    out += forms[min(choose(kind, 0), len(forms) - 1)][1]


def _pack_int(v: int, choose: Width, out: bytearray) -> None:
    forms: list[bytes] = []
    if 0 <= v <= 0x7F:
        forms.append(bytes([v]))
    elif -32 <= v < 0:
        forms.append(struct.pack(">b", v))
    for lo, hi, code, fmt in (
        (0, 0xFF, 0xCC, ">B"),
        (-(2**7), 2**7 - 1, 0xD0, ">b"),
        (0, 0xFFFF, 0xCD, ">H"),
        (-(2**15), 2**15 - 1, 0xD1, ">h"),
        (0, 0xFFFFFFFF, 0xCE, ">I"),
        (-(2**31), 2**31 - 1, 0xD2, ">i"),
        (0, 2**64 - 1, 0xCF, ">Q"),
        (-(2**63), 2**63 - 1, 0xD3, ">q"),
    ):
        if lo <= v <= hi:
            forms.append(bytes([code]) + struct.pack(fmt, v))
    if not forms:
        raise OverflowError(f"{v} does not fit in msgpack")
    out += forms[min(choose("int", 0), len(forms) - 1)]


def to_tree(msg: object) -> list[typing.Any]:
    """A message as a tree of builtins (``[tag, fields…]``, bytes kept as bytes)."""
    tree = msgspec.to_builtins(msg, builtin_types=(bytes,))
    assert isinstance(tree, list)
    return tree


# ------------------------------------------------------------------------------- the oracle

DIRECTIONS: dict[str, tuple[object, Callable[[bytes], object]]] = {
    "producer->router": (m.ProducerToRouter, codec.decode_producer_to_router),
    "router->producer": (m.RouterToProducer, codec.decode_router_to_producer),
    "worker->router": (m.WorkerToRouter, codec.decode_worker_to_router),
    "router->worker": (m.RouterToWorker, codec.decode_router_to_worker),
}
"""Each direction's union and decoder, keyed like ``DecodeError.direction``."""


def members(direction: str) -> list[type[m.Msg]]:
    """The message classes of one direction."""
    return list(typing.get_args(DIRECTIONS[direction][0]))


def tag_of(cls: type[msgspec.Struct]) -> str:
    """The wire tag of a message class."""
    return str(cls.__struct_config__.tag)


class Rejected(Exception):
    """The oracle's verdict on an invalid tree: where the decoder must fail, and why.

    ``paths`` holds the named path and msgspec's positional one (the codec falls back to the
    positional path when it cannot name the field, e.g. in a frame truncated further on);
    ``None`` means any path.
    """

    def __init__(self, where: tuple[str, str] | None, *reasons: str) -> None:
        super().__init__(f"{'/'.join(reasons)} at {where}")
        self.paths = None if where is None else frozenset(where)
        self.reasons = frozenset(reasons)


class TooDeep(Exception):
    """A skipped element nests deeper than any decoder should follow."""


DEPTH_LIMIT = 1_000
"""Nesting the oracle calls too deep in skipped elements (msgspec gives up well before 5000
and follows well past 50; the fuzz only generates depths outside that band)."""

ROOT: Final = ("$", "$")
Where = tuple[str, str]
"""A place as (named path, positional path)."""


def struct_info(cls: type[msgspec.Struct]) -> mi.StructType:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info


def default_of(f: mi.Field) -> object:
    if f.default is not msgspec.NODEFAULT:
        return f.default
    assert f.default_factory is not msgspec.NODEFAULT
    return f.default_factory()


def _field(where: Where, name: str, index: int) -> Where:
    return (f"{where[0]}.{name}", f"{where[1]}[{index}]")


def _item(where: Where, step: str) -> Where:
    return (f"{where[0]}[{step}]", f"{where[1]}[{step}]")


def _unwrap(t: mi.Type) -> mi.Type:
    """``X | None`` -> ``X`` (the protocol has no other unions inside messages)."""
    if isinstance(t, mi.UnionType):
        others = [x for x in t.types if not isinstance(x, mi.NoneType)]
        assert len(others) == 1, t
        return others[0]
    return t


class Oracle:
    """The protocol's decoding rules, from the definitions alone (see module docstring)."""

    def expect(self, direction: str, tree: object) -> object:
        """The builtins tree the decoder must return, or raise ``Rejected``/``TooDeep``."""
        classes = {tag_of(c): c for c in members(direction)}
        if isinstance(tree, Raw):
            raise Rejected(None, "malformed", "invalid")
        if not isinstance(tree, list) or not tree:
            raise Rejected(ROOT, "invalid")
        tag = tree[0]
        where = ("$.op", "$[0]")
        if isinstance(tag, BadUtf8):
            raise Rejected(ROOT, "malformed")
        if isinstance(tag, Raw):
            raise Rejected(None, "malformed", "invalid")
        if not isinstance(tag, str):
            raise Rejected(where, "invalid")
        if tag not in classes:
            raise Rejected(where, "unknown_tag")
        return self._struct(struct_info(classes[tag]), tree, ROOT, top=True)

    def _struct(
        self, info: mi.StructType, value: object, where: Where, *, top: bool = False
    ) -> list[object]:
        if not isinstance(value, list):
            raise Rejected(where, "invalid")
        tagged = info.tag_field is not None
        offset = 1 if tagged else 0
        required = sum(1 for f in info.fields if f.required)
        # A nested struct's length is checked before its tag (the top level's tag picks
        # the type, so it comes first there).
        if len(value) < offset + required:
            raise Rejected(where, "invalid")
        out: list[object] = []
        if tagged:
            if not top:
                self._tag(info, value[0], _item(where, "0"))
            out.append(info.tag)
        for i, f in enumerate(info.fields):
            if offset + i < len(value):
                sub = _field(where, f.name, offset + i)
                out.append(self.value(f.type, value[offset + i], sub))
            else:
                out.append(default_of(f))
        for extra in value[offset + len(info.fields) :]:
            _skip(extra, 1)
        return out

    @staticmethod
    def _tag(info: mi.StructType, tag: object, where: Where) -> None:
        where = (where[0][: -len("[0]")] + ".op", where[1])
        if isinstance(tag, BadUtf8):
            raise Rejected(ROOT, "malformed")
        if isinstance(tag, Raw):
            raise Rejected(None, "malformed", "invalid")
        if not isinstance(tag, str):
            raise Rejected(where, "invalid")
        if tag != info.tag:
            raise Rejected(where, "unknown_tag")

    def value(self, t: mi.Type, v: object, where: Where) -> object:  # noqa: C901 - one branch per type
        """Check ``v`` against the wire type ``t``; return its decoded builtin form."""
        if (
            v is None
            and isinstance(t, mi.UnionType)
            and any(isinstance(x, mi.NoneType) for x in t.types)
        ):
            return None
        t = _unwrap(t)
        if isinstance(v, BadUtf8):
            # A str is read (and its UTF-8 checked) only where a str may stand.
            if isinstance(t, mi.StrType | mi.EnumType):
                raise Rejected(ROOT, "malformed")
            raise Rejected(where, "invalid")
        if isinstance(v, Raw):
            if v.kind == "deep":  # no protocol type nests: it fails at its first level
                raise Rejected(where, "invalid")
            if v.kind in ("bomb-map", "bomb-array") and not isinstance(t, mi.StructType):
                # Checked against the type or the container's bound at the header.
                raise Rejected(where, "invalid")
            # A str/bin header's bytes are read before their type is checked: truncated.
            raise Rejected(None, "malformed", "invalid")
        if isinstance(t, mi.IntType):
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        elif isinstance(t, mi.FloatType):
            if isinstance(v, int) and not isinstance(v, bool):
                return float(v)
            if isinstance(v, float):
                return v
            if isinstance(v, F32):
                return v.value
        elif isinstance(t, mi.BoolType):
            if isinstance(v, bool):
                return v
        elif isinstance(t, mi.StrType):
            if isinstance(v, str):
                if t.max_length is not None and len(v) > t.max_length:
                    raise Rejected(where, "invalid")
                return v
        elif isinstance(t, mi.BytesType):
            if isinstance(v, bytes):
                if t.max_length is not None and len(v) > t.max_length:
                    raise Rejected(where, "invalid")
                return v
        elif isinstance(t, mi.EnumType):
            if isinstance(v, str):
                if v not in {e.value for e in t.cls}:
                    raise Rejected(where, "invalid")
                return v
        elif isinstance(t, mi.ListType):
            if isinstance(v, list):
                if t.max_length is not None and len(v) > t.max_length:
                    raise Rejected(where, "invalid")
                return [self.value(t.item_type, x, _item(where, str(i))) for i, x in enumerate(v)]
        elif isinstance(t, mi.DictType):
            if isinstance(v, dict):
                if t.max_length is not None and len(v) > t.max_length:
                    raise Rejected(where, "invalid")
                out = {}
                for k, x in v.items():
                    key = self.value(t.key_type, k, where)
                    out[key] = self.value(t.value_type, x, _item(where, "..."))
                return out
        elif isinstance(t, mi.StructType):
            return self._struct(t, v, where)
        elif not isinstance(t, mi.NoneType):  # pragma: no cover - a new wire type needs a rule
            raise TypeError(f"no rule for {t!r}")
        raise Rejected(where, "invalid")


def _skip(v: object, depth: int) -> None:
    """An unknown trailing element is skipped unread, however odd, unless it nests too deep."""
    if depth > DEPTH_LIMIT:
        raise TooDeep
    if isinstance(v, Raw):
        if v.kind == "deep":
            raise TooDeep
        raise Rejected(None, "malformed", "invalid")
    if isinstance(v, list):
        for x in v:
            _skip(x, depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            _skip(k, depth + 1)
            _skip(x, depth + 1)


def same(a: object, b: object) -> bool:
    """Deep equality where NaN equals NaN (the fuzz writes NaNs on purpose)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------ positions inside a tree


@dataclasses.dataclass(frozen=True)
class Position:
    """One place in a message tree where a value sits, with the type the protocol gives it."""

    steps: tuple[int | str, ...]
    """List indices and dict keys from the root to the value."""
    where: Where
    """The (named, positional) paths a ``DecodeError`` gives for it (``$.credits[0].id``)."""
    type: mi.Type | None
    """Its wire type, or ``None`` for a tag."""


def positions(direction: str, tree: list[object]) -> Iterator[Position]:
    """Every field, list item, map value and tag of a valid tree, outermost first."""
    classes = {tag_of(c): c for c in members(direction)}
    yield from _struct_positions(struct_info(classes[str(tree[0])]), tree, (), ROOT)


def _struct_positions(
    info: mi.StructType, value: list[object], steps: tuple[int | str, ...], where: Where
) -> Iterator[Position]:
    offset = 0
    if info.tag_field is not None:
        yield Position((*steps, 0), (f"{where[0]}.op", f"{where[1]}[0]"), None)
        offset = 1
    for i, f in enumerate(info.fields):
        if offset + i < len(value):
            sub = _field(where, f.name, offset + i)
            yield from _type_positions(f.type, value[offset + i], (*steps, offset + i), sub)


def _type_positions(
    t: mi.Type, v: object, steps: tuple[int | str, ...], where: Where
) -> Iterator[Position]:
    yield Position(steps, where, t)
    if v is None:
        return
    t = _unwrap(t)
    if isinstance(t, mi.StructType) and isinstance(v, list):
        yield from _struct_positions(t, v, steps, where)
    elif isinstance(t, mi.ListType) and isinstance(v, list):
        for i, x in enumerate(v):
            yield from _type_positions(t.item_type, x, (*steps, i), _item(where, str(i)))
    elif isinstance(t, mi.DictType) and isinstance(v, dict):
        for k, x in v.items():
            yield from _type_positions(t.value_type, x, (*steps, k), _item(where, "..."))


def get(tree: object, steps: tuple[int | str, ...]) -> object:
    for s in steps:
        tree = tree[s]  # type: ignore[index]
    return tree


def replaced(tree: object, steps: tuple[int | str, ...], new: object) -> object:
    """A copy of ``tree`` with the value at ``steps`` replaced (the original is untouched)."""
    if not steps:
        return new
    head, rest = steps[0], steps[1:]
    if isinstance(tree, list):
        copy: list[object] = list(tree)
        assert isinstance(head, int)
        copy[head] = replaced(copy[head], rest, new)
        return copy
    assert isinstance(tree, dict)
    d = dict(tree)
    d[head] = replaced(d[head], rest, new)
    return d


def truncated(tree: object, steps: tuple[int | str, ...], keep: int) -> object:
    """A copy of ``tree`` whose list at ``steps`` keeps only its first ``keep`` elements."""
    target = get(tree, steps)
    assert isinstance(target, list)
    return replaced(tree, steps, target[:keep])


def appended(tree: object, steps: tuple[int | str, ...], extra: list[object]) -> object:
    """A copy of ``tree`` whose list at ``steps`` has ``extra`` appended."""
    target = get(tree, steps)
    assert isinstance(target, list)
    return replaced(tree, steps, [*target, *extra])


def nest(depth: int, inner: object = None, *, as_map: bool = False) -> object:
    """``depth`` nested one-element arrays (or maps) around ``inner``: a depth bomb."""
    v = inner
    for _ in range(depth):
        v = {"k": v} if as_map else [v]
    return v


def nest_raw(depth: int, *, as_map: bool = False) -> Raw:
    """The same bomb as bytes (no Python recursion to build or write it)."""
    head = b"\x81\xa1k" if as_map else b"\x91"
    return Raw(head * depth + b"\xc0", kind="deep")
