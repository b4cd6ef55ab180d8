"""A credit-router worker written from docs/PROTOCOL.md §5 alone (raw pyzmq + msgspec.msgpack).

It follows "A worker in twelve lines" (§5.7): hello/welcome/refusal (§5.1), heartbeats (§5.2),
in-flight reports (§5.4), executes credits by sleeping ``exec_s`` (§5.3), seq + cumulative
ack, ``Recovered`` after a router restart and the three reasons to say hello again (§5.6),
``Cancel`` incl. ``revoked`` and ``EndSession`` per producer (§5.4). It runs in a thread and
records what happened so a test can check it.

The ``result`` of each completion is a msgpack map ``{"worker", "history"}``: the turn indices
of the session this worker held *before* running the turn, so a test can see stickiness.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.docpeers import wire
from tests.docpeers.wire import (
    C_BRANCH,
    C_CANCEL_AFTER,
    C_ID,
    C_NUM_TURNS,
    C_PARENT,
    C_TURN,
    C_XCID,
)


@dataclass
class _Running:
    producer: str
    credit: list[Any]
    router_incarnation: str  # the router incarnation that dispatched it (§5.6)
    started: float
    finish_at: float
    outcome: tuple[str, str]  # (status, reason) when it finishes


@dataclass
class _Unacked:
    seq: int
    completion: list[Any]
    router_incarnation: str
    credit_key: tuple[str, int]


@dataclass
class WorkerLog:
    """What the worker saw, for tests (appended by the worker thread only)."""

    # (monotonic time, router incarnation, resumed)
    welcomes: list[tuple[float, str, bool]] = field(default_factory=list)
    hellos: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, why)
    dispatched: list[tuple[str, int]] = field(default_factory=list)
    completed: list[tuple[str, int, str]] = field(default_factory=list)  # (producer, id, status)
    recovered_sent: list[tuple[str, int]] = field(default_factory=list)  # (old inc, seq)
    revoked: list[tuple[str, int]] = field(default_factory=list)
    ended_sessions: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    refusal: tuple[str, str] | None = None
    left: bool = False  # said Goodbye
    bad_frames: int = 0
    unknown_tags: int = 0


class DocWorker:
    """One worker process's worth of state, driven by :meth:`run` in a thread."""

    def __init__(
        self,
        endpoint: str,
        name: str,
        *,
        capacity: int = 4,
        exec_s: float = 0.05,
        labels: dict[str, str] | None = None,
        routing_name: str | None = None,
    ) -> None:
        # routing_name: the name part of the routing id, normally ``name`` (a test may break it)
        self.routing_name = routing_name or name
        # cleared: running credits do not finish until it is set again (a test holds them)
        self.gate = threading.Event()
        self.gate.set()
        # set: the process is frozen (SIGSTOP-like): it reads, sends and runs nothing
        self.frozen = threading.Event()
        # §5.3: "Set session_ended when you dropped the session's history (final turn, an
        # error, a cancellation)": this worker drops it on a failed or cancelled turn.
        self.drop_history_on_failure = True
        self.endpoint = endpoint
        self.name = name
        self.incarnation = wire.new_incarnation("w")
        self.capacity = capacity
        self.exec_s = exec_s
        self.labels = labels or {}
        self.log = WorkerLog()
        self.router_incarnation: str | None = None  # the one of the last Welcome
        self.welcomed = False
        self.heartbeat_interval_s = 1.0
        self.inflight_report_interval_s = 5.0
        self._seq = 0
        self._running: dict[tuple[str, int], _Running] = {}
        self._sessions: dict[tuple[str, str], list[int]] = {}  # (producer, session) → turns run
        self._unacked: dict[int, _Unacked] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_rx = 0.0
        self._last_tx = 0.0
        self._last_report = 0.0
        self._hello_at = 0.0  # when the last Hello went out
        self._hello_backoff = 0.25
        self._next_hello = 0.0
        self._loop_at = 0.0
        self._draining: float | None = None
        self._leave_after: float | None = None  # set by another thread, acted on in the loop

    # -- life --------------------------------------------------------------------------------
    def start(self) -> DocWorker:
        self._thread = threading.Thread(
            target=self.run, name=f"doc-worker-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def leave(self, deadline_s: float) -> None:
        """The worker decides to drain (§5.5): ``Draining``, finish, ``Goodbye``."""
        self._leave_after = deadline_s

    def unacknowledged(self) -> int:
        return len(self._unacked)

    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def holding(self) -> int:
        return len(self._running)

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        # §1/§5.1: routing id NAME/INCARNATION before connect, kept across reconnects.
        sock.setsockopt(zmq.ROUTING_ID, f"{self.routing_name}/{self.incarnation}".encode())
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
                if self.frozen.is_set():
                    time.sleep(0.01)
                    self._loop_at = time.monotonic()
                    continue
                events = dict(poller.poll(10))
                now = time.monotonic()
                late = now - self._loop_at > 0.2  # §5.6 rule 1: skip the judgement when late
                self._loop_at = now
                if monitor in events:
                    while monitor.poll(0):
                        recv_monitor_message(monitor)
                        self._say_hello("handshake")  # §5.6 rule 3
                if sock in events:
                    while sock.poll(0):
                        self._on_frame(sock.recv())
                self._tick(time.monotonic(), late)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            ctx.term()

    # -- sending -----------------------------------------------------------------------------
    def _send(self, message: list[Any]) -> None:
        self._sock.send(wire.encode(message))
        self._last_tx = time.monotonic()

    def _say_hello(self, why: str) -> None:
        now = time.monotonic()
        if now - self._hello_at < 0.02:  # several triggers at once: one Hello is enough
            return
        # §5.6: in_flight = credits still held that the current router incarnation dispatched.
        in_flight: dict[str, list[int]] = {}
        for (producer, credit_id), run in self._running.items():
            if run.router_incarnation == self.router_incarnation:
                in_flight.setdefault(producer, []).append(credit_id)
        self.welcomed = False
        self._send(
            [
                "hello",
                self.name,
                self.incarnation,
                wire.PROTOCOL_VERSION,
                self.capacity,
                self.labels,
                in_flight,
            ]
        )
        self._hello_at = now
        self._next_hello = now + self._hello_backoff * random.uniform(0.8, 1.2)
        self.log.hellos.append((now, why))

    def _send_if_welcomed(self, message: list[Any]) -> None:
        if self.welcomed:
            self._send(message)

    def _report(self) -> None:
        credits: dict[str, list[int]] = {}
        for (producer, credit_id), run in self._running.items():
            if run.router_incarnation == self.router_incarnation:
                credits.setdefault(producer, []).append(credit_id)
        self._send(["inflight", credits])
        self._last_report = time.monotonic()

    def _send_completion(self, unacked: _Unacked) -> None:
        if unacked.router_incarnation == self.router_incarnation:
            self._send(unacked.completion)
        else:  # §5.6: dispatched by an earlier router incarnation
            self._send(["recovered", unacked.router_incarnation, [unacked.completion]])
            self.log.recovered_sent.append((unacked.router_incarnation, unacked.seq))

    # -- timers ------------------------------------------------------------------------------
    def _tick(self, now: float, late: bool) -> None:
        # credits run whether or not a router is there; completions wait for a Welcome
        for key, run in list(self._running.items()):
            if now >= run.finish_at and self.gate.is_set():
                self._finish(key, run, now)
        if not self.welcomed:
            if now >= self._next_hello:  # resend with back-off, 0.25 s doubling to 1 s
                self._hello_backoff = min(self._hello_backoff * 2, 1.0)
                self._say_hello("retry")
            return
        if not late and now - self._last_rx > 3 * self.heartbeat_interval_s:
            self._say_hello("silence")  # §5.6 rule 1
            return
        if now - self._last_report >= self.inflight_report_interval_s:
            self._report()
        if now - self._last_tx >= self.heartbeat_interval_s * 0.5:
            self._send(["hb", now])
        if self._leave_after is not None and self._draining is None:
            self._draining = now + self._leave_after
            self._send(["draining", self._leave_after])
        if self._draining is not None and (not self._running or now >= self._draining):
            self._send(["bye", "drained"])
            self.log.left = True
            self._stop.set()

    def _finish(self, key: tuple[str, int], run: _Running, now: float) -> None:
        del self._running[key]
        status, reason = run.outcome
        credit = run.credit
        session = (run.producer, credit[C_XCID])
        history = self._sessions.setdefault(session, [])
        result = msgspec.msgpack.encode({"worker": self.name, "history": list(history)})
        history.append(credit[C_TURN])
        ended = credit[C_TURN] == credit[C_NUM_TURNS] - 1 or (
            status != "completed" and self.drop_history_on_failure
        )
        if ended:
            self._sessions.pop(session, None)
        if status == "completed" and run.router_incarnation == self.router_incarnation:
            self._send_if_welcomed(["ft", run.producer, credit[C_ID], 0.001])
        self._seq += 1
        completion = [
            "done",
            self._seq,
            run.producer,
            credit[C_ID],
            status,
            reason,
            0.001 if status == "completed" else None,
            now - run.started,
            ended,
            result,
        ]
        unacked = _Unacked(self._seq, completion, run.router_incarnation, key)
        self._unacked[self._seq] = unacked
        self.log.completed.append((run.producer, credit[C_ID], status))
        if self.welcomed:  # otherwise it goes out after the next Welcome (§5.6)
            self._send_completion(unacked)

    # -- receiving ---------------------------------------------------------------------------
    def _on_frame(self, frame: bytes) -> None:
        message = wire.decode(frame)
        if message is None:
            self.log.bad_frames += 1  # §4: never crash on a bad frame
            return
        self._last_rx = time.monotonic()
        handler = getattr(self, f"_on_{message[0]}", None)
        if handler is None:
            self.log.unknown_tags += 1  # §4 rule 1: drop and count
            return
        try:
            handler(message)
        except (IndexError, TypeError, ValueError, KeyError):
            self.log.bad_frames += 1

    def _on_welcome(self, m: list[Any]) -> None:
        incarnation, hb, report, resumed = m[1], m[3], m[4], wire.field(m, 5, False)
        restarted = self.router_incarnation is not None and incarnation != self.router_incarnation
        self.router_incarnation = incarnation
        self.heartbeat_interval_s = float(hb)
        self.inflight_report_interval_s = float(report)
        self.welcomed = True
        self._hello_backoff = 0.25
        now = time.monotonic()
        self.log.welcomes.append((now, incarnation, bool(resumed)))
        if not resumed:  # §5.1: drop orphan histories, keep those of credits still running
            live = {(r.producer, r.credit[C_XCID]) for r in self._running.values()}
            self._sessions = {k: v for k, v in self._sessions.items() if k in live}
        del restarted  # the unacked resend below already tells old from new (§5.6)
        for seq in sorted(self._unacked):
            self._send_completion(self._unacked[seq])
        self._report()

    def _on_refusal(self, m: list[Any]) -> None:
        self.log.refusal = (wire.field(m, 4, ""), m[1])  # §5.1: final, stop

    def _on_error(self, m: list[Any]) -> None:
        self.log.errors.append((m[1], m[2]))
        if m[1] == "unknown_worker":
            self._say_hello("unknown_worker")  # §5.6 rule 2

    def _on_hb(self, m: list[Any]) -> None:
        pass

    def _on_credit(self, m: list[Any]) -> None:
        self._accept(m[1], m[2])

    def _on_credits(self, m: list[Any]) -> None:
        for credit in m[2]:
            self._accept(m[1], credit)

    def _accept(self, producer: str, credit: list[Any]) -> None:
        now = time.monotonic()
        key = (producer, credit[C_ID])
        self.log.dispatched.append(key)
        session = (producer, credit[C_XCID])
        if wire.field(credit, C_BRANCH) == "fork" and session not in self._sessions:
            parent = self._sessions.get((producer, wire.field(credit, C_PARENT)), [])
            self._sessions[session] = list(parent)
        duration, outcome = self.exec_s, ("completed", "")
        payload = wire.field(credit, 14, b"")
        if payload:  # our own test payload: {"sleep_s": s} (§5.8: the router never reads it)
            duration = float(msgspec.msgpack.decode(payload).get("sleep_s", duration))
        cancel_after = wire.field(credit, C_CANCEL_AFTER)
        if cancel_after is not None and cancel_after < duration:
            duration, outcome = cancel_after, ("cancelled", "client_disconnect")
        self._running[key] = _Running(
            producer, credit, self.router_incarnation or "", now, now + duration, outcome
        )

    def _on_cancel(self, m: list[Any]) -> None:
        producer, ids, revoked = m[1], m[2], wire.field(m, 3, False)
        for credit_id in ids:
            key = (producer, credit_id)
            if revoked:  # §5.4: forget — no completion, no Recovered, drop unacked ones too
                self._running.pop(key, None)
                for seq in [s for s, u in self._unacked.items() if u.credit_key == key]:
                    del self._unacked[seq]
                self.log.revoked.append(key)
            elif key in self._running:
                run = self._running[key]
                run.outcome = ("cancelled", "cancelled")
                self._finish(key, run, time.monotonic())
        if revoked:
            self._report()

    def _on_endsess(self, m: list[Any]) -> None:
        key = (wire.field(m, 3, ""), m[1])
        self._sessions.pop(key, None)
        self.log.ended_sessions.append(key)

    def _on_ack(self, m: list[Any]) -> None:
        for seq in [s for s in self._unacked if s <= m[1]]:
            del self._unacked[seq]

    def _on_drain(self, m: list[Any]) -> None:
        self._draining = time.monotonic() + float(m[1])
        self._send(["draining", float(m[1])])
