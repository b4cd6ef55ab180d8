"""Random interleavings against RouterCore, with routing.md §7 checked after every step.

The machine plays a producer (sessions advance one turn per outcome, FORK and SPAWN trees of any
depth, reservations released unused, early ends, cancellations, duplicate credits) and a fleet of
workers (completions in any order and with any status, duplicates and misdirected reports,
child releases, in-flight reports that forget credits, reconnects, restarts, silent deaths,
drains), with a hand-driven clock that expires idle sessions and lost workers. At the end every
session is driven to its end, and invariant 7 (no leak) must hold.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol import PROTOCOL_VERSION, BranchMode, Completion, Credit, Outcome, Status
from router_service.core.invariants import check_invariants, check_no_leak
from router_service.core.router import RouterCore
from router_service.core.workers import WorkerState

WORKERS = ["w0", "w1", "w2", "w3"]


@dataclass
class Session:
    """The producer's view of one session."""

    sid: str
    num_turns: int
    mode: BranchMode | None = None
    parent: str | None = None
    allow_migration: bool = False
    next_turn: int = 0
    pending: int | None = None
    """Credit id in progress."""
    declared: int = 0
    """FORK children its turns declared that the producer has not started or released."""
    ended: bool = False


@dataclass
class WorkerSim:
    """What a worker process holds (the router's view may differ: that is the point)."""

    incarnation: int = 0
    held: dict[int, Credit] = field(default_factory=dict)
    forgotten: set[int] = field(default_factory=set)
    cancel_asked: set[int] = field(default_factory=set)
    connected: bool = False


class RouterMachine(RuleBasedStateMachine):
    """A producer and a fleet of workers around one RouterCore."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.core = RouterCore(
            protocol_version=PROTOCOL_VERSION,
            max_sessions=12,
            session_idle_ttl_s=40.0,
            queue_limit=6,
            worker_queue_limit=3,
            heartbeat_interval_s=1.0,
            lost_after_s=6.0,
        )
        self.sessions: dict[str, Session] = {}
        self.by_credit: dict[int, Session] = {}
        self.credits: dict[int, Credit] = {}
        self.outcomes: dict[int, Outcome] = {}
        self.delivered: list[tuple[str, Completion]] = []
        self.workers = {name: WorkerSim() for name in WORKERS}
        self.ids = itertools.count(1)
        self.seq = itertools.count(1)
        self.names = itertools.count(1)
        self.submitted = 0

    # ------------------------------------------------------------------ plumbing

    def collect(self) -> None:
        fx = self.core.take_effects()
        for name in fx.disconnect:
            sim = self.workers[name]
            sim.connected = False
            sim.held.clear()
            sim.forgotten.clear()
        for name, item in fx.to_worker:
            if isinstance(item, tuple):
                producer, credits = item
                assert producer == "p"
                sim = self.workers[name]
                assert sim.connected, f"dispatch to disconnected {name}"
                for c in credits:
                    assert c.id not in sim.held
                    sim.held[c.id] = c
            elif type(item).__name__ == "Cancel":
                self.workers[name].cancel_asked.update(item.credit_ids)
        for producer, outs in fx.outcomes.items():
            assert producer == "p"
            for o in outs:
                assert o.credit_id not in self.outcomes, f"two outcomes for credit {o.credit_id}"
                self.outcomes[o.credit_id] = o
                self.on_outcome(o)

    def on_outcome(self, o: Outcome) -> None:
        s = self.by_credit[o.credit_id]
        assert s.pending == o.credit_id
        s.pending = None
        credit = self.credits[o.credit_id]
        if o.status is Status.COMPLETED or (o.status is Status.LOST and s.allow_migration):
            s.next_turn += 1
            s.declared += credit.fork_count if o.status is Status.COMPLETED else 0
            if s.next_turn >= s.num_turns:
                s.ended = True
        else:
            # The producer gives up on a session whose turn did not complete.
            s.ended = True
            self.core.end_session("p", s.sid, self.now)

    def submit(self, s: Session, fork_count: int) -> None:
        cid = next(self.ids)
        credit = Credit(
            id=cid,
            x_correlation_id=s.sid,
            turn_index=s.next_turn,
            num_turns=s.num_turns,
            parent_correlation_id=s.parent,
            branch_mode=s.mode,
            fork_count=fork_count,
            allow_migration=s.allow_migration,
            subagent_type="Explore" if s.mode is BranchMode.SPAWN else None,
        )
        s.pending = cid
        self.by_credit[cid] = s
        self.credits[cid] = credit
        self.submitted += 1
        self.core.submit("p", [credit], self.now)

    def new_session(self, num_turns: int, **kw: object) -> Session:
        s = Session(f"s{next(self.names)}", num_turns, **kw)  # type: ignore[arg-type]
        self.sessions[s.sid] = s
        return s

    def worker_completes(self, name: str, cid: int, status: Status) -> None:
        sim = self.workers[name]
        credit = sim.held.pop(cid)
        if cid in sim.cancel_asked:
            status = Status.CANCELLED
        done = Completion(seq=next(self.seq), producer="p", credit_id=cid, status=status)
        self.core.complete(name, [done], self.now)
        self.delivered.append((name, done))
        final = credit.turn_index + 1 >= credit.num_turns
        if credit.branch_mode is BranchMode.FORK and (final or status is not Status.COMPLETED):
            # The worker's rule: a FORK child session that ended on it is released.
            self.core.child_release(name, "p", credit.x_correlation_id, self.now)

    # --------------------------------------------------------------------- rules

    @initialize(
        roots=st.lists(
            st.tuples(st.integers(1, 4), st.integers(0, 2), st.booleans()), min_size=2, max_size=6
        )
    )
    def start(self, roots: list[tuple[int, int, bool]]) -> None:
        for name in WORKERS[:2]:
            self.join(name)
        for num_turns, fork_count, migrate in roots:
            self.submit(self.new_session(num_turns, allow_migration=migrate), fork_count)
        self.collect()

    @rule(name=st.sampled_from(WORKERS), capacity=st.integers(1, 3))
    def join(self, name: str, capacity: int = 2) -> None:
        sim = self.workers[name]
        if sim.connected:
            return
        sim.incarnation += 1
        sim.connected = True
        self.core.worker_hello(
            name,
            incarnation=f"{name}-{sim.incarnation}",
            protocol_version=PROTOCOL_VERSION,
            capacity=capacity,
            labels={},
            in_flight={},
            now=self.now,
        )
        self.collect()

    @rule(
        num_turns=st.integers(1, 4),
        fork_count=st.integers(0, 2),
        migrate=st.booleans(),
    )
    def new_root(self, num_turns: int, fork_count: int, migrate: bool) -> None:
        self.submit(self.new_session(num_turns, allow_migration=migrate), fork_count)
        self.collect()

    @precondition(lambda m: any(not s.ended and s.pending is None for s in m.sessions.values()))
    @rule(data=st.data(), fork_count=st.integers(0, 2))
    def next_turn(self, data: st.DataObject, fork_count: int) -> None:
        ready = [s for s in self.sessions.values() if not s.ended and s.pending is None]
        if not ready:
            return
        s = data.draw(st.sampled_from(ready))
        self.submit(s, fork_count)
        self.collect()

    @precondition(lambda m: any(s.declared > 0 for s in m.sessions.values()))
    @rule(data=st.data(), num_turns=st.integers(1, 3), fork_count=st.integers(0, 2))
    def start_fork_child(self, data: st.DataObject, num_turns: int, fork_count: int) -> None:
        parents = [s for s in self.sessions.values() if s.declared > 0]
        if not parents:
            return
        parent = data.draw(st.sampled_from(parents))
        parent.declared -= 1
        child = self.new_session(num_turns, mode=BranchMode.FORK, parent=parent.sid)
        self.submit(child, fork_count)
        self.collect()

    @rule(data=st.data(), num_turns=st.integers(1, 3), fork_count=st.integers(0, 1))
    def start_spawn_child(self, data: st.DataObject, num_turns: int, fork_count: int) -> None:
        if not self.sessions:
            return
        parent = data.draw(st.sampled_from(sorted(self.sessions)))
        child = self.new_session(num_turns, mode=BranchMode.SPAWN, parent=parent)
        self.submit(child, fork_count)
        self.collect()

    @rule(data=st.data())
    def release_unused(self, data: st.DataObject) -> None:
        parents = [s for s in self.sessions.values() if s.declared > 0]
        if parents:
            s = data.draw(st.sampled_from(parents))
            self.core.release_reservation("p", s.sid, s.declared, self.now)
            s.declared = 0
            self.collect()

    @rule(data=st.data())
    def end_early(self, data: st.DataObject) -> None:
        live = [s for s in self.sessions.values() if not s.ended and s.pending is None]
        if live:
            s = data.draw(st.sampled_from(live))
            s.ended = True
            self.core.end_session("p", s.sid, self.now)
            self.collect()

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        pending = [s.pending for s in self.sessions.values() if s.pending is not None]
        if pending:
            self.core.cancel("p", [data.draw(st.sampled_from(pending))], self.now)
            self.collect()

    @rule(data=st.data())
    def duplicate_submit(self, data: st.DataObject) -> None:
        pending = [s.pending for s in self.sessions.values() if s.pending is not None]
        if pending:
            cid = data.draw(st.sampled_from(pending))
            self.core.submit("p", [self.credits[cid]], self.now)
            self.collect()

    @precondition(lambda m: any(w.held for w in m.workers.values() if w.connected))
    @rule(data=st.data(), status=st.sampled_from([*Status, Status.COMPLETED, Status.COMPLETED]))
    def complete(self, data: st.DataObject, status: Status) -> None:
        held = [(n, c) for n, sim in self.workers.items() for c in sim.held if sim.connected]
        if held:
            name, cid = data.draw(st.sampled_from(held))
            self.worker_completes(name, cid, status)
            self.collect()

    @rule(data=st.data())
    def duplicate_completion(self, data: st.DataObject) -> None:
        if self.delivered:
            name, done = data.draw(st.sampled_from(self.delivered))
            before = {n: w.in_flight for n, w in self.core.workers.items()}
            self.core.complete(name, [done], self.now)
            after = {n: w.in_flight for n, w in self.core.workers.items()}
            assert before == after, "a duplicate changed a worker's load"
            self.collect()

    @rule(data=st.data(), liar=st.sampled_from(WORKERS))
    def misdirected_completion(self, data: st.DataObject, liar: str) -> None:
        held = [(n, c) for n, sim in self.workers.items() for c in sim.held if n != liar]
        if held:
            _, cid = data.draw(st.sampled_from(held))
            done = Completion(seq=0, producer="p", credit_id=cid, status=Status.COMPLETED)
            before = {n: w.in_flight for n, w in self.core.workers.items()}
            self.core.complete(liar, [done], self.now)
            assert before == {n: w.in_flight for n, w in self.core.workers.items()}
            self.collect()

    @rule(name=st.sampled_from(WORKERS), forget=st.booleans())
    def report(self, name: str, forget: bool) -> None:
        sim = self.workers[name]
        if not sim.connected:
            return
        if forget and sim.held:
            cid = next(iter(sim.held))
            sim.held.pop(cid)
            sim.forgotten.add(cid)
        self.core.worker_report(name, {"p": list(sim.held)}, self.now)
        self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def reconnect_same_incarnation(self, name: str) -> None:
        sim = self.workers[name]
        if sim.connected:
            self.core.worker_hello(
                name,
                incarnation=f"{name}-{sim.incarnation}",
                protocol_version=PROTOCOL_VERSION,
                capacity=2,
                labels={},
                in_flight={"p": list(sim.held)},
                now=self.now,
            )
            self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def restart_new_incarnation(self, name: str) -> None:
        sim = self.workers[name]
        if sim.connected:
            # The process died (the transport saw its connection close) and came back.
            self.core.worker_closed(name, self.now)
            sim.held.clear()
            sim.connected = False
            self.join(name)

    @rule(name=st.sampled_from(WORKERS))
    def kill(self, name: str) -> None:
        """The process dies: the transport notices (EHOSTUNREACH) and tells the core."""
        if self.workers[name].connected:
            self.core.worker_unreachable(name, self.now)
            self.collect()

    @rule(name=st.sampled_from(WORKERS), deadline=st.sampled_from([0.5, 3.0]))
    def drain(self, name: str, deadline: float) -> None:
        if self.workers[name].connected:
            self.core.drain_worker(name, deadline, self.now)
            self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def goodbye(self, name: str) -> None:
        sim = self.workers[name]
        if sim.connected and not sim.held:
            self.core.worker_left(name, self.now)
            self.collect()

    @rule(dt=st.sampled_from([0.2, 1.0, 2.5, 7.0, 45.0]), beat=st.booleans())
    def time_passes(self, dt: float, beat: bool) -> None:
        self.now += dt
        if beat:
            for name, sim in self.workers.items():
                if sim.connected:
                    self.core.worker_seen(name, self.now)
        self.core.tick(self.now)
        self.collect()

    # --------------------------------------------------------------- invariants

    @invariant()
    def routing_invariants(self) -> None:
        check_invariants(self.core, submitted=self.submitted, outcomes=len(self.outcomes))
        # Every credit a connected worker holds is one the router believes it holds.
        for name, w in self.core.workers.items():
            held = {t.credit.id for t in w.tickets}
            assert set(self.workers[name].held) <= held | set(self.outcomes)

    def teardown(self) -> None:
        """Drive everything to its end; then nothing may be left (invariant 7)."""
        for _ in range(200):
            progressed = False
            for name, sim in self.workers.items():
                if not sim.connected:
                    continue
                for cid in list(sim.held):
                    self.worker_completes(name, cid, Status.COMPLETED)
                    progressed = True
                self.core.worker_seen(name, self.now)
            self.collect()
            if not any(w.state is WorkerState.ACTIVE for w in self.core.workers.values()):
                # Queued credits need a worker that takes new sessions.
                self.workers["w3"].connected = False
                self.join("w3")
            for s in self.sessions.values():
                if s.declared:
                    self.core.release_reservation("p", s.sid, s.declared, self.now)
                    s.declared = 0
                    progressed = True
                if not s.ended and s.pending is None:
                    self.submit(s, 0)
                    progressed = True
            # Forgotten credits end as orphans after two reports.
            for name, sim in self.workers.items():
                if sim.connected:
                    self.now += 1.0
                    self.core.worker_report(name, {"p": list(sim.held)}, self.now)
            self.collect()
            if not progressed and all(s.ended for s in self.sessions.values()):
                break
        check_invariants(self.core, submitted=self.submitted, outcomes=len(self.outcomes))
        assert len(self.outcomes) == self.submitted, "a credit never got its outcome"
        check_no_leak(self.core)


RouterMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRouterMachine = RouterMachine.TestCase
