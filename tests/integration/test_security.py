"""CURVE on the worker endpoint: who may connect, who may be whom, what the wire shows.

The router runs in the test's loop with real sockets (and, for SIGHUP, as a real process);
workers are raw DEALERs with or without keys, so every frame is under the test's control.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq

from protocol import PROTOCOL_VERSION
from protocol.codec import decode_router_to_worker, encode
from protocol.messages import Credit, Dispatch, DispatchBatch, Hello, Refusal, Status, Welcome
from router_service.client import RouterClient
from router_service.core.router import RouterCore
from router_service.security import Allowlist, generate, load_public, load_secret
from router_service.service import RouterService
from tests.integration.test_faults import Cluster, Proxy
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate(tmp_path / "router", ["router"])
    generate(tmp_path / "allowed", ["gpu-1", "gpu-2"])
    generate(tmp_path / "strangers", ["mallory"])
    (tmp_path / "allowed" / "gpu-1.key_secret").rename(tmp_path / "gpu-1.key_secret")
    (tmp_path / "allowed" / "gpu-2.key_secret").rename(tmp_path / "gpu-2.key_secret")
    return tmp_path


@contextlib.asynccontextmanager
async def curve_router(
    keys: Path, worker_endpoint: str = "tcp://127.0.0.1:0"
) -> AsyncIterator[RouterService]:
    core = RouterCore(
        protocol_version=PROTOCOL_VERSION,
        router_incarnation="sec",
        heartbeat_interval_s=0.2,
        lost_after_s=2.0,
    )
    service = RouterService(
        core,
        worker_endpoint=worker_endpoint,
        producer_endpoint="ipc://" + str(keys / "p.ipc"),
        heartbeat_interval_s=0.2,
        drain_deadline_s=0.5,
        curve=load_secret(keys / "router" / "router.key_secret"),
        allowlist=Allowlist(keys / "allowed"),
    )
    task = asyncio.create_task(service.serve())
    await asyncio.wait_for(service.ready.wait(), 5)
    try:
        yield service
    finally:
        service.request_exit(force=True)
        await asyncio.wait_for(task, 5)


class Peer:
    """A DEALER with chosen keys and routing id."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, routing_id: str, keys: Path, key_file: Path | None
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
        if key_file is not None:
            public, secret = load_secret(key_file)
            self.sock.curve_serverkey = load_public(keys / "router" / "router.key")
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.sock.connect(endpoint)
        self.name = routing_id
        PEERS.append(self)

    def hello(self) -> None:
        self.sock.send(
            encode(
                Hello(
                    name=self.name, incarnation="x", protocol_version=PROTOCOL_VERSION, capacity=4
                )
            )
        )

    async def received(self, within_s: float = 1.0) -> list[object]:
        got = []
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                got.append(decode_router_to_worker(self.sock.recv(zmq.NOBLOCK)))
            except zmq.Again:
                await asyncio.sleep(0.01)
        return got


PEERS: list[Peer] = []


@pytest.fixture
def ctx() -> zmq.Context:
    c = zmq.Context()
    yield c
    for peer in PEERS:
        peer.sock.close(0)
    PEERS.clear()
    c.destroy(linger=0)


async def test_listed_key_joins_and_unlisted_or_plaintext_are_refused(keys: Path, ctx) -> None:
    async with curve_router(keys) as router:
        good = Peer(ctx, router.worker_endpoint, "gpu-1", keys, keys / "gpu-1.key_secret")
        stranger = Peer(
            ctx, router.worker_endpoint, "mallory", keys, keys / "strangers" / "mallory.key_secret"
        )
        plain = Peer(ctx, router.worker_endpoint, "plain", keys, None)
        for peer in (good, stranger, plain):
            peer.hello()
        assert any(isinstance(m, Welcome) for m in await good.received())
        assert await stranger.received(0.3) == []
        assert await plain.received(0.3) == []
        assert set(router.core.workers) == {"gpu-1"}
        assert router.auth_failures >= 1  # the unlisted handshake, seen by the monitor


async def test_a_key_cannot_take_another_workers_name(keys: Path, ctx) -> None:
    async with curve_router(keys) as router:
        thief = Peer(ctx, router.worker_endpoint, "gpu-2", keys, keys / "gpu-1.key_secret")
        thief.hello()  # gpu-1's key claiming to be gpu-2
        # Its frame is dropped (never a Welcome); it is told why, so that it stops.
        (refusal,) = await thief.received(0.5)
        assert isinstance(refusal, Refusal)
        assert refusal.code == "unauthorized"
        assert "may not speak as 'gpu-2'" in refusal.reason
        assert "gpu-2" not in router.core.workers
        assert router.auth_failures >= 1
        # gpu-2's key is bound to "gpu-2", not "gpu-2b": refused the same way, never welcomed.
        other = Peer(ctx, router.worker_endpoint, "gpu-2b", keys, keys / "gpu-2.key_secret")
        other.hello()
        assert [(type(m), m.code) for m in await other.received(0.3)] == [(Refusal, "unauthorized")]
        assert "gpu-2b" not in router.core.workers


async def test_traffic_is_unreadable_on_the_wire(keys: Path, ctx) -> None:
    router_port = free_port()
    proxy = Proxy(router_port)  # every byte between worker and router passes through here
    captured = bytearray()
    original = proxy._accept

    async def recording(reader, writer):  # tap the stream toward the worker
        class Tap:
            def __init__(self, inner):
                self.inner = inner

            async def read(self, n):
                data = await self.inner.read(n)
                captured.extend(data)
                return data

        await original(Tap(reader), writer)

    proxy._accept = recording  # type: ignore[method-assign]
    await proxy.start()
    async with curve_router(keys, f"tcp://127.0.0.1:{router_port}") as router:
        worker = Peer(
            ctx, f"tcp://127.0.0.1:{proxy.port}", "gpu-1", keys, keys / "gpu-1.key_secret"
        )
        worker.hello()
        assert any(isinstance(m, Welcome) for m in await worker.received(0.5))
        secret_prompt = b"the-secret-prompt-of-session-42"
        async with RouterClient(router.producer_endpoint, context=ctx) as client:
            await client.submit(Credit(id=1, x_correlation_id="session-42", payload=secret_prompt))
            got = await worker.received(0.5)
        credits = [
            c
            for m in got
            if isinstance(m, DispatchBatch | Dispatch)
            for c in (m.credits if isinstance(m, DispatchBatch) else [m.credit])
        ]
        assert [c.payload for c in credits] == [secret_prompt]  # the worker reads it...
    await proxy.stop()
    assert len(captured) > 0
    assert b"hello" not in captured  # not even the message tags...
    assert b"gpu-1" not in captured  # ...nor the worker's name
    assert secret_prompt not in captured  # ...nobody on the wire does
    assert b"session-42" not in captured


def test_plaintext_off_loopback_needs_insecure() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "credit_router",
            "serve",
            "--workers",
            "tcp://0.0.0.0:0",
            "--http-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "needs CURVE keys" in done.stderr


async def test_sighup_cuts_off_a_removed_key(keys: Path, tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "run")
    (tmp_path / "run").mkdir()
    try:
        producers = f"ipc://{tmp_path}/producers.ipc"  # producers stay local: no key needed
        cluster.start_router(
            "--curve-secret-key-file",
            str(keys / "router" / "router.key_secret"),
            "--curve-allowed-keys",
            str(keys / "allowed"),
            "--producers",
            producers,
        )
        for name in ("gpu-1", "gpu-2"):
            cluster.start_worker(
                name,
                "--curve-server-key", str(keys / "router" / "router.key"),
                "--curve-key", str(keys / f"{name}.key_secret"),
            )  # fmt: skip
        await cluster.workers_active("gpu-1", "gpu-2")
        (keys / "allowed" / "gpu-1.key").unlink()
        assert cluster.router is not None
        cluster.router.send_signal(signal.SIGHUP)
        doc = await cluster.until(
            lambda d: {w["name"] for w in d["workers"]} == {"gpu-2"}, what="gpu-1 cut off"
        )
        assert doc["workers"][0]["state"] == "active"
        # gpu-1 keeps knocking; it stays out, and work goes to gpu-2 only.
        await asyncio.sleep(1.0)
        assert {w["name"] for w in cluster.status()["workers"]} == {"gpu-2"}
        async with RouterClient(producers, name="sec") as client:
            outcome = await client.run(Credit(id=1, x_correlation_id="s"))
        assert (outcome.status, outcome.worker) == (Status.COMPLETED, "gpu-2")
    finally:
        cluster.stop()
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
