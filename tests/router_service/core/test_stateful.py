"""Random interleavings against RouterCore, with docs/ROUTING.md §7 checked after every step.

The machine plays producers and a fleet of workers around one RouterCore.

Producers (two names that share session ids and credit ids; one polite, sending ``EndSession``
when it gives a session up, one that never does): sessions advance one turn per outcome, FORK
and SPAWN trees of any depth, reservations released unused, early ends, cancellations,
duplicate credits, turn 0 retried after a loss, and restarts (a new incarnation is a new
producer key; the old key is ``producer_gone``).

Workers: completions in any order and with any status, duplicates and misdirected reports,
child releases, in-flight reports that forget credits, reconnects, restarts, silent deaths,
drains, connections that close and come back within or after the grace, impostors hello-ing
with a held name, and superseded incarnations trying to come back.

A hand-driven clock expires idle sessions and lost workers. After every step invariants 1–6
(``check_invariants``) and 8 (``HistoryWitness``: a non-first turn or a FORK child runs where
its history is, or is counted as migrated) hold; at the end every session is driven to its end
and invariant 7 (no leak) must hold.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol import PROTOCOL_VERSION, BranchMode, Completion, Credit, Outcome, Refusal, Status
from router_service.core.invariants import HistoryWitness, check_invariants, check_no_leak
from router_service.core.router import RouterCore
from router_service.core.workers import WorkerState

WORKERS = ["w0", "w1", "w2", "w3"]
PRODUCERS = ["polite", "rude"]
"""``polite`` ends the sessions it gives up; ``rude`` never sends ``EndSession``."""

Key = tuple[str, int]
"""(producer key, credit id)."""


@dataclass
class Session:
    """A producer's view of one session."""

    producer: str
    """Its producer key (``name/incarnation``)."""
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
    completed_turns: int = 0


@dataclass
class WorkerSim:
    """What a worker process holds (the router's view may differ: that is the point)."""

    incarnation: int = 0
    held: dict[Key, Credit] = field(default_factory=dict)
    forgotten: set[Key] = field(default_factory=set)
    cancel_asked: set[Key] = field(default_factory=set)
    connected: bool = False
    closed: bool = False
    """Its connection closed; the process still runs and holds its credits."""


class RouterMachine(RuleBasedStateMachine):
    """Producers and a fleet of workers around one RouterCore."""

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
            closed_grace_s=1.0,
        )
        self.incarnations = dict.fromkeys(PRODUCERS, 1)
        self.sessions: dict[tuple[str, str], Session] = {}
        self.by_credit: dict[Key, Session] = {}
        self.credits: dict[Key, Credit] = {}
        self.outcomes: dict[Key, Outcome] = {}
        self.delivered: list[tuple[str, Completion]] = []
        self.workers = {name: WorkerSim() for name in WORKERS}
        self.ids: dict[str, itertools.count[int]] = {}
        """Credit ids per producer key: both producers (and each incarnation) count from 1."""
        self.seq = itertools.count(1)
        self.names = itertools.count(1)
        self.submitted = 0
        self.witness = HistoryWitness()

    def key(self, name: str) -> str:
        return f"{name}/{self.incarnations[name]}"

    # ------------------------------------------------------------------ plumbing

    def collect(self) -> None:
        fx = self.core.take_effects()
        self.witness.observe(self.core, fx)
        for name in fx.disconnect:
            sim = self.workers[name]
            sim.connected = False
            sim.closed = False
            sim.held.clear()
            sim.forgotten.clear()
        for name, item in fx.to_worker:
            if isinstance(item, tuple):
                producer, credits = item
                sim = self.workers[name]
                assert sim.connected, f"dispatch to disconnected {name}"
                assert not sim.closed, f"dispatch to {name} after its connection closed"
                for c in credits:
                    assert (producer, c.id) not in sim.held
                    sim.held[producer, c.id] = c
            elif type(item).__name__ == "Cancel":
                self.workers[name].cancel_asked.update((item.producer, i) for i in item.credit_ids)
        for producer, outs in fx.outcomes.items():
            for o in outs:
                key = (producer, o.credit_id)
                assert key not in self.outcomes, f"two outcomes for credit {key}"
                self.outcomes[key] = o
                self.on_outcome(key, o)

    def on_outcome(self, key: Key, o: Outcome) -> None:
        s = self.by_credit[key]
        assert s.pending == o.credit_id
        s.pending = None
        if s.ended:
            return  # its producer is gone: it discards the outcome
        credit = self.credits[key]
        if o.status is Status.COMPLETED:
            s.completed_turns += 1
            s.next_turn += 1
            s.declared += credit.fork_count
            if s.next_turn >= s.num_turns:
                s.ended = True
        elif o.status is Status.LOST and s.allow_migration:
            s.next_turn += 1
            if s.next_turn >= s.num_turns:
                s.ended = True
        elif (
            o.status is Status.LOST
            and credit.turn_index == 0
            and s.completed_turns == 0
            and s.mode is not BranchMode.FORK
        ):
            pass  # turn 0 is retried: no history of it exists anywhere
        else:
            # The producer gives up on a session whose turn did not complete.
            self.give_up(s)

    def give_up(self, s: Session) -> None:
        s.ended = True
        if s.producer.startswith("polite"):
            self.core.end_session(s.producer, s.sid, self.now)

    def submit(self, s: Session, fork_count: int) -> None:
        cid = next(self.ids.setdefault(s.producer, itertools.count(1)))
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
        self.by_credit[s.producer, cid] = s
        self.credits[s.producer, cid] = credit
        self.submitted += 1
        self.core.submit(s.producer, [credit], self.now)

    def new_session(
        self, producer: str, num_turns: int, sid: str | None = None, **kw: object
    ) -> Session:
        sid = sid or f"s{next(self.names)}"
        s = Session(self.key(producer), sid, num_turns, **kw)  # type: ignore[arg-type]
        self.sessions[s.producer, s.sid] = s
        return s

    def free_sid(self, producer: str, wanted: str) -> str:
        """``wanted`` (shared with the other producer) unless this producer already used it."""
        if (self.key(producer), wanted) in self.sessions:
            return f"s{next(self.names)}"
        return wanted

    def worker_completes(self, name: str, key: Key, status: Status) -> None:
        sim = self.workers[name]
        credit = sim.held.pop(key)
        if key in sim.cancel_asked:
            status = Status.CANCELLED
        producer, cid = key
        done = Completion(seq=next(self.seq), producer=producer, credit_id=cid, status=status)
        self.core.complete(name, [done], self.now)
        self.delivered.append((name, done))
        final = credit.turn_index + 1 >= credit.num_turns
        if credit.branch_mode is BranchMode.FORK and (final or status is not Status.COMPLETED):
            # The worker's rule: a FORK child session that ended on it is released.
            self.core.child_release(name, producer, credit.x_correlation_id, self.now)

    def hello(self, name: str, incarnation: int, capacity: int = 2, held: bool = False) -> bool:
        sim = self.workers[name]
        in_flight: dict[str, list[int]] = {}
        if held:
            for producer, cid in sim.held:
                in_flight.setdefault(producer, []).append(cid)
        return self.core.worker_hello(
            name,
            incarnation=f"{name}-{incarnation}",
            protocol_version=PROTOCOL_VERSION,
            capacity=capacity,
            labels={},
            in_flight=in_flight,
            now=self.now,
        )

    def live(self) -> list[Session]:
        return [s for s in self.sessions.values() if not s.ended and s.pending is None]

    # --------------------------------------------------------------------- rules

    @initialize(
        roots=st.lists(
            st.tuples(
                st.integers(1, 4), st.integers(0, 2), st.booleans(), st.sampled_from(PRODUCERS)
            ),
            min_size=2,
            max_size=6,
        )
    )
    def start(self, roots: list[tuple[int, int, bool, str]]) -> None:
        for name in WORKERS[:2]:
            self.join(name)
        for num_turns, fork_count, migrate, producer in roots:
            sid = self.free_sid(producer, f"shared{num_turns}")
            s = self.new_session(producer, num_turns, sid, allow_migration=migrate)
            self.submit(s, fork_count)
        self.collect()

    @rule(name=st.sampled_from(WORKERS), capacity=st.integers(1, 3))
    def join(self, name: str, capacity: int = 2) -> None:
        sim = self.workers[name]
        if sim.connected:
            return
        sim.incarnation += 1
        holder = self.core.workers.get(name)
        live_holder = holder is not None and holder.state is not WorkerState.SUSPECT
        admitted = self.hello(name, sim.incarnation, capacity)
        assert admitted is not live_holder, f"hello of {name}: admitted={admitted}"
        if admitted:
            sim.connected = True
            sim.closed = False
        self.collect()

    @rule(
        num_turns=st.integers(1, 4),
        fork_count=st.integers(0, 2),
        migrate=st.booleans(),
        producer=st.sampled_from(PRODUCERS),
        shared=st.integers(1, 4),
    )
    def new_root(
        self, num_turns: int, fork_count: int, migrate: bool, producer: str, shared: int
    ) -> None:
        sid = self.free_sid(producer, f"shared{shared}")
        self.submit(self.new_session(producer, num_turns, sid, allow_migration=migrate), fork_count)
        self.collect()

    @precondition(lambda m: bool(m.live()))
    @rule(data=st.data(), fork_count=st.integers(0, 2))
    def next_turn(self, data: st.DataObject, fork_count: int) -> None:
        ready = self.live()
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
        child = Session(
            parent.producer, f"s{next(self.names)}", num_turns, BranchMode.FORK, parent.sid
        )
        self.sessions[child.producer, child.sid] = child
        self.submit(child, fork_count)
        self.collect()

    @rule(data=st.data(), num_turns=st.integers(1, 3), fork_count=st.integers(0, 1))
    def start_spawn_child(self, data: st.DataObject, num_turns: int, fork_count: int) -> None:
        current = sorted(k for k in self.sessions if k[0] in {self.key(p) for p in PRODUCERS})
        if not current:
            return
        parent = self.sessions[data.draw(st.sampled_from(current))]
        child = Session(
            parent.producer, f"s{next(self.names)}", num_turns, BranchMode.SPAWN, parent.sid
        )
        self.sessions[child.producer, child.sid] = child
        self.submit(child, fork_count)
        self.collect()

    @rule(data=st.data())
    def release_unused(self, data: st.DataObject) -> None:
        parents = [s for s in self.sessions.values() if s.declared > 0]
        if parents:
            s = data.draw(st.sampled_from(parents))
            self.core.release_reservation(s.producer, s.sid, s.declared, self.now)
            s.declared = 0
            self.collect()

    @rule(data=st.data())
    def end_early(self, data: st.DataObject) -> None:
        live = self.live()
        if live:
            self.give_up(data.draw(st.sampled_from(live)))
            self.collect()

    @rule(data=st.data(), producer=st.sampled_from(PRODUCERS))
    def foreign_end_session(self, data: st.DataObject, producer: str) -> None:
        """Another producer ends a session id that is not its own: nothing may change."""
        others = [s for s in self.sessions.values() if s.producer != self.key(producer)]
        if others:
            s = data.draw(st.sampled_from(others))
            if (self.key(producer), s.sid) not in self.sessions:
                self.core.end_session(self.key(producer), s.sid, self.now)
                self.core.release_reservation(self.key(producer), s.sid, 5, self.now)
                self.collect()

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        pending = [(s.producer, s.pending) for s in self.sessions.values() if s.pending is not None]
        if pending:
            producer, cid = data.draw(st.sampled_from(pending))
            self.core.cancel(producer, [cid], self.now)
            self.collect()

    @rule(data=st.data())
    def duplicate_submit(self, data: st.DataObject) -> None:
        pending = [(s.producer, s.pending) for s in self.sessions.values() if s.pending is not None]
        if pending:
            key = data.draw(st.sampled_from(pending))
            self.core.submit(key[0], [self.credits[key]], self.now)
            self.collect()

    @rule(producer=st.sampled_from(PRODUCERS))
    def producer_restarts(self, producer: str) -> None:
        """A new incarnation says hello: the old key is gone, with everything it had."""
        old = self.key(producer)
        self.incarnations[producer] += 1
        for s in self.sessions.values():
            if s.producer == old:
                s.ended = True
                s.declared = 0
        self.core.producer_gone(old, self.now)
        self.collect()
        assert old not in self.core.sessions.tables

    @precondition(lambda m: any(w.held for w in m.workers.values() if w.connected and not w.closed))
    @rule(data=st.data(), status=st.sampled_from([*Status, Status.COMPLETED, Status.COMPLETED]))
    def complete(self, data: st.DataObject, status: Status) -> None:
        held = [
            (n, k)
            for n, sim in self.workers.items()
            for k in sim.held
            if sim.connected and not sim.closed
        ]
        if held:
            name, key = data.draw(st.sampled_from(held))
            self.worker_completes(name, key, status)
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
        held = [(n, k) for n, sim in self.workers.items() for k in sim.held if n != liar]
        if held:
            _, (producer, cid) = data.draw(st.sampled_from(held))
            done = Completion(seq=0, producer=producer, credit_id=cid, status=Status.COMPLETED)
            before = {n: w.in_flight for n, w in self.core.workers.items()}
            self.core.complete(liar, [done], self.now)
            assert before == {n: w.in_flight for n, w in self.core.workers.items()}
            self.collect()

    @rule(name=st.sampled_from(WORKERS), forget=st.booleans())
    def report(self, name: str, forget: bool) -> None:
        sim = self.workers[name]
        if not sim.connected or sim.closed:
            return
        if forget and sim.held:
            key = next(iter(sim.held))
            sim.held.pop(key)
            sim.forgotten.add(key)
        report: dict[str, list[int]] = {}
        for producer, cid in sim.held:
            report.setdefault(producer, []).append(cid)
        self.core.worker_report(name, report, self.now)
        self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def reconnect_same_incarnation(self, name: str) -> None:
        sim = self.workers[name]
        if sim.connected:
            assert self.hello(name, sim.incarnation, held=True), "the holder was refused"
            sim.closed = False
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
    def impostor(self, name: str) -> None:
        """A second process with the same name and a new incarnation says hello."""
        sim = self.workers[name]
        holder = self.core.workers.get(name)
        if not sim.connected or holder is None:
            return
        if holder.state is WorkerState.SUSPECT:
            return  # it would replace the holder: that is restart_new_incarnation's case
        refused = self.core.stats.refusals_by_code["name_in_use"]
        state = (holder.incarnation, holder.state, dict(holder.tickets))
        assert not self.hello(name, sim.incarnation + 100)
        assert self.core.stats.refusals_by_code["name_in_use"] == refused + 1
        assert (holder.incarnation, holder.state, dict(holder.tickets)) == state
        self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def superseded_comes_back(self, name: str) -> None:
        sim = self.workers[name]
        if sim.incarnation < 2:
            return
        before = self.core.workers.get(name)
        assert not self.hello(name, sim.incarnation - 1), "a superseded incarnation came back"
        assert isinstance(self.core.last_refusal, Refusal)
        assert self.core.last_refusal.code == "superseded"
        assert self.core.workers.get(name) is before
        self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def kill(self, name: str) -> None:
        """The process dies: the transport notices (EHOSTUNREACH) and tells the core."""
        if self.workers[name].connected:
            self.core.worker_unreachable(name, self.now)
            self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def connection_closes(self, name: str) -> None:
        """The connection closes; the process lives on and may come back (or be lost)."""
        sim = self.workers[name]
        if sim.connected and not sim.closed:
            sim.closed = True
            self.core.worker_closed(name, self.now)
            self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def reconnects_after_close(self, name: str) -> None:
        sim = self.workers[name]
        if sim.connected and sim.closed:
            assert self.hello(name, sim.incarnation, held=True), "the closed worker was refused"
            sim.closed = False
            self.collect()

    @rule(name=st.sampled_from(WORKERS), deadline=st.sampled_from([0.5, 3.0]))
    def drain(self, name: str, deadline: float) -> None:
        if self.workers[name].connected:
            self.core.drain_worker(name, deadline, self.now)
            self.collect()

    @rule(name=st.sampled_from(WORKERS))
    def goodbye(self, name: str) -> None:
        sim = self.workers[name]
        if sim.connected and not sim.closed and not sim.held:
            self.core.worker_left(name, self.now)
            self.collect()

    @rule(dt=st.sampled_from([0.2, 0.6, 1.0, 2.5, 7.0, 45.0, 120.0]), beat=st.booleans())
    def time_passes(self, dt: float, beat: bool) -> None:
        self.now += dt
        if beat:
            for name, sim in self.workers.items():
                if sim.connected and not sim.closed:
                    self.core.worker_seen(name, self.now)
        self.core.tick(self.now)
        self.collect()

    # --------------------------------------------------------------- invariants

    @invariant()
    def routing_invariants(self) -> None:
        check_invariants(self.core, submitted=self.submitted, outcomes=len(self.outcomes))
        # Every credit a connected worker holds is one the router believes it holds.
        for name, w in self.core.workers.items():
            held = {(t.producer, t.credit.id) for t in w.tickets}
            assert set(self.workers[name].held) <= held | set(self.outcomes)

    def teardown(self) -> None:
        """Drive everything to its end; then nothing may be left (invariant 7)."""
        for _ in range(200):
            progressed = self.workers_finish()
            self.ensure_a_worker_for_new_sessions()
            progressed = self.producers_finish() or progressed
            self.orphan_forgotten()
            pending = any(s.pending is not None for s in self.sessions.values())
            if not progressed and not pending and all(s.ended for s in self.sessions.values()):
                break
        # The rude producer never ends what it gave up, nor releases what its ended sessions
        # declared: it is gone at the end of its run, and then nothing of it may be left.
        for producer in PRODUCERS:
            self.core.producer_gone(self.key(producer), self.now)
        self.collect()
        check_invariants(self.core, submitted=self.submitted, outcomes=len(self.outcomes))
        assert len(self.outcomes) == self.submitted, "a credit never got its outcome"
        check_no_leak(self.core)

    def workers_finish(self) -> bool:
        """Closed connections come back; every held credit completes."""
        progressed = False
        for name, sim in self.workers.items():
            if sim.connected and sim.closed:
                self.hello(name, sim.incarnation, held=True)
                sim.closed = False
            if not sim.connected:
                continue
            for key in list(sim.held):
                self.worker_completes(name, key, Status.COMPLETED)
                progressed = True
            self.core.worker_seen(name, self.now)
        self.collect()
        return progressed

    def ensure_a_worker_for_new_sessions(self) -> None:
        if any(w.state is WorkerState.ACTIVE for w in self.core.workers.values()):
            return
        sim = self.workers["w3"]
        if sim.connected:
            self.core.worker_closed("w3", self.now)
            self.now += 2.0
            self.core.tick(self.now)
            self.collect()
        sim.connected = False
        self.join("w3")

    def producers_finish(self) -> bool:
        """Reservations are released and every live session sends its next turn."""
        progressed = False
        for s in self.sessions.values():
            if s.declared and not s.ended:
                self.core.release_reservation(s.producer, s.sid, s.declared, self.now)
                s.declared = 0
                progressed = True
            if not s.ended and s.pending is None:
                self.submit(s, 0)
                progressed = True
        return progressed

    def orphan_forgotten(self) -> None:
        """Forgotten credits end as orphans after two reports."""
        for name, sim in self.workers.items():
            if sim.connected:
                self.now += 1.0
                report: dict[str, list[int]] = {}
                for producer, cid in sim.held:
                    report.setdefault(producer, []).append(cid)
                self.core.worker_report(name, report, self.now)
        self.collect()


RouterMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRouterMachine = RouterMachine.TestCase
