"""Encoders and decoders, built once per process (msgspec's first performance rule).

One decoder per direction decodes the tagged union of that direction. Decoding failures become
``protocol.errors.DecodeError`` here and nowhere else: msgspec's errors (with their positional
``$[1][0][0]`` paths translated into field names such as ``$.credits[0].id``), and the two
errors msgspec lets through: ``RecursionError`` for input nested deeper than it follows, and
``UnicodeDecodeError`` for a msgpack str that is not UTF-8.

Frames: a ZeroMQ message is ``[payload]`` from a DEALER (the ROUTER prepends the peer identity)
and ``[identity, payload]`` from the ROUTER; ``payload`` is one msgpack-encoded message.
``docs/PROTOCOL.md`` describes the bytes for implementers in other languages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Final

import msgspec
import msgspec.inspect as mi

from protocol.errors import DecodeError
from protocol.messages import (
    ProducerToRouter,
    RouterToProducer,
    RouterToWorker,
    WorkerToRouter,
)

__all__ = [
    "decode_producer_to_router",
    "decode_router_to_producer",
    "decode_router_to_worker",
    "decode_worker_to_router",
    "encode",
    "encode_into",
]

_encoder: Final = msgspec.msgpack.Encoder()

encode = _encoder.encode
"""Encode any message (or list of messages) to msgpack bytes."""

encode_into = _encoder.encode_into
"""Encode into a reused ``bytearray`` (avoids an allocation per frame)."""

_p2r: Final[msgspec.msgpack.Decoder[ProducerToRouter]] = msgspec.msgpack.Decoder(ProducerToRouter)
_r2p: Final[msgspec.msgpack.Decoder[RouterToProducer]] = msgspec.msgpack.Decoder(RouterToProducer)
_w2r: Final[msgspec.msgpack.Decoder[WorkerToRouter]] = msgspec.msgpack.Decoder(WorkerToRouter)
_r2w: Final[msgspec.msgpack.Decoder[RouterToWorker]] = msgspec.msgpack.Decoder(RouterToWorker)


def decode_producer_to_router(frame: bytes) -> ProducerToRouter:
    """Decode a frame a producer sent. Raises ``DecodeError``."""
    try:
        return _p2r.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise _error("producer->router", exc, frame, _P2R_TAGS) from None


def decode_router_to_producer(frame: bytes) -> RouterToProducer:
    """Decode a frame the router sent a producer. Raises ``DecodeError``."""
    try:
        return _r2p.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise _error("router->producer", exc, frame, _R2P_TAGS) from None


def decode_worker_to_router(frame: bytes) -> WorkerToRouter:
    """Decode a frame a worker sent. Raises ``DecodeError``."""
    try:
        return _w2r.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise _error("worker->router", exc, frame, _W2R_TAGS) from None


def decode_router_to_worker(frame: bytes) -> RouterToWorker:
    """Decode a frame the router sent a worker. Raises ``DecodeError``."""
    try:
        return _r2w.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise _error("router->worker", exc, frame, _R2W_TAGS) from None


# ----------------------------------------------------------------- error path (cold, not hot)


class _Head(msgspec.Struct, array_like=True):
    """The tag of any message; the other elements are skipped."""

    op: str


_head: Final = msgspec.msgpack.Decoder(_Head)
_STEP: Final = re.compile(r"\[(\d+|\.\.\.)\]")


def _by_tag(union: object) -> Mapping[str, mi.StructType]:
    info = mi.type_info(union)
    assert isinstance(info, mi.UnionType)
    return {str(t.tag): t for t in info.types if isinstance(t, mi.StructType)}


_P2R_TAGS: Final = _by_tag(ProducerToRouter)
_R2P_TAGS: Final = _by_tag(RouterToProducer)
_W2R_TAGS: Final = _by_tag(WorkerToRouter)
_R2W_TAGS: Final = _by_tag(RouterToWorker)


def _error(
    direction: str, exc: Exception, frame: bytes, tags: Mapping[str, mi.StructType]
) -> DecodeError:
    if isinstance(exc, RecursionError):
        return DecodeError(direction, "$", "nested deeper than the decoder follows", "too_deep")
    if isinstance(exc, UnicodeDecodeError):  # msgspec lets it through, without a path
        return DecodeError(direction, "$", f"a str is not valid UTF-8 ({exc.reason})", "malformed")
    return DecodeError.from_msgspec(direction, exc, _namer(frame, tags))


def _namer(frame: bytes, tags: Mapping[str, mi.StructType]) -> Callable[[str], str]:
    def name_path(raw_path: str) -> str:
        steps = _STEP.findall(raw_path, 1)
        if not steps or "".join(f"[{s}]" for s in steps) != raw_path[1:]:
            return raw_path
        if steps == ["0"]:
            return "$.op"
        try:
            node: mi.Type | None = tags.get(_head.decode(frame).op)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            return raw_path
        return "$" + "".join(_named_steps(node, steps))

    return name_path


def _named_steps(node: mi.Type | None, steps: list[str]) -> list[str]:
    """Walk the positional ``steps`` through the type tree, naming struct fields."""
    out: list[str] = []
    for step in steps:
        if isinstance(node, mi.UnionType):  # an optional field: follow its one non-nil type
            others = [t for t in node.types if not isinstance(t, mi.NoneType)]
            node = others[0] if len(others) == 1 else None
        if isinstance(node, mi.StructType) and step != "...":
            index = int(step)
            if node.tag_field is not None:
                if index == 0:
                    out.append(f".{node.tag_field}")
                    node = None
                    continue
                index -= 1
            if index < len(node.fields):
                out.append(f".{node.fields[index].name}")
                node = node.fields[index].type
                continue
        out.append(f"[{step}]")
        if isinstance(node, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
            node = node.item_type
        elif isinstance(node, mi.DictType):
            node = node.value_type
        else:
            node = None
    return out
