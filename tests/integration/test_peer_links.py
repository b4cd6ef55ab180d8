"""Issue 9 ("Peer links") with real processes: a router (``credit-router serve``), worker agents
(``python -m worker_agent``) and ``RouterClient`` producers in the test. Routers are killed
(-9), stopped (SIGTERM) and brought back within a second; workers share a name, freeze and
wake up, carry keys the router does not accept, or die with credits in flight. Every test
names the scenario of the issue's "Why" list it covers and asserts the behaviour "What to
build" asks for: one outcome per credit, fencing with a one-line reason, a bounded exit, the
router naming peers by address.

Timing: beats every 0.2 s unless a test needs the silence rule out of the way (then the beat is
long, so that anything faster than three beats was the protocol's explicit rules at work).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from protocol import PROTOCOL_VERSION, Credit, Outcome, Status
from protocol.codec import decode_router_to_producer, decode_router_to_worker, encode
from protocol.messages import (
    Dispatch,
    DispatchBatch,
    Hello,
    OutcomeBatch,
    ProducerHello,
    ProducerWelcome,
    Refusal,
    SubmitBatch,
    Welcome,
)
from router_service.client import RouterClient
from router_service.security import generate
from tests.integration.test_faults import Cluster, payload
from tests.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class Procs(Cluster):
    """``Cluster`` whose workers may share a name (each process gets its own log)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.routers: list[subprocess.Popen[bytes]] = []

    def start_router(self, *extra: str) -> subprocess.Popen[bytes]:
        proc = super().start_router(*extra)
        self.routers.append(proc)
        return proc

    def start_worker(
        self, name: str, *extra: str, capacity: int = 4, log: str | None = None
    ) -> subprocess.Popen[bytes]:
        if "--http-port" not in extra:
            self.worker_http[log or name] = port = free_port()
            extra = (*extra, "--http-port", str(port))
        cmd = [
            sys.executable, "-m", "worker_agent", "--router", self.worker_endpoint,
            "--name", name, "--capacity", str(capacity), "--executor", "sim",
            "--drain-deadline-s", "10", "--log-level", "DEBUG", *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=self._log(log or name), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.workers.setdefault(name, proc)
        return proc

    def stop(self) -> None:
        for proc in [*self.procs, *self.routers]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
        for proc in [*self.procs, *self.routers]:
            proc.wait(timeout=10)
        self.workers.clear()
        self.router = None
        super().stop()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    async def worker_states(self) -> dict[str, tuple[str, str]]:
        """name -> (state, incarnation) as the router's /status shows them."""
        doc = await asyncio.to_thread(self.status)
        return {w["name"]: (w["state"], w["incarnation"]) for w in doc["workers"]}


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    c = Procs(tmp_path)
    yield c
    c.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(c.logs())  # the processes' own logs, in the failure report


class CountingClient(RouterClient):
    """A ``RouterClient`` that counts every outcome the router sends, per credit id.

    ``rejected: stale_incarnation`` bounces are counted apart: they say "this frame never ran,
    send it again", and the client does so transparently.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.received: Counter[int] = Counter()
        self.bounced: Counter[int] = Counter()
        self.first: dict[int, Outcome] = {}

    def _on_outcome(self, outcome: Outcome) -> None:
        cid = outcome.credit_id
        if outcome.status is Status.REJECTED and outcome.reason == "stale_incarnation":
            self.bounced[cid] += 1
        else:
            self.received[cid] += 1
            self.first.setdefault(cid, outcome)
        super()._on_outcome(outcome)


@contextlib.asynccontextmanager
async def counting(endpoint: str, **kw: Any) -> AsyncIterator[CountingClient]:
    client = CountingClient(endpoint, name="links", **kw)
    await client.connect(timeout_s=20)
    try:
        yield client
    finally:
        await client.close()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "ERROR" in line]


def assert_one_line_reason(text: str, *needles: str) -> str:
    """The process said why it exits in one ERROR line holding every needle (case-insensitive),
    and printed no traceback."""
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in error_lines(text) if "refused" in line.lower() or "giv" in line]
    assert lines, f"no ERROR line saying why: {text[-3000:]}"
    hits = [line for line in lines if all(n.lower() in line.lower() for n in needles)]
    assert hits, f"no ERROR line naming {needles}: {lines}"
    return hits[0]


async def exited(proc: subprocess.Popen[bytes], within_s: float) -> int:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {proc.args!r} still running after {within_s} s")


def credits(ids: range, tokens: int, prefix: str = "s") -> list[Credit]:
    return [Credit(id=i, x_correlation_id=f"{prefix}{i}", payload=payload(tokens)) for i in ids]


# ----------------------------------------------------------------------------- scenario 1


async def test_worker_joining_while_credits_wait_is_welcomed_before_any_dispatch(
    procs: Procs,
) -> None:
    """Scenario 1: a router started before its workers, credits submitted first. The worker
    that joins gets its Welcome before any Dispatch and runs them all (no ``lost: orphaned``)."""
    procs.start_router()
    async with counting(procs.producer_endpoint) as client:
        futures = await client.submit_many(credits(range(16), 5))
        await procs.until(lambda d: d["totals"]["queued"] == 16, what="16 queued, no worker")
        procs.start_worker("late", capacity=8)
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 30)
    assert [(o.status, o.reason, o.worker) for o in outcomes] == [
        (Status.COMPLETED, "", "late")
    ] * 16
    assert set(client.received.values()) == {1}
    log = procs.log("late")
    assert "before any Welcome" not in log, "the agent got a Dispatch before its Welcome"
    assert "<<- Dispatch" in log, "the worker log shows what it received"
    assert log.index("<<- Welcome(") < log.index("<<- Dispatch"), "a Dispatch came first"
    doc = procs.status()
    assert doc["totals"]["outcomes"]["completed"] == 16
    assert doc["totals"]["outcomes"]["lost"] == 0


# ----------------------------------------------------------------------------- scenario 2


async def test_router_kill9_and_back_gives_every_credit_exactly_one_outcome(
    procs: Procs,
) -> None:
    """Scenario 2 (kill -9): the router dies with credits queued and in flight and is back
    within a second. In-flight credits complete through ``Recovered``; the ones the dead router
    only queued end once (``lost: router_restarted`` after the client's grace); credits
    submitted while it was down are delivered to the new router and complete. No credit gets
    two outcomes, none is left without one."""
    procs.start_router()
    procs.start_worker("a", capacity=2)
    procs.start_worker("b", capacity=2)
    await procs.workers_active("a", "b")
    async with counting(
        procs.producer_endpoint, recovery_grace_s=2.5, heartbeat_interval_s=0.2
    ) as client:
        # 2 s each: the kill comes well before any of them completes (a kill in the instant
        # between an outcome and its ack is PROTOCOL.md §6.1's window, not this test's subject).
        running = await client.submit_many(credits(range(4), 500))
        queued = await client.submit_many(credits(range(10, 16), 200))
        await procs.until(
            lambda d: d["totals"]["in_flight"] == 4 and d["totals"]["queued"] == 6,
            what="4 in flight, 6 queued",
        )
        await procs.until_held(4)  # (a dispatch still in the dying router's socket never ran)
        assert procs.router is not None
        procs.router.kill()
        procs.router.wait()
        # 3 s each: they outlast the recovery grace, which must not give them up (they were
        # never sent to the dead router).
        during = await client.submit_many(credits(range(20, 24), 750, prefix="d"))
        await asyncio.sleep(0.5)
        procs.start_router()
        done = await asyncio.wait_for(asyncio.gather(*running, *queued, *during), 30)
        by_id = {o.credit_id: o for o in done}
        for cid in range(4):  # ran on a worker: recovered, completed, once
            assert by_id[cid].status is Status.COMPLETED, by_id[cid]
        for cid in range(10, 16):  # only the dead router knew them
            assert (by_id[cid].status, by_id[cid].reason) in {
                (Status.LOST, "router_restarted"),
                (Status.COMPLETED, ""),
            }, by_id[cid]
        for cid in range(20, 24):  # held while no router was there, then delivered
            assert by_id[cid].status is Status.COMPLETED, by_id[cid]
        await procs.workers_active("a", "b")
        await asyncio.sleep(1.0)  # any late, second outcome would arrive now
        assert client.outstanding == 0
        assert client.unmatched_outcomes == 0
        twice = {cid: n for cid, n in client.received.items() if n > 1}
        assert twice == {}, f"credits with several outcomes: {twice}"
        gave_up = {cid for cid in range(10, 16) if by_id[cid].reason == "router_restarted"}
        assert not gave_up & set(client.received), "an outcome came for a credit given up"


async def test_router_sigterm_and_back_never_completes_a_credit_it_ended(procs: Procs) -> None:
    """Scenario 2 (SIGTERM, back within ~1 s): credits past the drain deadline end
    ``lost: router_shutdown`` (queued ones ``rejected: router_shutdown``); their workers were
    told to forget them, so none of them is completed later through the new router. Every
    credit has exactly one outcome."""
    procs.start_router("--drain-deadline-s", "0.5")
    procs.start_worker("a", capacity=2)
    procs.start_worker("b", capacity=2)
    await procs.workers_active("a", "b")
    async with counting(procs.producer_endpoint, heartbeat_interval_s=0.2) as client:
        running = await client.submit_many(credits(range(4), 500))  # 2 s: past the deadline
        queued = await client.submit_many(credits(range(10, 14), 500))
        await procs.until(
            lambda d: d["totals"]["in_flight"] == 4 and d["totals"]["queued"] == 4,
            what="4 in flight, 4 queued",
        )
        assert procs.router is not None
        old = procs.router
        old.send_signal(signal.SIGTERM)
        assert await exited(old, 10) == 0
        procs.start_router("--drain-deadline-s", "0.5")
        done = await asyncio.wait_for(asyncio.gather(*running, *queued), 15)
        by_id = {o.credit_id: o for o in done}
        ended = {cid for cid, o in by_id.items() if o.status is not Status.COMPLETED}
        for cid in range(4):
            assert (by_id[cid].status, by_id[cid].reason) == (Status.LOST, "router_shutdown")
        for cid in range(10, 14):
            assert (by_id[cid].status, by_id[cid].reason) == (Status.REJECTED, "router_shutdown")
        # The workers rejoin the new router; the credits they were told to forget must not
        # come back as Recovered completions (they would reach us as second outcomes).
        await procs.workers_active("a", "b")
        await asyncio.sleep(2.0)  # the 2 s credits would have finished and been recovered
        assert client.unmatched_outcomes == 0
        twice = {cid: n for cid, n in client.received.items() if n > 1}
        assert twice == {}, f"credits with several outcomes: {twice}"
        assert ended == set(range(4)) | set(range(10, 14))
        # And the new router works.
        after = await asyncio.wait_for(
            client.run(Credit(id=100, x_correlation_id="after", payload=payload(2))), 10
        )
        assert after.status is Status.COMPLETED
    doc = procs.status()
    assert doc["totals"]["outcomes"]["completed"] == 1, "the new router forwarded old credits"


# ----------------------------------------------------------------------------- scenario 3


async def test_router_back_within_three_heartbeats_peers_say_hello_again(procs: Procs) -> None:
    """Scenario 3: the router restarts faster than three heartbeats, so the silence rule never
    fires. The client and a real worker agent notice by the explicit rules (``hello_required``
    / ``unknown_worker``, or the connection coming back), say hello again, and credits flow:
    no submit hangs."""
    beat = 3.0  # three beats = 9 s: anything faster was not the silence rule
    procs.start_router("--heartbeat-interval-s", str(beat), "--lost-after-s", "20")
    procs.start_worker("w", capacity=4)
    await procs.workers_active("w")
    async with counting(procs.producer_endpoint, heartbeat_interval_s=beat) as client:
        first = await asyncio.wait_for(client.run(credits(range(1), 2)[0]), 10)
        assert first.status is Status.COMPLETED
        old_incarnation = client.router_incarnation
        # (Let the first credit's ack leave too: a router killed in the instant between an
        # outcome and its ack has the worker resend it — PROTOCOL.md §6.1 — not this test.)
        await asyncio.sleep(0.2)
        assert procs.router is not None
        procs.router.kill()
        procs.router.wait()
        procs.start_router("--heartbeat-interval-s", str(beat), "--lost-after-s", "20")
        await procs.until(lambda d: True, what="the new router's /status")
        back_at = time.monotonic()
        # Submitted right after the restart: must not vanish.
        futures = await client.submit_many(credits(range(10, 18), 2))
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 2 * beat)
        took = time.monotonic() - back_at
        print(f"scenario 3: credits flowed again {took:.2f} s after the router was back")
        assert {o.status for o in outcomes} == {Status.COMPLETED}
        assert {o.worker for o in outcomes} == {"w"}
        # Both peers came back well within three beats of the new router.
        assert took < 3 * beat, "rejoined only by the silence rule"
        assert client.router_incarnation != old_incarnation
        assert client.session.rehellos >= 1
        assert client.unmatched_outcomes == 0
    log = procs.log("w")
    assert "router restarted" in log


# ----------------------------------------------------------------------------- scenario 6


async def test_second_worker_with_the_same_name_is_refused_name_in_use(procs: Procs) -> None:
    """Scenario 6: two worker processes with the same ``--name``. The second is refused
    ``name_in_use``: it exits 2 with one line naming the conflict; the first keeps running and
    keeps its name (no flips, no lost credits); the router logs a WARNING naming both peers'
    addresses."""
    procs.start_router()
    first = procs.start_worker("twin", log="twin-1")
    await procs.workers_active("twin")
    incarnation = (await procs.worker_states())["twin"][1]
    async with counting(procs.producer_endpoint) as client:
        futures = await client.submit_many(credits(range(4), 500))  # 2 s each
        await procs.until(lambda d: d["totals"]["in_flight"] == 4, what="4 in flight")
        second = procs.start_worker("twin", log="twin-2")
        assert await exited(second, 15) == 2
        line = assert_one_line_reason(procs.log("twin-2"), "twin")
        assert re.search(r"in.use|conflict|already|held by", line, re.IGNORECASE), line
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 15)
        assert {(o.status, o.worker) for o in outcomes} == {(Status.COMPLETED, "twin")}
        more = await asyncio.wait_for(
            asyncio.gather(*await client.submit_many(credits(range(10, 18), 2))), 10
        )
        assert {o.status for o in more} == {Status.COMPLETED}
    assert first.poll() is None, "the first holder keeps running"
    assert (await procs.worker_states())["twin"] == ("active", incarnation)
    doc = procs.status()
    assert doc["totals"]["outcomes"]["lost"] == 0
    warnings = [
        line
        for line in procs.log("router").splitlines()
        if "WARNING" in line and "twin" in line and ("conflict" in line or "in use" in line)
    ]
    assert warnings, procs.log("router")[-3000:]
    addresses = set(re.findall(r"127\.0\.0\.1:\d+", warnings[0]))
    assert len(addresses) == 2, f"the WARNING names both peers' addresses: {warnings[0]}"


# ----------------------------------------------------------------------------- scenario 7


async def test_frozen_worker_replaced_then_resumed_is_fenced_superseded(procs: Procs) -> None:
    """Scenario 7: a worker frozen (SIGSTOP) is replaced by a new incarnation of its name; on
    SIGCONT the old one is refused ``superseded`` and exits non-zero with a one-line reason. The
    name never flips back: credits run on the new incarnation and none is lost after the one
    replacement."""
    procs.start_router("--lost-after-s", "30")  # only the new incarnation can end the old one
    old = procs.start_worker("phoenix", log="phoenix-old")
    await procs.workers_active("phoenix")
    old_incarnation = (await procs.worker_states())["phoenix"][1]
    async with counting(procs.producer_endpoint) as client:
        held = await client.submit_many(credits(range(2), 500))
        await procs.until(lambda d: d["totals"]["in_flight"] == 2, what="2 in flight")
        os.kill(old.pid, signal.SIGSTOP)
        await procs.until(
            lambda d: {w["name"]: w["state"] for w in d["workers"]}.get("phoenix") == "suspect",
            what="the frozen worker suspect",
        )
        new = procs.start_worker("phoenix", log="phoenix-new")
        doc = await procs.until(
            lambda d: any(
                w["name"] == "phoenix" and w["incarnation"] != old_incarnation
                and w["state"] == "active"
                for w in d["workers"]
            ),
            within_s=15,
            what="the new incarnation active",
        )  # fmt: skip
        new_incarnation = next(w["incarnation"] for w in doc["workers"] if w["name"] == "phoenix")
        replaced = await asyncio.wait_for(asyncio.gather(*held), 10)
        assert [(o.status, o.reason) for o in replaced] == [(Status.LOST, "worker_lost")] * 2
        lost_before = procs.status()["totals"]["outcomes"]["lost"]
        running = await client.submit_many(credits(range(10, 14), 250))  # 1 s each
        await procs.until(lambda d: d["totals"]["in_flight"] == 4, what="4 in flight on new")
        os.kill(old.pid, signal.SIGCONT)
        code = await exited(old, 10)
        assert code != 0
        assert_one_line_reason(procs.log("phoenix-old"), "supersed")
        outcomes = await asyncio.wait_for(asyncio.gather(*running), 15)
        assert {(o.status, o.worker) for o in outcomes} == {(Status.COMPLETED, "phoenix")}
        assert set(client.received.values()) == {1}
    assert new.poll() is None
    assert (await procs.worker_states())["phoenix"] == ("active", new_incarnation)
    assert procs.status()["totals"]["outcomes"]["lost"] == lost_before, "no loss by a flip"
    assert "superseded" in procs.log("router")


# ----------------------------------------------------------------------------- scenario 8


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    root = tmp_path / "keys"
    generate(root / "router", ["router"])
    generate(root / "allowed", ["gpu-1"])
    generate(root / "strangers", ["mallory"])
    return root


def start_curve_router(procs: Procs, keys: Path, *extra: str) -> None:
    """The router under CURVE, listing the keys in ``keys/allowed``."""
    procs.start_router(
        "--curve-secret-key-file", str(keys / "router" / "router.key_secret"),
        "--curve-allowed-keys", str(keys / "allowed"), *extra,
    )  # fmt: skip


def start_curve_worker(procs: Procs, keys: Path, name: str, key: Path) -> subprocess.Popen[bytes]:
    """A worker named ``name`` speaking CURVE with the key pair file ``key``."""
    server = str(keys / "router" / "router.key")
    return procs.start_worker(name, "--curve-server-key", server, "--curve-key", str(key))


async def test_unaccepted_key_and_plaintext_worker_exit_with_a_clear_reason(
    procs: Procs, keys: Path
) -> None:
    """Scenario 8: a worker with a CURVE key the router does not list, and a plaintext worker
    against a CURVE router, each exit non-zero within a bounded time with a message in words;
    the router's log names each peer's address and the reason in words (no ``b''``, no bare
    libzmq code). A listed worker still joins and runs credits."""
    producers = f"ipc://{procs.tmp}/producers.ipc"
    start_curve_router(procs, keys, "--producers", producers)
    start_curve_worker(procs, keys, "gpu-1", keys / "allowed" / "gpu-1.key_secret")
    await procs.workers_active("gpu-1")
    started = time.monotonic()
    stranger = start_curve_worker(procs, keys, "mallory", keys / "strangers" / "mallory.key_secret")
    plain = procs.start_worker("plain")
    codes = await asyncio.gather(exited(stranger, 30), exited(plain, 30))
    print(f"scenario 8: both refused workers exited within {time.monotonic() - started:.1f} s")
    assert codes[0] != 0, codes
    assert codes[1] != 0, codes
    line = assert_one_line_reason(procs.log("mallory"), "allowlist")
    assert "b''" not in line
    line = assert_one_line_reason(procs.log("plain"), "plaintext")
    assert "b''" not in line
    router_log = procs.log("router")
    failures = [line for line in router_log.splitlines() if "authentication failure" in line]
    assert failures, router_log[-3000:]
    assert all("b''" not in line for line in failures), failures
    assert any(re.search(r"peer=127\.0\.0\.1:\d+", line) for line in failures), failures
    assert any("allowlist" in line or "key" in line for line in failures), failures
    assert any("plaintext" in line or "mechanism" in line for line in failures), failures
    async with RouterClient(producers, name="sec") as client:
        outcome = await asyncio.wait_for(client.run(Credit(id=1, x_correlation_id="s")), 10)
    assert (outcome.status, outcome.worker) == (Status.COMPLETED, "gpu-1")
    assert {w["name"] for w in procs.status()["workers"]} == {"gpu-1"}


async def test_a_listed_key_under_another_name_or_a_revoked_key_exits_with_the_reason(
    procs: Procs, keys: Path
) -> None:
    """Keys that pass the handshake but may not speak as their routing id: a listed key used
    under another worker's name, and a key the router stopped listing (SIGHUP reload). The
    router drops their frames; each worker is told why (``Refusal(code="unauthorized")``) and
    exits 2 with the reason in one line, instead of saying hello into silence forever."""
    generate(keys / "allowed", ["gpu-2"])
    start_curve_router(procs, keys)
    start_curve_worker(procs, keys, "gpu-2", keys / "allowed" / "gpu-2.key_secret")
    await procs.workers_active("gpu-2")
    impostor = start_curve_worker(procs, keys, "gpu-3", keys / "allowed" / "gpu-1.key_secret")
    assert await exited(impostor, 20) == 2
    assert_one_line_reason(procs.log("gpu-3"), "not authorized", "may not speak as")
    # Revoke gpu-2's key: the router cuts it off, and it learns why.
    (keys / "allowed" / "gpu-2.key").unlink()
    assert procs.router is not None
    procs.router.send_signal(signal.SIGHUP)
    assert await exited(procs.workers["gpu-2"], 20) == 2
    assert_one_line_reason(procs.log("gpu-2"), "not authorized", "no longer allowed")
    assert procs.router.poll() is None


async def test_credits_sent_to_a_draining_router_that_dies_end_at_once(procs: Procs) -> None:
    """A router drains (SIGTERM, a long credit keeps it draining) and says so: a credit sent to
    it is rejected ``router_draining``. Credits the producer sends it after that can never run
    there; if the router dies before answering them (here: frozen, then killed), they end
    ``rejected: router_draining`` as soon as the producer sees the router gone, not after the
    recovery grace (60 s here). The long credit, which did run, still completes once through
    the next router."""
    procs.start_router()
    procs.start_worker("w", capacity=4)
    await procs.workers_active("w")
    async with counting(
        procs.producer_endpoint, recovery_grace_s=60.0, heartbeat_interval_s=0.2
    ) as client:
        (long,) = await client.submit_many(credits(range(1), 750))  # 3 s
        await procs.until_held(1)
        assert procs.router is not None
        procs.router.send_signal(signal.SIGTERM)
        await procs.until(lambda d: d["router"]["draining"], what="draining")
        first = await asyncio.wait_for(client.run(credits(range(10, 11), 1)[0]), 10)
        assert (first.status, first.reason) == (Status.REJECTED, "router_draining")
        os.kill(procs.router.pid, signal.SIGSTOP)  # it will never read what comes next
        after = await client.submit_many(credits(range(20, 23), 1))
        await asyncio.sleep(0.1)
        procs.router.kill()
        procs.router.wait()
        ended = await asyncio.wait_for(asyncio.gather(*after), 10)
        assert {(o.status, o.reason) for o in ended} == {(Status.REJECTED, "router_draining")}
        procs.start_router()
        done = await asyncio.wait_for(long, 20)
        assert done.status is Status.COMPLETED
        assert max(client.received.values()) == 1


async def test_a_stopping_router_answers_what_producers_send_until_they_are_quiet(
    procs: Procs,
) -> None:
    """A producer written from PROTOCOL.md keeps submitting while the router stops (SIGTERM,
    nothing in flight, so it would close at once). Everything it sends before the router has
    heard nothing for a moment is answered ``rejected: router_draining``: the router does not
    close its socket on frames it never read."""
    procs.start_router()
    await procs.until(lambda d: d["router"]["ready"], what="ready")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(procs.producer_endpoint)
    try:
        sock.send(encode(ProducerHello(producer="raw", protocol_version=PROTOCOL_VERSION)))
        assert sock.poll(10_000)
        assert isinstance(decode_router_to_producer(sock.recv()), ProducerWelcome)
        assert procs.router is not None
        procs.router.send_signal(signal.SIGTERM)
        rejected: set[int] = set()
        cid = 0
        while not rejected:  # submit until the first refusal says the router drains
            sock.send(encode(SubmitBatch(credits=[Credit(id=cid, x_correlation_id=f"s{cid}")])))
            cid += 1
            if sock.poll(20):
                rejected |= _rejected_ids(decode_router_to_producer(sock.recv()))
            assert cid < 1000, "the router never said it drains"
        # A moment later (a producer has its own work between sends): the router, with nothing
        # in flight, has left its main loop by now; it has not heard from us for less than
        # its quiet period (0.25 s), so it is still reading.
        await asyncio.sleep(0.15)
        burst = list(range(cid, cid + 5))
        for i in burst:
            sock.send(encode(SubmitBatch(credits=[Credit(id=i, x_correlation_id=f"s{i}")])))
        deadline = time.monotonic() + 5
        while not set(burst) <= rejected and time.monotonic() < deadline:
            if sock.poll(100):
                rejected |= _rejected_ids(decode_router_to_producer(sock.recv()))
        assert set(burst) <= rejected, f"unanswered: {sorted(set(burst) - rejected)}"
        assert await exited(procs.router, 10) == 0
    finally:
        sock.close(0)
        ctx.term()


def _rejected_ids(msg: object) -> set[int]:
    outcomes = msg.outcomes if isinstance(msg, OutcomeBatch) else [msg]
    return {
        o.credit_id
        for o in outcomes
        if isinstance(o, Outcome) and (o.status, o.reason) == (Status.REJECTED, "router_draining")
    }


async def test_a_credit_still_running_when_the_router_restarts_is_adopted_not_given_up(
    procs: Procs,
) -> None:
    """A credit runs longer than the producer's recovery grace, and the router restarts
    (kill -9) meanwhile. The worker's hello tells the new router it still runs the credit:
    the router adopts it and tells the producer (``ProducerAdopted``), which stops counting
    the grace. The credit completes, once — before, it ended ``lost: router_restarted`` after
    the grace and its real completion was dropped as late. A second credit adopted the same
    way ends ``lost: worker_lost`` when its worker is killed: adopted credits are tracked."""
    procs.start_router()
    procs.start_worker("w", capacity=4)
    procs.start_worker("doomed", capacity=4)
    await procs.workers_active("w", "doomed")
    async with counting(
        procs.producer_endpoint, recovery_grace_s=1.0, heartbeat_interval_s=0.2
    ) as client:
        # 10 s each: still running after a kill, a restart and the grace on a slow machine
        # (at 4 s, a loaded CI could finish one before the checks below).
        futures = await client.submit_many(credits(range(2), 2500))
        await procs.until_held(2)
        assert procs.router is not None
        procs.router.kill()
        procs.router.wait()
        procs.start_router()
        await procs.workers_active("w", "doomed")
        await procs.until(lambda d: d["totals"]["in_flight"] == 2, what="2 adopted")
        by_worker = {w["name"]: w["in_flight"] for w in procs.status()["workers"]}
        assert by_worker == {"w": 1, "doomed": 1}
        await asyncio.sleep(1.5)  # past the recovery grace: nothing is given up
        assert not any(f.done() for f in futures)
        procs.workers["doomed"].kill()
        outcomes = await asyncio.wait_for(asyncio.gather(*futures), 20)
        assert sorted((o.status, o.reason, o.worker) for o in outcomes) == [
            (Status.COMPLETED, "", "w"),
            (Status.LOST, "worker_lost", "doomed"),
        ]
        assert client.adopted == 2
        assert max(client.received.values()) == 1


# ---------------------------------------------------------------------------- scenario 11


def serve_cmd(producers: str, worker_port: int, http_port: int) -> list[str]:
    return [
        sys.executable, "-m", "credit_router", "serve",
        "--workers", f"tcp://127.0.0.1:{worker_port}", "--producers", producers,
        "--http-port", str(http_port), "--heartbeat-interval-s", "0.2",
    ]  # fmt: skip


async def test_second_serve_on_a_live_ipc_endpoint_exits_2_and_a_stale_file_is_cleaned(
    procs: Procs,
) -> None:
    """Scenario 11: a second ``credit-router serve`` on the ipc:// producer endpoint a live
    router holds exits 2 with one line, and the first keeps serving (a producer still gets its
    outcomes). A socket file left by a router killed with -9 is removed and a new router
    starts there."""
    path = procs.tmp / "credit-router.ipc"  # the default's shape, in a private directory
    producers = f"ipc://{path}"
    procs.start_router("--producers", producers)
    procs.start_worker("w")
    await procs.workers_active("w")
    second = await asyncio.to_thread(
        subprocess.run, serve_cmd(producers, free_port(), free_port()),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert second.returncode == 2, second
    out = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
    assert len(out) == 1, out
    assert str(path) in out[0], out
    assert "another process" in out[0], out
    async with RouterClient(producers, name="first") as client:
        outcome = await asyncio.wait_for(client.run(Credit(id=1, x_correlation_id="s")), 10)
    assert (outcome.status, outcome.worker) == (Status.COMPLETED, "w")
    assert procs.router is not None
    assert procs.router.poll() is None
    # A router killed with -9 leaves its socket file behind: the next one cleans it.
    procs.router.kill()
    procs.router.wait()
    assert path.exists(), "kill -9 leaves the socket file"
    procs.start_router("--producers", producers)
    await procs.workers_active("w")
    async with RouterClient(producers, name="third") as client:
        outcome = await asyncio.wait_for(client.run(Credit(id=1, x_correlation_id="s")), 10)
    assert (outcome.status, outcome.worker) == (Status.COMPLETED, "w")
    assert "stale socket file" in procs.log("router")


# ---------------------------------------------------------------------------- scenario 19


async def test_killed_worker_is_noticed_at_once_not_by_the_silence_timeout(
    procs: Procs,
) -> None:
    """Scenario 19: a worker process killed with -9 closes its connection; the router sees the
    close at once (the worker is suspect: nothing new goes to it) and its in-flight credits end
    ``lost: worker_lost`` after the short grace (≤ 1 s for a clean close), well before the 5 s
    silence timeout."""
    silence_s = 5.0
    procs.start_router("--heartbeat-interval-s", "1", "--lost-after-s", str(silence_s))
    procs.start_worker("doomed", capacity=4)
    procs.start_worker("fine", capacity=4)
    await procs.workers_active("doomed", "fine")
    async with counting(procs.producer_endpoint) as client:
        futures = await client.submit_many(credits(range(8), 750))  # 3 s each
        await procs.until(lambda d: d["totals"]["in_flight"] == 8, what="8 in flight")
        procs.workers["doomed"].kill()
        killed_at = time.monotonic()
        await procs.until(
            lambda d: {w["name"]: w["state"] for w in d["workers"]}.get("doomed") != "active",
            within_s=10,
            what="the killed worker no longer active",
        )
        noticed = time.monotonic() - killed_at
        print(f"scenario 19: a killed worker was no longer active after {noticed:.2f} s")
        # Silence would make it suspect only after three 1 s beats.
        assert noticed < 2.0, "the closed connection was not noticed"
        ended: list[float] = []
        for future in asyncio.as_completed(futures, timeout=20):
            outcome = await future
            if outcome.worker == "doomed":
                assert (outcome.status, outcome.reason) == (Status.LOST, "worker_lost")
                ended.append(time.monotonic() - killed_at)
            else:
                assert outcome.status is Status.COMPLETED, outcome
        assert len(ended) == 4
        print(f"scenario 19: a killed worker's credits ended lost after {max(ended):.2f} s")
        assert max(ended) < 3.0, f"noticed only by the silence timeout: {ended}"


async def test_worker_closing_its_socket_is_noticed_at_once(procs: Procs) -> None:
    """Scenario 19 (socket closed, process alive): a worker written from PROTOCOL.md alone joins,
    takes a credit and closes its socket. The credit ends ``lost: worker_lost`` after the short
    grace, well before the 5 s silence timeout."""
    silence_s = 5.0
    procs.start_router("--heartbeat-interval-s", "1", "--lost-after-s", str(silence_s))
    await procs.until(lambda d: True, what="the router's /status")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"raw/1")
    sock.connect(procs.worker_endpoint)
    try:
        hello = Hello(name="raw", incarnation="1", protocol_version=PROTOCOL_VERSION, capacity=1)
        sock.send(encode(hello))

        async def next_message(within_s: float) -> object:
            deadline = time.monotonic() + within_s
            while time.monotonic() < deadline:
                try:
                    return decode_router_to_worker(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    await asyncio.sleep(0.01)
            raise AssertionError("nothing from the router")

        assert isinstance(await next_message(5), Welcome)
        async with counting(procs.producer_endpoint) as client:
            future = await client.submit(Credit(id=1, x_correlation_id="s"))
            while not isinstance(msg := await next_message(5), Dispatch | DispatchBatch):
                assert not isinstance(msg, Refusal), msg
            sock.close(linger=0)
            closed_at = time.monotonic()
            outcome = await asyncio.wait_for(future, 20)
            took = time.monotonic() - closed_at
        print(f"scenario 19: a closed worker socket's credit ended lost after {took:.2f} s")
        assert (outcome.status, outcome.reason) == (Status.LOST, "worker_lost")
        assert took < 3.0, f"noticed only by the silence timeout: {took:.2f} s"
    finally:
        sock.close(linger=0)
        ctx.term()
