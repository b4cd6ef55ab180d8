"""``ConnectionWatch`` on real sockets: a first connection is reported as such, and only a
connection that closed and came back is reported as a reconnection."""

from __future__ import annotations

import asyncio

import pytest
import zmq

from credit_common.zmqmon import ConnectionWatch

pytestmark = pytest.mark.timeout(30)


async def bind_when_free(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Bind ``endpoint`` once the closed socket's listener has let it go: libzmq closes a
    socket's listener in its I/O thread after ``close()`` returns, so an immediate rebind of
    the same port can fail with EADDRINUSE (it did in CI)."""
    async with asyncio.timeout(10):
        while True:
            try:
                sock.bind(endpoint)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE:
                    raise
                await asyncio.sleep(0.01)


async def test_first_connection_then_a_reconnection_after_the_router_came_back() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RECONNECT_IVL, 50)
    endpoint = f"tcp://127.0.0.1:{port}"
    events: asyncio.Queue[bool] = asyncio.Queue()
    watch = ConnectionWatch(dealer, endpoint, events.put_nowait, None)
    watch.attach(asyncio.get_running_loop())
    try:
        dealer.connect(endpoint)
        assert await asyncio.wait_for(events.get(), 10) is False  # the first connection
        router.close(linger=0)  # the router goes away and a new one binds the same port
        router = ctx.socket(zmq.ROUTER)
        await bind_when_free(router, endpoint)
        assert await asyncio.wait_for(events.get(), 10) is True
        assert events.empty()
    finally:
        watch.close()
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_a_hang_up_is_worded_for_the_side_that_saw_it() -> None:
    import errno

    from credit_common.zmqmon import handshake_failure

    event = int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    peer = handshake_failure(event, errno.EPIPE)
    router = handshake_failure(event, errno.EPIPE, at_router=True)
    assert peer.startswith("the router closed the connection")
    assert router.startswith("the peer closed the connection")
    assert "router's key" in router
