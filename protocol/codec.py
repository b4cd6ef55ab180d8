"""Encoders and decoders, built once per process (msgspec's first performance rule).

One decoder per direction decodes the tagged union of that direction. Decoding failures become
``protocol.errors.DecodeError`` here and nowhere else.

Frames: a ZeroMQ message is ``[payload]`` from a DEALER (the ROUTER prepends the peer identity)
and ``[identity, payload]`` from the ROUTER; ``payload`` is one msgpack-encoded message.
"""

from __future__ import annotations

from typing import Final

import msgspec

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
    except msgspec.DecodeError as exc:
        raise DecodeError.from_msgspec("producer->router", exc) from None


def decode_router_to_producer(frame: bytes) -> RouterToProducer:
    """Decode a frame the router sent a producer. Raises ``DecodeError``."""
    try:
        return _r2p.decode(frame)
    except msgspec.DecodeError as exc:
        raise DecodeError.from_msgspec("router->producer", exc) from None


def decode_worker_to_router(frame: bytes) -> WorkerToRouter:
    """Decode a frame a worker sent. Raises ``DecodeError``."""
    try:
        return _w2r.decode(frame)
    except msgspec.DecodeError as exc:
        raise DecodeError.from_msgspec("worker->router", exc) from None


def decode_router_to_worker(frame: bytes) -> RouterToWorker:
    """Decode a frame the router sent a worker. Raises ``DecodeError``."""
    try:
        return _r2w.decode(frame)
    except msgspec.DecodeError as exc:
        raise DecodeError.from_msgspec("router->worker", exc) from None
