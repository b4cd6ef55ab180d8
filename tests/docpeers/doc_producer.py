"""A credit-router producer written from docs/PROTOCOL.md §6 alone (raw pyzmq + msgspec.msgpack).

ProducerHello/ProducerWelcome, credits submitted in ``SubmitBatch`` frames tagged with the
router incarnation of the last welcome (§6), exactly one outcome awaited per credit, hello again
on silence, on ``ErrorReport(hello_required)`` and on reconnection (§6.1), a credit answered
``rejected: stale_incarnation`` submitted again (§7), and credits sent to a router incarnation
that went away given up after a grace period (§6.1). It runs in a thread; a test submits with
:meth:`submit` and reads :attr:`outcomes`.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.docpeers import wire

GAVE_UP = ("lost", "router_restarted")  # the producer's own ending (§6.1, §7)


@dataclass
class _Pending:
    credit: list[Any]
    sent_to: str | None = None  # router incarnation of the frame that carried it
    tag: str | None = None  # a test's stand-in for a frame written before a restart
    give_up_at: float | None = None


@dataclass
class ProducerLog:
    welcomes: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, incarnation)
    hellos: list[tuple[float, str]] = field(default_factory=list)
    stale_resubmits: list[int] = field(default_factory=list)
    duplicates: list[tuple[int, str, str]] = field(default_factory=list)  # a second outcome
    after_give_up: list[tuple[int, str, str]] = field(default_factory=list)  # §6.1: ignored
    strays: list[tuple[int, str, str]] = field(default_factory=list)  # outcome for no await
    errors: list[tuple[str, str]] = field(default_factory=list)
    first_tokens: int = 0
    refusal: tuple[str, str] | None = None
    bad_frames: int = 0
    unknown_tags: int = 0


class DocProducer:
    def __init__(self, endpoint: str, name: str, *, recovery_grace_s: float = 30.0) -> None:
        self.endpoint = endpoint
        self.name = name
        self.incarnation = wire.new_incarnation("p")
        self.recovery_grace_s = recovery_grace_s
        self.log = ProducerLog()
        self.router_incarnation: str | None = None
        self.welcomed = False
        self.heartbeat_interval_s = 1.0
        self.max_batch = 1
        # credit id → the outcome list [credit_id, status, reason, worker, ..., result]
        self.outcomes: dict[int, list[Any]] = {}
        self._pending: dict[int, _Pending] = {}
        self._done: set[int] = set()
        self._gave_up: set[int] = set()
        self._inbox: queue.Queue[list[Any]] = queue.Queue()
        self._commands: queue.Queue[list[Any]] = queue.Queue()  # sent once welcomed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._hello_at = 0.0
        self._hello_backoff = 0.25
        self._next_hello = 0.0
        self._loop_at = 0.0
        self._lock = threading.Lock()

    # -- the test's side ---------------------------------------------------------------------
    def start(self) -> DocProducer:
        self._thread = threading.Thread(
            target=self.run, name=f"doc-producer-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def submit(self, credit: list[Any], *, tag: str | None = None) -> None:
        """Await one outcome for ``credit``; ``tag`` sends it the first time with that
        router incarnation instead of the current one (as a frame written before a restart)."""
        self._inbox.put([credit, tag])

    def cancel(self, credit_ids: list[int]) -> None:
        self._commands.put(["pcancel", credit_ids])

    def end_session(self, x_correlation_id: str, reason: str = "") -> None:
        self._commands.put(["endsess", x_correlation_id, reason, ""])  # producer: unused (§10)

    def awaiting(self) -> int:
        with self._lock:
            return len(self._pending) + self._inbox.qsize()

    def wait_outcomes(self, ids: list[int], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(i in self.outcomes for i in ids):
                    return True
            time.sleep(0.01)
        return False

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, f"{self.name}/{self.incarnation}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sock.connect(self.endpoint)
        self._sock = sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self._say_hello("join")
        self._loop_at = time.monotonic()
        try:
            while not self._stop.is_set() and self.log.refusal is None:
                events = dict(poller.poll(10))
                now = time.monotonic()
                late = now - self._loop_at > 0.2
                self._loop_at = now
                if monitor in events:
                    while monitor.poll(0):
                        recv_monitor_message(monitor)
                        self._say_hello("handshake")
                if sock in events:
                    while sock.poll(0):
                        self._on_frame(sock.recv())
                self._tick(time.monotonic(), late)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            ctx.term()

    def _send(self, message: list[Any]) -> None:
        self._sock.send(wire.encode(message))
        self._last_tx = time.monotonic()

    def _say_hello(self, why: str) -> None:
        now = time.monotonic()
        if now - self._hello_at < 0.02:
            return
        self.welcomed = False  # §6.1: until a welcome comes, do not submit
        self._send(["phello", self.name, wire.PROTOCOL_VERSION, self.incarnation])
        self._hello_at = now
        self._next_hello = now + self._hello_backoff * random.uniform(0.8, 1.2)
        self.log.hellos.append((now, why))

    def _tick(self, now: float, late: bool) -> None:
        self._take_new_and_give_up(now)
        if not self.welcomed:
            if now >= self._next_hello:
                self._hello_backoff = min(self._hello_backoff * 2, 1.0)
                self._say_hello("retry")
            return
        if not late and now - self._last_rx > 3 * self.heartbeat_interval_s:
            self._say_hello("silence")
            return
        self._flush()
        while not self._commands.empty():
            self._send(self._commands.get_nowait())
        if now - self._last_tx >= self.heartbeat_interval_s * 0.5:
            self._send(["hb", now])

    def _take_new_and_give_up(self, now: float) -> None:
        with self._lock:
            while True:
                try:
                    credit, tag = self._inbox.get_nowait()
                except queue.Empty:
                    break
                self._pending[credit[wire.C_ID]] = _Pending(credit, tag=tag)
            for credit_id, pending in list(self._pending.items()):
                if pending.give_up_at is not None and now >= pending.give_up_at:
                    del self._pending[credit_id]  # §6.1: end it ourselves, ignore what comes
                    self._gave_up.add(credit_id)
                    self.outcomes[credit_id] = [credit_id, *GAVE_UP]

    def _flush(self) -> None:
        """Send every credit not yet sent, tagged with the router incarnation (§6)."""
        with self._lock:
            unsent = [p for p in self._pending.values() if p.sent_to is None]
        by_tag: dict[str, list[_Pending]] = {}
        for p in unsent:
            by_tag.setdefault(p.tag or self.router_incarnation or "", []).append(p)
            p.tag = None
        for tag, pendings in by_tag.items():
            for start in range(0, len(pendings), self.max_batch):
                batch = pendings[start : start + self.max_batch]
                self._send(["submitb", [p.credit for p in batch], tag])
                for p in batch:
                    p.sent_to = tag

    def _on_frame(self, frame: bytes) -> None:
        message = wire.decode(frame)
        if message is None:
            self.log.bad_frames += 1
            return
        self._last_rx = time.monotonic()
        handler = getattr(self, f"_on_{message[0]}", None)
        if handler is None:
            self.log.unknown_tags += 1
            return
        try:
            handler(message)
        except (IndexError, TypeError, ValueError, KeyError):
            self.log.bad_frames += 1

    def _on_pwelcome(self, m: list[Any]) -> None:
        incarnation = m[1]
        now = time.monotonic()
        if self.router_incarnation is not None and incarnation != self.router_incarnation:
            # §6.1: the router restarted; credits sent to the old one get a grace period.
            with self._lock:
                for pending in self._pending.values():
                    if pending.sent_to is not None and pending.give_up_at is None:
                        pending.give_up_at = now + self.recovery_grace_s
        self.router_incarnation = incarnation
        self.heartbeat_interval_s = float(m[3])
        self.max_batch = int(m[4])
        self.welcomed = True
        self._hello_backoff = 0.25
        self.log.welcomes.append((now, incarnation))

    def _on_refusal(self, m: list[Any]) -> None:
        self.log.refusal = (wire.field(m, 4, ""), m[1])

    def _on_error(self, m: list[Any]) -> None:
        self.log.errors.append((m[1], m[2]))
        if m[1] == "hello_required":
            self._say_hello("hello_required")

    def _on_hb(self, m: list[Any]) -> None:
        pass

    def _on_pft(self, m: list[Any]) -> None:
        self.log.first_tokens += 1

    def _on_outcomeb(self, m: list[Any]) -> None:
        for outcome in m[1]:
            self._on_outcome(outcome)

    def _on_outcome(self, m: list[Any]) -> None:
        credit_id, status, reason = m[1], m[2], wire.field(m, 3, "")
        with self._lock:
            if credit_id in self._pending:
                if status == "rejected" and reason == "stale_incarnation":
                    # §6/§7: it never ran anywhere: submit it again to the current router
                    self._pending[credit_id].sent_to = None
                    self._pending[credit_id].give_up_at = None
                    self.log.stale_resubmits.append(credit_id)
                    return
                del self._pending[credit_id]
                self._done.add(credit_id)
                self.outcomes[credit_id] = m[1:]
            elif credit_id in self._gave_up:
                self.log.after_give_up.append((credit_id, status, reason))
            elif credit_id in self._done:
                self.log.duplicates.append((credit_id, status, reason))
            else:
                self.log.strays.append((credit_id, status, reason))
