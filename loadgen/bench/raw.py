"""The raw baseline for ``bench e2e``: the same hops, the same batching, the same codec, no routing.

``python -m loadgen.bench.raw router --producers EP --workers EP --workers-expected K``
forwards each ``SubmitBatch`` frame from the producer to the next worker (round robin) as one
``DispatchBatch``; ``... raw worker --router EP --name N`` answers each with a
``CompletionBatch``; the router turns that into one ``OutcomeBatch`` for the producer. Both
sides decode and encode every message with msgspec, as the real router and worker do, and both
block in ``zmq.Poller`` (the cheapest way pyzmq can wait). What it does not do is everything
credit-router is for: no ledger, no sticky table, no load index, no liveness, no acks.
"""

from __future__ import annotations

import argparse
import sys

import zmq

from protocol.codec import decode_producer_to_router, decode_worker_to_router, encode
from protocol.messages import (
    CompletionBatch,
    DispatchBatch,
    Hello,
    Outcome,
    OutcomeBatch,
    ProducerHello,
    ProducerWelcome,
    Status,
    SubmitBatch,
)

__all__ = ["main"]

NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)


def _router(producers: str, workers: str, expected: int) -> None:
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.ROUTER)
    for sock in (front, back):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
    front.bind(producers)
    back.bind(workers)
    names: list[bytes] = []
    while len(names) < expected:
        ident = back.recv()
        if isinstance(decode_worker_to_router(back.recv()), Hello):
            names.append(ident)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    client = b""
    turn = 0
    while True:
        for sock, _ in poller.poll():
            while True:
                try:
                    ident = sock.recv(NOBLOCK)
                    frame = sock.recv(NOBLOCK)
                except zmq.Again:
                    break
                if sock is front:
                    msg = decode_producer_to_router(frame)
                    if isinstance(msg, SubmitBatch):
                        out = encode(DispatchBatch(producer=client.decode(), credits=msg.credits))
                        back.send(names[turn % len(names)], SNDMORE)
                        back.send(out)
                        turn += 1
                    elif isinstance(msg, ProducerHello):
                        client = ident
                        welcome = ProducerWelcome(
                            router_incarnation="raw",
                            protocol_version=msg.protocol_version,
                            heartbeat_interval_s=1.0,
                            max_batch=4096,
                        )
                        front.send(ident, SNDMORE)
                        front.send(encode(welcome))
                else:
                    done = decode_worker_to_router(frame)
                    if isinstance(done, CompletionBatch):
                        outcomes = [
                            Outcome(credit_id=c.credit_id, status=c.status, worker="raw")
                            for c in done.completions
                        ]
                        front.send(client, SNDMORE)
                        front.send(encode(OutcomeBatch(outcomes=outcomes)))


def _worker(router: str, name: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, name.encode())
    sock.connect(router)
    sock.send(encode(Hello(name=name, incarnation="raw", protocol_version=1, capacity=1 << 20)))
    seq = 0
    from protocol.codec import decode_router_to_worker
    from protocol.messages import Completion

    while True:
        msg = decode_router_to_worker(sock.recv())
        if isinstance(msg, DispatchBatch):
            completions = []
            for credit in msg.credits:
                seq += 1
                completions.append(
                    Completion(
                        seq=seq,
                        producer=msg.producer,
                        credit_id=credit.id,
                        status=Status.COMPLETED,
                    )
                )
            sock.send(encode(CompletionBatch(completions=completions)))


def main(argv: list[str] | None = None) -> int:
    """Run one side of the raw baseline until killed."""
    parser = argparse.ArgumentParser(prog="loadgen.bench.raw")
    sub = parser.add_subparsers(dest="role", required=True)
    r = sub.add_parser("router")
    r.add_argument("--producers", required=True)
    r.add_argument("--workers", required=True)
    r.add_argument("--workers-expected", type=int, required=True)
    w = sub.add_parser("worker")
    w.add_argument("--router", required=True)
    w.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    if args.role == "router":
        _router(args.producers, args.workers, args.workers_expected)
    else:
        _worker(args.router, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
