"""Hypothesis strategies for every wire message, built from the Structs' own type information.

``msgspec.inspect`` describes every field, so the strategies fill *all* fields (``st.builds``
would leave the defaulted ones at their defaults) with values of exactly the wire types.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st

from protocol import codec, messages as m

DIRECTIONS: dict[str, tuple[object, Callable[[bytes], m.Msg]]] = {
    "producer->router": (m.ProducerToRouter, codec.decode_producer_to_router),
    "router->producer": (m.RouterToProducer, codec.decode_router_to_producer),
    "worker->router": (m.WorkerToRouter, codec.decode_worker_to_router),
    "router->worker": (m.RouterToWorker, codec.decode_router_to_worker),
}
"""Each direction's union and decoder, keyed like ``DecodeError.direction``."""


def members(direction: str) -> list[type[m.Msg]]:
    """The message classes of one direction's union."""
    return list(typing.get_args(DIRECTIONS[direction][0]))


def every_message_class() -> list[type[m.Msg]]:
    """Every message class, each once, in union order."""
    seen: list[type[m.Msg]] = []
    for direction in DIRECTIONS:
        seen += [c for c in members(direction) if c not in seen]
    return seen


def directions_of(cls: type[m.Msg]) -> list[str]:
    """Every direction whose union contains ``cls``."""
    return [d for d in DIRECTIONS if cls in members(d)]


_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_FLOAT = st.floats(allow_nan=False)  # NaN != NaN would fail equality, not the codec
_SCALARS: dict[type[mi.Type], st.SearchStrategy[object]] = {
    mi.IntType: _INT,
    mi.StrType: st.text(max_size=12),
    mi.FloatType: _FLOAT,
    mi.BoolType: st.booleans(),
    mi.BytesType: st.binary(max_size=12),
    mi.NoneType: st.none(),
}


def for_type(t: mi.Type) -> st.SearchStrategy[typing.Any]:
    """A strategy for values of the wire type ``t``."""
    if type(t) in _SCALARS:
        return _SCALARS[type(t)]
    if isinstance(t, mi.UnionType):
        return st.one_of([for_type(x) for x in t.types])
    if isinstance(t, mi.EnumType):
        return st.sampled_from(list(t.cls))
    if isinstance(t, mi.ListType):
        return st.lists(for_type(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(for_type(t.key_type), for_type(t.value_type), max_size=2)
    if isinstance(t, mi.StructType):
        return for_struct(t.cls)
    raise TypeError(f"no strategy for {t!r}")


def for_struct(cls: type[msgspec.Struct]) -> st.SearchStrategy[typing.Any]:
    """Instances of ``cls`` with every field drawn (defaulted ones included)."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return st.builds(cls, **{f.name: for_type(f.type) for f in info.fields})


def minimal_value(t: mi.Type) -> typing.Any:
    """The simplest value of the wire type ``t`` (deterministic, no Hypothesis)."""
    simple: dict[type[mi.Type], object] = {
        mi.IntType: 0,
        mi.StrType: "",
        mi.FloatType: 0.0,
        mi.BoolType: False,
        mi.BytesType: b"",
        mi.NoneType: None,
    }
    if type(t) in simple:
        return simple[type(t)]
    if isinstance(t, mi.UnionType):
        return minimal_value(t.types[0])
    if isinstance(t, mi.EnumType):
        return next(iter(t.cls))
    if isinstance(t, mi.ListType):
        return []
    if isinstance(t, mi.DictType):
        return {}
    if isinstance(t, mi.StructType):
        return minimal(t.cls)
    raise TypeError(f"no value for {t!r}")


def minimal(cls: type[msgspec.Struct]) -> typing.Any:
    """An instance of ``cls`` with its required fields at their simplest values."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return cls(**{f.name: minimal_value(f.type) for f in info.fields if f.required})
