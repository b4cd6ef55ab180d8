"""DealerTransport against a real ROUTER on loopback: identity, batches, backlog, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from tests.ports import free_port
from tests.worker_agent.conftest import until
from worker_agent import transport as transport_module
from worker_agent.errors import TransportClosedError, TransportError
from worker_agent.transport import DealerTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(15)]


class Inbox:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.wakeups = 0

    def __call__(self, frames: list[bytes]) -> None:
        self.wakeups += 1
        self.frames.extend(frames)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.term()


def router_socket(
    ctx: zmq.asyncio.Context, port: int | None = None
) -> tuple[zmq.asyncio.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER silently drops past its HWM; tests burst
    try:
        if port is None:
            port = sock.bind_to_random_port("tcp://127.0.0.1")
        else:
            sock.bind(f"tcp://127.0.0.1:{port}")
    except zmq.ZMQError:
        sock.close(linger=0)  # or the context's term() waits for it forever
        raise
    return sock, f"tcp://127.0.0.1:{port}"


async def test_frames_both_ways_with_the_name_as_routing_id(ctx: zmq.asyncio.Context) -> None:
    router, endpoint = router_socket(ctx)
    inbox = Inbox()
    dealer = DealerTransport(endpoint, "gpu-ü", inbox)
    try:
        dealer.send(b"hello")
        identity, frame = await asyncio.wait_for(router.recv_multipart(), 3)
        assert (identity, frame) == ("gpu-ü".encode(), b"hello")
        for i in range(50):
            await router.send_multipart([identity, b"m%d" % i])
        await until(lambda: len(inbox.frames) == 50)
        assert inbox.frames == [b"m%d" % i for i in range(50)]
        assert inbox.wakeups < 50  # drained in batches, not one callback per frame
        assert dealer.frames_received == 50
    finally:
        dealer.close()
        router.close(linger=0)


async def test_replies_sent_from_the_callback_do_not_stall_reading(
    ctx: zmq.asyncio.Context,
) -> None:
    router, endpoint = router_socket(ctx)
    inbox = Inbox()
    dealer: DealerTransport | None = None

    def echo(frames: list[bytes]) -> None:
        inbox(frames)
        assert dealer is not None
        for frame in frames:
            dealer.send(b"re:" + frame)

    dealer = DealerTransport(endpoint, "w", echo)
    try:
        dealer.send(b"hi")
        identity, _ = await asyncio.wait_for(router.recv_multipart(), 3)
        for round_trip in range(200):  # ping-pong: each frame waits for the previous echo
            await router.send_multipart([identity, b"%d" % round_trip])
            _, echoed = await asyncio.wait_for(router.recv_multipart(), 3)
            assert echoed == b"re:%d" % round_trip
    finally:
        dealer.close()
        router.close(linger=0)


async def test_many_frames_are_handed_over_in_fair_chunks(ctx: zmq.asyncio.Context) -> None:
    router, endpoint = router_socket(ctx)
    inbox = Inbox()
    dealer = DealerTransport(endpoint, "w", inbox)
    try:
        dealer.send(b"hi")
        identity, _ = await asyncio.wait_for(router.recv_multipart(), 3)
        count = transport_module.MAX_FRAMES_PER_WAKEUP + 500
        for i in range(count):
            await router.send_multipart([identity, b"%d" % i])
        await until(lambda: len(inbox.frames) == count, within_s=5)
        assert inbox.frames[-1] == b"%d" % (count - 1)
        assert inbox.wakeups >= 2
    finally:
        dealer.close()
        router.close(linger=0)


async def test_frames_wait_in_the_backlog_until_a_router_is_there(
    ctx: zmq.asyncio.Context,
) -> None:
    port = free_port()
    dealer = DealerTransport(f"tcp://127.0.0.1:{port}", "w", Inbox())
    router = None
    try:
        for frame in (b"1", b"2", b"3"):
            dealer.send(frame)  # IMMEDIATE: no connection, so straight into the backlog
        assert dealer.backlog == 3
        router, _ = router_socket(ctx, port)
        received = [(await asyncio.wait_for(router.recv_multipart(), 5))[1] for _ in range(3)]
        assert received == [b"1", b"2", b"3"]
        assert dealer.backlog == 0
    finally:
        dealer.close()
        if router is not None:
            router.close(linger=0)


async def test_a_full_backlog_drops_the_newest_and_counts_it() -> None:
    dealer = DealerTransport(f"tcp://127.0.0.1:{free_port()}", "w", Inbox(), backlog_max=2)
    try:
        for frame in (b"1", b"2", b"3"):
            dealer.send(frame)
        assert dealer.backlog == 2
        assert dealer.frames_dropped == 1
        assert dealer.discard_backlog() == 2
        assert dealer.backlog == 0
    finally:
        dealer.close()


async def test_close_is_idempotent_and_send_after_close_fails() -> None:
    dealer = DealerTransport(f"tcp://127.0.0.1:{free_port()}", "w", Inbox())
    dealer.send(b"never delivered")
    dealer.close()
    dealer.close()
    assert dealer.closed
    assert "closed" in repr(dealer)
    with pytest.raises(TransportClosedError):
        dealer.send(b"x")


@pytest.mark.parametrize("name", ["", "x" * 256, "\x00w"])
async def test_invalid_routing_ids_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="worker name"):
        DealerTransport("tcp://127.0.0.1:1", name, Inbox())


async def test_a_bad_endpoint_is_a_transport_error() -> None:
    with pytest.raises(TransportError, match="cannot connect") as info:
        DealerTransport("nonsense://here", "w", Inbox())
    assert info.value.retriable
    assert info.value.endpoint == "nonsense://here"
