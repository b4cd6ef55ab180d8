"""RouterCore: the credit ledger, routing decisions and worker life cycle, as a pure state machine.

No ``await``, no sockets, no clock reads: every method takes ``now`` (seconds, monotonic) and
records what must happen in an ``Effects`` value that the service takes with ``take_effects()``
and performs. The contract is ``docs/ROUTING.md``; the section numbers below refer to it.

Theory of operation
-------------------
A submitted credit gets a ``Ticket`` in its producer's ledger (``ledgers[producer][credit_id]``),
where it stays until its one outcome is emitted: that pop *is* the exactly-once guarantee, so a
duplicate or late completion finds no ticket, is counted and dropped, and touches no load (§5).

Routing (§2): a FORK child resolves its parent through the table (own entry or alias); every other
credit uses its own ``x_correlation_id``. A sticky hit goes to the pinned worker, or waits in that
worker's queue if it is full or suspect; a new session goes to the least-loaded worker that accepts
new sessions (``LoadIndex``), or waits in the global queue if every such worker is full. Entry
book-keeping (§3) happens at *dispatch*, so a queued credit changes nothing until it leaves.

A completion frees a slot: the worker first serves its own queue (turns of its sessions), then the
global queue. A lost worker ends its in-flight credits ``lost: worker_lost`` (never re-sent: they
may have run), leaves tombstones for its sessions, and its queued credits are routed again, which
migrates or rejects them by ``allow_migration`` (§6).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final

import msgspec

from credit_common.histogram import WAIT_BUCKETS_S, Histogram
from protocol.messages import (
    BranchMode,
    Cancel,
    Completion,
    Credit,
    Drain,
    EndSession,
    ErrorReport,
    Outcome,
    ProducerFirstToken,
    Refusal,
    RouterToProducer,
    RouterToWorker,
    Status,
    Welcome,
)
from router_service.core.table import Entry, SessionTable
from router_service.core.workers import LoadIndex, Ticket, Worker, WorkerState

__all__ = ["CoreStats", "Effects", "RouterCore"]

_FORK: Final = BranchMode.FORK
_SPAWN: Final = BranchMode.SPAWN
_COMPLETED: Final = Status.COMPLETED

# Reasons: stable strings, documented in docs/PROTOCOL.md.
PARENT_UNAVAILABLE: Final = "parent_session_unavailable"
SESSION_LOST: Final = "session_lost"
SESSION_EXPIRED: Final = "session_expired"
SESSION_EVICTED: Final = "session_evicted"
WORKER_LOST: Final = "worker_lost"
WORKER_LEFT: Final = "worker_left"
ORPHANED: Final = "orphaned"
QUEUE_FULL: Final = "queue_full"
QUEUE_TIMEOUT: Final = "queue_timeout"
INVALID_CREDIT: Final = "invalid_credit"
CANCELLED: Final = "cancelled"
SHUTDOWN: Final = "router_shutdown"
DRAINING: Final = "router_draining"
SESSION_UNKNOWN: Final = "session_unknown"

_TAKEN: Final = "x_correlation_id is already another session's (each session needs its own)"

ROUTER_REASONS: Final = frozenset(
    {
        PARENT_UNAVAILABLE, SESSION_LOST, SESSION_EXPIRED, SESSION_EVICTED, WORKER_LOST,
        WORKER_LEFT, ORPHANED, QUEUE_FULL, QUEUE_TIMEOUT, INVALID_CREDIT, CANCELLED, SHUTDOWN,
        DRAINING, "router_restarted",
    }
)  # fmt: skip
"""Reasons the router itself gives; any other is a worker's own words."""


def reason_label(status: str, reason: str) -> str:
    """A metric label for an outcome's reason, from a bounded set.

    The router's own reasons (``ROUTER_REASONS``, detail after a ``:`` dropped) stay as they
    are; a worker's free text becomes ``worker_error`` (failed) or ``worker`` (other
    statuses), so the label never takes more than ~16 values.
    """
    head = reason.split(":", 1)[0].strip()
    if head in ROUTER_REASONS:
        return head
    if not head:
        return "none"
    return "worker_error" if status == "failed" else "worker"


#: Tombstone reason left by an eviction -> the rejection reason of the session's next credit.
_EVICTION_REASONS: Final = {
    "worker_lost": SESSION_LOST,
    "worker_left": SESSION_LOST,
    "idle": SESSION_EXPIRED,
    "capacity": SESSION_EVICTED,
}


class CoreStats:
    """Counters the core keeps; ``metrics.py`` turns them into Prometheus series."""

    def __init__(self) -> None:
        self.submitted = 0
        self.dispatched = 0
        self.outcomes: dict[str, int] = {s.value: 0 for s in Status}
        self.outcome_reasons: dict[tuple[str, str], int] = {}
        """Outcomes other than ``completed`` by ``(status, reason_label(reason))``."""
        self.departures: dict[str, int] = {WORKER_LOST: 0, WORKER_LEFT: 0}
        """Workers that left the table: ``worker_lost`` (silence, a new incarnation) or
        ``worker_left`` (a drain that ended with a Goodbye)."""
        self.sticky_hits = 0
        self.sticky_misses = 0
        """Credits that started or re-started a session on a least-loaded worker."""
        self.migrations = 0
        self.rehomes = 0
        """Soft-affinity moves (each one a cache-cold turn)."""
        self.evictions: dict[str, int] = dict.fromkeys(_EVICTION_REASONS, 0)
        self.duplicate_credits = 0
        self.duplicate_completions = 0
        """Completions for credits that already have an outcome (retransmits, late reports)."""
        self.misdirected_completions = 0
        """Completions from a worker that does not hold the credit."""
        self.unknown_child_releases = 0
        self.undeclared_forks = 0
        """FORK children that started without a reservation from a declaring turn."""
        self.undelivered = 0
        """Dispatches the transport could not hand over (counted again when re-sent)."""
        self.recovered = 0
        """Outcomes forwarded for credits an earlier router incarnation dispatched."""
        self.loop_stalls = 0
        self.workers_lost = 0
        self.refusals = 0
        self.suspicions = 0
        """Times a worker went silent for ``suspect_after_missed`` beats."""
        self.submit_to_dispatch_s = Histogram(WAIT_BUCKETS_S)
        """How long credits waited in the router (coordinated omission made visible)."""
        self.dispatch_to_outcome_s = Histogram()
        """How long a worker held a credit until its completion arrived."""

    def count_reason(self, status: str, reason: str) -> None:
        """Count an outcome that is not ``completed`` under its bounded reason label."""
        key = (status, reason_label(status, reason))
        self.outcome_reasons[key] = self.outcome_reasons.get(key, 0) + 1

    def snapshot(self) -> dict[str, object]:
        """A copy of every counter, for status pages and tests."""
        return {
            k: (dict(v) if isinstance(v, dict) else v)
            for k, v in vars(self).items()
            if not isinstance(v, Histogram)
        }


class Effects:
    """What the service must do after a batch of core calls. Plain data; no behaviour."""

    __slots__ = ("disconnect", "dispatch", "first_tokens", "outcomes", "to_producer", "to_worker")

    def __init__(self) -> None:
        self.dispatch: list[tuple[str, str, list[Credit]]] = []
        """``(worker, producer, credits)``: coalesced per worker and producer."""
        self.outcomes: dict[str, list[Outcome]] = {}
        """Outcomes by producer."""
        self.first_tokens: dict[str, list[ProducerFirstToken]] = {}
        self.to_worker: list[tuple[str, RouterToWorker | tuple[str, list[Credit]]]] = []
        """Per worker, in causal order: control messages and ``(producer, credits)`` dispatch
        chunks (a worker's ``Welcome`` precedes its first dispatch)."""
        self.to_producer: list[tuple[str, RouterToProducer]] = []
        self.disconnect: list[str] = []
        """Workers the transport should forget (lost or left)."""

    def __bool__(self) -> bool:
        return bool(
            self.dispatch
            or self.outcomes
            or self.first_tokens
            or self.to_worker
            or self.to_producer
            or self.disconnect
        )


class RouterCore:
    """The routing state machine (see module docstring)."""

    def __init__(
        self,
        *,
        protocol_version: int,
        router_incarnation: str = "",
        max_sessions: int = 1_000_000,
        session_idle_ttl_s: float = 600.0,
        queue_limit: int = 100_000,
        worker_queue_limit: int = 10_000,
        heartbeat_interval_s: float = 1.0,
        suspect_after_missed: int = 3,
        lost_after_s: float = 5.0,
        inflight_report_interval_s: float = 5.0,
        soft_affinity_gap: float | None = None,
        spawn_affinity_slack: float | None = None,
        queue_timeout_s: float | None = None,
        observe_latency: bool = True,
        sticky: bool = True,
        now: float = 0.0,
    ) -> None:
        """Create an empty router.

        Args:
            protocol_version: the version this router speaks; hellos of another are refused.
            router_incarnation: random per process start, told to peers in welcomes.
            max_sessions: cap on live sticky entries; at the cap the least recently used goes.
            session_idle_ttl_s: an entry unused for this long is evicted.
            queue_limit: credits that may wait for any worker (new sessions) at once.
            worker_queue_limit: credits that may wait for one particular worker at once.
            heartbeat_interval_s: the beat both sides send; silence is measured in these.
            suspect_after_missed: silent intervals after which a worker gets nothing new.
            lost_after_s: silence after which a worker is lost (the grace period).
            inflight_report_interval_s: how often workers report their in-flight set.
            soft_affinity_gap: if set, a session that allows migration is re-homed when its
                worker's load ratio exceeds the least-loaded worker's by more than this.
            spawn_affinity_slack: if set, a SPAWN child's first turn goes to its parent's
                worker when that worker's load ratio is within this of the least-loaded one.
            queue_timeout_s: if set, a credit that waited this long in the router for a worker
                ends ``rejected: queue_timeout`` (``None``: it waits until cancelled).
            observe_latency: keep the delay histograms (off only to measure what they cost).
            sticky: route sessions to the worker holding them (docs/ROUTING.md). ``False`` is the
                baseline that shows what stickiness is worth: every credit is routed as a new
                session to the least-loaded worker, FORK children too, and no entry is made.
            now: the clock at creation.
        """
        if max_sessions < 1 or queue_limit < 0 or worker_queue_limit < 0:
            raise ValueError("max_sessions must be >= 1 and queue limits >= 0")
        self.protocol_version = protocol_version
        self.router_incarnation = router_incarnation
        self.table = SessionTable(max_sessions)
        self.session_idle_ttl_s = session_idle_ttl_s
        self.queue_limit = queue_limit
        self.worker_queue_limit = worker_queue_limit
        self.heartbeat_interval_s = heartbeat_interval_s
        self.suspect_after_s = heartbeat_interval_s * suspect_after_missed
        self.lost_after_s = max(lost_after_s, self.suspect_after_s)
        self.inflight_report_interval_s = inflight_report_interval_s
        self.soft_affinity_gap = soft_affinity_gap
        self.spawn_affinity_slack = spawn_affinity_slack
        self.stats = CoreStats()
        self.observe_latency = observe_latency
        self.sticky = sticky
        self.queue_timeout_s = queue_timeout_s
        self.workers: dict[str, Worker] = {}
        self.index = LoadIndex()
        self.queue: deque[Ticket] = deque()
        """Credits of new sessions waiting for any worker."""
        self.ledgers: dict[str, dict[int, Ticket]] = {}
        self._effects = Effects()
        self._dirty: list[Worker] = []
        self._seq = 0
        self._joins = 0
        self._last_tick = now
        self.accepting = True
        """False while the router drains: new credits are rejected ``router_draining``."""

    # ------------------------------------------------------------------ effects

    def take_effects(self) -> Effects:
        """Everything to send since the last call; the core starts a fresh ``Effects``."""
        effects = self._effects
        control = effects.to_worker
        # Interim order (until the core records one causal sequence per worker): a worker's
        # Welcome first, then its dispatches, then its other control messages.
        ordered: list[tuple[str, RouterToWorker | tuple[str, list[Credit]]]] = [
            item for item in control if type(item[1]) is Welcome
        ]
        for worker in self._dirty:
            for producer, credits in worker.pending.items():
                effects.dispatch.append((worker.name, producer, credits))
                ordered.append((worker.name, (producer, credits)))
            worker.pending = {}
        ordered += [item for item in control if type(item[1]) is not Welcome]
        effects.to_worker = ordered
        self._dirty = []
        self._effects = Effects()
        return effects

    # ---------------------------------------------------------------- producers

    def submit(self, producer: str, credits: Iterable[Credit], now: float) -> None:
        """Accept credits of ``producer``; each will get exactly one outcome."""
        ledger = self.ledgers.get(producer)
        if ledger is None:
            ledger = self.ledgers[producer] = {}
        stats = self.stats
        for credit in credits:
            cid = credit.id
            if cid in ledger:
                stats.duplicate_credits += 1
                self._effects.to_producer.append(
                    (
                        producer,
                        ErrorReport(
                            code="duplicate_credit",
                            message=f"credit {cid} is "
                            "already in progress; the resubmission was ignored",
                        ),
                    )
                )
                continue
            ticket = Ticket(producer, credit, now)
            ledger[cid] = ticket
            stats.submitted += 1
            if not self.accepting:
                self._end(ticket, Status.REJECTED, DRAINING)
                continue
            # The common, valid root credit skips the full validation call.
            if (
                credit.branch_mode is not None
                or credit.turn_index >= credit.num_turns
                or credit.turn_index < 0
                or credit.fork_count < 0
                or not credit.x_correlation_id
            ):
                problem = _validate(credit)
                if problem is not None:
                    self._end(ticket, Status.REJECTED, f"{INVALID_CREDIT}: {problem}")
                    continue
            self._route(ticket, now)

    def cancel(self, producer: str, credit_ids: Iterable[int], now: float) -> None:
        """Cancel credits: queued ones end here, dispatched ones are cancelled at their worker."""
        ledger = self.ledgers.get(producer)
        if ledger is None:
            return
        forward: dict[str, list[int]] = {}
        for cid in credit_ids:
            ticket = ledger.get(cid)
            if ticket is None:
                continue
            if ticket.dispatched_at < 0:
                waiting = ticket.worker.queue if ticket.worker is not None else self.queue
                waiting.remove(ticket)
                self._end(ticket, Status.CANCELLED, CANCELLED)
            else:
                assert ticket.worker is not None
                forward.setdefault(ticket.worker.name, []).append(cid)
        for worker, ids in forward.items():
            self._effects.to_worker.append((worker, Cancel(producer=producer, credit_ids=ids)))

    def end_session(self, producer: str, session: str, now: float, reason: str = "") -> None:
        """The producer gives up ``session`` (§3: "or the producer ends it").

        It will send no more turns of it and start no more FORK children from it, so the
        session's unclaimed reservations are released too; children already started go on.
        """
        table = self.table
        table.tombstones.pop(session, None)
        entry = table.resolve(session)
        if entry is None:
            return
        table.unreserve(entry, session, entry.ref_count)
        if entry.key == session:
            table.end_own(entry)
        else:
            table.end_child(session)
        self._effects.to_worker.append(
            (entry.worker.name, EndSession(x_correlation_id=session, reason=reason or "ended"))
        )
        self._maybe_evict(entry, notify=session != entry.key)

    def release_reservation(self, producer: str, session: str, count: int, now: float) -> None:
        """Give back FORK reservations that ``session``'s turns declared and will not use."""
        entry = self.table.resolve(session)
        if entry is None or count <= 0:
            return
        self.table.unreserve(entry, session, count)
        self._maybe_evict(entry)

    def producer_gone(self, producer: str, now: float) -> None:
        """``producer`` disconnected for good: cancel what it still has queued or in flight."""
        ledger = self.ledgers.get(producer)
        if ledger:
            self.cancel(producer, list(ledger), now)

    # ------------------------------------------------------------------ workers

    def worker_hello(
        self,
        name: str,
        *,
        incarnation: str,
        protocol_version: int,
        capacity: int,
        labels: dict[str, str],
        in_flight: dict[str, list[int]],
        now: float,
    ) -> Refusal | None:
        """A worker says hello. Returns ``None`` if it was admitted, else the ``Refusal`` for
        the caller to send to the peer that said it (not to the name's current holder)."""
        effects = self._effects
        if protocol_version != self.protocol_version:
            self.stats.refusals += 1
            return Refusal(
                reason=f"protocol version mismatch: router speaks {self.protocol_version}, "
                f"worker speaks {protocol_version}",
                router_version=self.protocol_version,
                peer_version=protocol_version,
                code="version_mismatch",
            )
        if capacity < 1:
            self.stats.refusals += 1
            return Refusal(
                reason=f"invalid capacity {capacity}: must be >= 1",
                router_version=self.protocol_version,
                peer_version=protocol_version,
                code="invalid_capacity",
            )
        welcome = Welcome(
            router_incarnation=self.router_incarnation,
            protocol_version=self.protocol_version,
            heartbeat_interval_s=self.heartbeat_interval_s,
            inflight_report_interval_s=self.inflight_report_interval_s,
        )
        known = self.workers.get(name)
        if known is not None and known.incarnation == incarnation:
            # The same process reconnecting within the grace period keeps everything (§6).
            known.last_seen = now
            known.labels = labels
            if known.capacity != capacity:
                known.capacity = capacity
            if known.state is WorkerState.SUSPECT:
                known.state = _awake_state(known)
            effects.to_worker.append((name, msgspec.structs.replace(welcome, resumed=True)))
            self.worker_report(name, in_flight, now)
            self._reindex(known)
            self._refill(known, now)
            return None
        if known is not None:
            # A new incarnation of the same name is a new worker; the old one is lost. The
            # routing identity now belongs to the new one, so the transport keeps it.
            self._lose(known, WORKER_LOST, now, disconnect=False)
        worker = Worker(name, incarnation, capacity, labels, self._joins, now)
        self._joins += 1
        active = [w.sent for w in self.workers.values()]
        # A late joiner starts at the fleet mean so it is not flooded by the tie-break.
        worker.sent = sum(active) // len(active) if active else 0
        self.workers[name] = worker
        self.index.add(worker)
        effects.to_worker.append((name, welcome))
        self._refill(worker, now)
        return None

    def worker_seen(self, name: str, now: float) -> None:
        """Any message from ``name`` arrived: it is alive (§6: any message counts)."""
        worker = self.workers.get(name)
        if worker is None:
            return
        worker.last_seen = now
        if worker.state is WorkerState.SUSPECT:
            worker.state = _awake_state(worker)
            self._reindex(worker)
            self._refill(worker, now)

    def complete(self, name: str, completions: Iterable[Completion], now: float) -> None:
        """Completions from worker ``name``: each ends its credit unless it already ended."""
        worker = self.workers.get(name)
        stats = self.stats
        if worker is None:
            for _ in completions:
                stats.duplicate_completions += 1
            return
        ledgers = self.ledgers
        outcomes = self._effects.outcomes
        counts = stats.outcomes
        tickets = worker.tickets
        waited = stats.submit_to_dispatch_s.observe if self.observe_latency else None
        held = stats.dispatch_to_outcome_s.observe
        for done in completions:
            producer = done.producer
            ledger = ledgers.get(producer)
            ticket = ledger.get(done.credit_id) if ledger is not None else None
            if ticket is None:
                stats.duplicate_completions += 1
                continue
            if ticket.worker is not worker or ticket.dispatched_at < 0:
                stats.misdirected_completions += 1
                continue
            del ledger[done.credit_id]  # type: ignore[union-attr]
            tickets.discard(ticket)
            status = done.status
            counts[status] += 1
            by_worker = worker.outcomes
            by_worker[status] = by_worker.get(status, 0) + 1
            if status is not _COMPLETED:
                stats.count_reason(status, done.reason)
            if waited is not None:
                waited(ticket.dispatched_at - ticket.submitted_at)
                held(now - ticket.dispatched_at)
            credit = ticket.credit
            if status is not _COMPLETED and credit.fork_count:
                self._drop_declared(credit)
            if done.session_ended and credit.branch_mode is _FORK:
                # The worker dropped this FORK child's session: that is its release (the
                # ChildRelease message may be lost with a connection; this one is acked).
                self.child_release(name, producer, credit.x_correlation_id, now)
            outcome = Outcome(
                credit_id=done.credit_id,
                status=status,
                reason=done.reason,
                worker=name,
                submit_to_dispatch_s=ticket.dispatched_at - ticket.submitted_at,
                dispatch_to_outcome_s=now - ticket.dispatched_at,
                ttft_s=done.ttft_s,
                subagent_type=ticket.credit.subagent_type,
                result=done.result,
            )
            bucket = outcomes.get(producer)
            if bucket is None:
                outcomes[producer] = [outcome]
            else:
                bucket.append(outcome)
        self._reindex(worker)
        self._refill(worker, now)

    def recovered(self, name: str, completions: Iterable[Completion], now: float) -> None:
        """Completions of credits an earlier router incarnation dispatched (§5 across restarts).

        This router has no ticket for them: each is forwarded to its producer as an outcome
        (the producer de-duplicates by its own outstanding set). If a ticket does exist on
        this worker, it is an ordinary completion.
        """
        stats = self.stats
        outcomes = self._effects.outcomes
        worker = self.workers.get(name)
        ordinary = []
        for done in completions:
            ledger = self.ledgers.get(done.producer)
            ticket = ledger.get(done.credit_id) if ledger is not None else None
            if ticket is not None:
                if ticket.worker is worker and worker is not None:
                    ordinary.append(done)
                else:
                    stats.misdirected_completions += 1
                continue
            stats.recovered += 1
            outcomes.setdefault(done.producer, []).append(
                Outcome(
                    credit_id=done.credit_id,
                    status=done.status,
                    reason=done.reason,
                    worker=name,
                    ttft_s=done.ttft_s,
                    result=done.result,
                )
            )
        if ordinary:
            self.complete(name, ordinary, now)

    def first_token(self, name: str, producer: str, credit_id: int, ttft_s: float) -> None:
        """Forward a first-token event to the producer if its credit is still in flight there."""
        ledger = self.ledgers.get(producer)
        ticket = ledger.get(credit_id) if ledger is not None else None
        if (
            ticket is None
            or ticket.dispatched_at < 0
            or ticket.worker is None
            or ticket.worker.name != name
        ):
            return
        self._effects.first_tokens.setdefault(producer, []).append(
            ProducerFirstToken(credit_id=credit_id, ttft_s=ttft_s)
        )

    def child_release(self, name: str, producer: str, child: str, now: float) -> None:
        """A FORK child session ended on worker ``name``: drop its count (idempotent).

        Only the worker that holds the child's entry may end it.
        """
        alias = self.table.aliases.get(child)
        if alias is not None and alias.entry.worker.name != name:
            self.stats.misdirected_completions += 1
            return
        entry = self.table.end_child(child)
        if entry is None:
            self.stats.unknown_child_releases += 1
            return
        self._maybe_evict(entry)

    def worker_report(self, name: str, credits: dict[str, list[int]], now: float) -> None:
        """In-flight report: a credit missing from two reports in a row ends ``lost: orphaned``.

        Only credits dispatched before the previous report arrived are judged, so one still in
        transit toward the worker is never counted missing.
        """
        worker = self.workers.get(name)
        if worker is None:
            return
        held = {p: set(ids) for p, ids in credits.items()}
        judged_before = worker.last_report_at
        worker.last_report_at = now
        orphans = []
        for ticket in worker.tickets:
            if ticket.dispatched_at >= judged_before:
                continue
            ids = held.get(ticket.producer)
            if ids is not None and ticket.credit.id in ids:
                ticket.missed = False
            elif ticket.missed:
                orphans.append(ticket)
            else:
                ticket.missed = True
        for ticket in orphans:
            worker.tickets.discard(ticket)
            self._end(ticket, Status.LOST, ORPHANED)
        if orphans:
            self._reindex(worker)
            self._refill(worker, now)

    def worker_draining(self, name: str, deadline_s: float, now: float) -> None:
        """``name`` drains: no new sessions; it is lost if still here after the deadline."""
        worker = self.workers.get(name)
        if worker is None or worker.state is WorkerState.GONE:
            return
        if not worker.draining:
            worker.draining = True
            worker.drain_deadline = now + deadline_s
        if worker.state is WorkerState.ACTIVE:
            # A suspect stays suspect (it gets nothing); it drains once it is back.
            worker.state = WorkerState.DRAINING
        self.index.discard(worker)

    def drain_worker(self, name: str, deadline_s: float, now: float) -> bool:
        """An operator asks ``name`` to drain. Returns whether such a worker exists."""
        if name not in self.workers:
            return False
        self.worker_draining(name, deadline_s, now)
        self._effects.to_worker.append((name, Drain(deadline_s=deadline_s)))
        return True

    def worker_left(self, name: str, now: float) -> None:
        """``name`` said goodbye. Anything it still held is lost (it should hold nothing)."""
        worker = self.workers.get(name)
        if worker is not None:
            self._lose(worker, WORKER_LEFT, now)

    def worker_disconnected(
        self, name: str, producer: str, credits: Iterable[Credit], now: float
    ) -> None:
        """The transport could not hand ``credits`` (of ``producer``) to ``name``.

        The connection is gone, for now: the worker gets nothing new until it speaks again
        (a reconnect within the grace period loses nothing, §6), and is lost if it does not.
        The credits never left this process, so they are not lost: a credit of a session
        pinned to the worker waits for it at the front of its queue; any other is routed again.
        """
        worker = self.workers.get(name)
        if worker is None:
            return
        if worker.state is not WorkerState.SUSPECT:
            self.stats.suspicions += 1
            worker.state = WorkerState.SUSPECT
            self.index.discard(worker)
        ledger = self.ledgers.get(producer)
        if ledger is None:
            return
        back: list[Ticket] = []
        for credit in credits:
            ticket = ledger.get(credit.id)
            if ticket is None or ticket.worker is not worker or ticket.dispatched_at < 0:
                continue
            worker.tickets.discard(ticket)
            ticket.dispatched_at = -1.0
            self.stats.undelivered += 1
            key = credit.x_correlation_id
            if credit.branch_mode is _FORK:
                key = credit.parent_correlation_id  # type: ignore[assignment]
            if self.table.resolve(key) is None:
                # No entry pins it (a single-turn credit): any worker will do.
                ticket.worker = None
                self._route(ticket, now)
            else:
                ticket.booked = True
                back.append(ticket)
        worker.queue.extendleft(reversed(back))

    def worker_closed(self, name: str, now: float) -> None:
        """The transport saw ``name``'s connection close: it gets nothing new from now on."""
        self.worker_disconnected(name, "", (), now)

    def worker_unreachable(self, name: str, now: float) -> None:
        """The transport cannot reach ``name`` any more (e.g. ``EHOSTUNREACH``): it is lost."""
        worker = self.workers.get(name)
        if worker is not None:
            self._lose(worker, WORKER_LOST, now)

    # --------------------------------------------------------------------- time

    def start_clock(self, now: float) -> None:
        """The service starts ticking at ``now`` (so its first tick is not taken for a stall)."""
        self._last_tick = now

    def tick(self, now: float) -> None:
        """Periodic duties: liveness (§6), idle TTL (§3), drain deadlines."""
        gap = now - self._last_tick
        self._last_tick = now
        if gap > self.suspect_after_s:
            # Our own loop was late: silence we measured is ours, not the workers'. Forgive.
            self.stats.loop_stalls += 1
            for worker in self.workers.values():
                worker.last_seen = max(worker.last_seen, now - self.heartbeat_interval_s)
        for worker in list(self.workers.values()):
            silent = now - worker.last_seen
            if silent > self.lost_after_s or (
                worker.draining and now > worker.drain_deadline + self.lost_after_s
            ):
                self._lose(worker, WORKER_LOST, now)
            elif silent > self.suspect_after_s and worker.state is WorkerState.ACTIVE:
                self.stats.suspicions += 1
                worker.state = WorkerState.SUSPECT
                self.index.discard(worker)
        self._expire_sessions(now)
        # A ledger per producer incarnation would pile up over a long-lived daemon: drop the
        # empty ones (an active producer's comes back with its next credit).
        for producer in [p for p, ledger in self.ledgers.items() if not ledger]:
            del self.ledgers[producer]
        if self.queue_timeout_s is not None:
            self._expire_queued(now - self.queue_timeout_s)

    def _expire_queued(self, horizon: float) -> None:
        """End credits that have waited since before ``horizon`` (queues are in submit order,
        give or take credits handed back undelivered, so each scan stops at the first young one)."""
        for queue in (self.queue, *(w.queue for w in self.workers.values())):
            while queue and queue[0].submitted_at < horizon:
                self._end(queue.popleft(), Status.REJECTED, QUEUE_TIMEOUT)

    # ---------------------------------------------------------------- internals

    def _route(self, ticket: Ticket, now: float) -> None:
        credit = ticket.credit
        table = self.table
        if not self.sticky:  # every credit is a new session
            self.stats.sticky_misses += 1
            self._to_least_loaded(ticket, now)
            return
        if credit.branch_mode is _FORK:
            self._route_fork(ticket, now)
            return
        key = credit.x_correlation_id
        entry = table.entries.get(key)
        if entry is None and key in table.aliases:
            self._end(ticket, Status.REJECTED, f"{INVALID_CREDIT}: {_TAKEN}")
            return
        if entry is not None:
            worker = entry.worker
            gap = self.soft_affinity_gap
            if (
                gap is not None
                and credit.allow_migration
                and not entry.aliases
                and not entry.reserved
            ):
                worker = self._maybe_rehome(entry, gap)
            self.stats.sticky_hits += 1
            self._to_worker(ticket, worker, now)
            return
        tomb = table.tombstones.get(key)
        if tomb is not None:
            if not credit.allow_migration:
                self._end(ticket, Status.REJECTED, _EVICTION_REASONS[tomb])
                return
            del table.tombstones[key]
            self.stats.migrations += 1
        elif credit.turn_index > 0:
            # A later turn of a session this router never saw (it restarted since the session
            # began, or the session's earlier turns never ran): no worker holds its history
            # that we know of, so it may only start afresh where migration is allowed.
            if not credit.allow_migration:
                self._end(ticket, Status.REJECTED, SESSION_UNKNOWN)
                return
            self.stats.migrations += 1
        self.stats.sticky_misses += 1
        if self.spawn_affinity_slack is not None and credit.branch_mode is _SPAWN:
            target = self._spawn_target(credit)
            if target is not None:
                self._dispatch(ticket, target, now)
                return
        self._to_least_loaded(ticket, now)

    def _to_least_loaded(self, ticket: Ticket, now: float) -> None:
        """A new session: the least-loaded worker, unless others already wait (FIFO)."""
        queue = self.queue
        best = self.index.peek() if not queue else None
        if best is not None and len(best.tickets) < best.capacity:
            self._dispatch(ticket, best, now)
        elif len(queue) < self.queue_limit:
            queue.append(ticket)
        else:
            self._end(ticket, Status.REJECTED, QUEUE_FULL)

    def _route_fork(self, ticket: Ticket, now: float) -> None:
        """A FORK child goes to its parent's entry's worker, or ends with the reason why not."""
        credit = ticket.credit
        table = self.table
        entry = table.resolve(credit.parent_correlation_id)  # type: ignore[arg-type]
        child = credit.x_correlation_id
        alias = table.aliases.get(child)
        if child in table.entries or (alias is not None and entry is not alias.entry):
            self._end(ticket, Status.REJECTED, f"{INVALID_CREDIT}: {_TAKEN}")
            return
        if entry is None:
            reason = PARENT_UNAVAILABLE
            if child in table.tombstones:
                reason = _EVICTION_REASONS[table.tombstones[child]]
            self._end(ticket, Status.REJECTED, reason)
            return
        self.stats.sticky_hits += 1
        self._to_worker(ticket, entry.worker, now)

    def _to_worker(self, ticket: Ticket, worker: Worker, now: float) -> None:
        """Dispatch to ``worker`` now, or queue for it (full, suspect, or others waiting)."""
        if (
            len(worker.tickets) < worker.capacity
            and not worker.queue
            and worker.state is not WorkerState.SUSPECT
        ):
            self._dispatch(ticket, worker, now)
        elif len(worker.queue) < self.worker_queue_limit:
            ticket.worker = worker
            worker.queue.append(ticket)
        else:
            self._end(ticket, Status.REJECTED, QUEUE_FULL)

    def _dispatch(self, ticket: Ticket, worker: Worker, now: float) -> None:
        """Hand ``ticket`` to ``worker``: entry book-keeping of §3, then load accounting."""
        credit = ticket.credit
        if ticket.booked or not self.sticky:
            pass  # handed back undelivered once: its book-keeping stands (or there is none)
        elif credit.branch_mode is _FORK:
            self._book_fork(credit, worker, now)
        elif credit.turn_index + 1 < credit.num_turns or credit.fork_count:
            self._book_session(credit, worker, now)
        else:
            # A final turn without forks: evict the entry if there is one (no entry, no cost,
            # for the dominant single-turn case).
            entry = self.table.entries.get(credit.x_correlation_id)
            if entry is not None and not entry.parent_final_seen:
                if self.table.end_own(entry):
                    self.table.remove(entry, None)
                else:
                    self.table.touch(entry, now)
        ticket.worker = worker
        ticket.dispatched_at = now
        worker.tickets.add(ticket)
        worker.sent += 1
        worker.dispatched += 1
        self._seq += 1
        worker.seq = self._seq
        self.stats.dispatched += 1
        pending = worker.pending
        if not pending:
            self._dirty.append(worker)
            pending[ticket.producer] = [credit]
        else:
            bucket = pending.get(ticket.producer)
            if bucket is None:
                pending[ticket.producer] = [credit]
            else:
                bucket.append(credit)

    def _book_fork(self, credit: Credit, worker: Worker, now: float) -> None:
        """A FORK child turn: claim the child's reservation on first sight, add its own."""
        table = self.table
        parent: str = credit.parent_correlation_id  # type: ignore[assignment]
        entry = table.resolve(parent)
        assert entry is not None, "routed FORK credits have a parent entry"
        assert entry.worker is worker, "FORK credits go to the parent's worker"
        child = credit.x_correlation_id
        if child not in table.aliases and not table.start_child(entry, parent, child):
            self.stats.undeclared_forks += 1
        if credit.fork_count:
            table.reserve(entry, child, credit.fork_count)
        table.touch(entry, now)

    def _book_session(self, credit: Credit, worker: Worker, now: float) -> None:
        """An own-keyed turn that needs an entry: create or refresh it, then apply §3."""
        table = self.table
        key = credit.x_correlation_id
        entry = table.entries.get(key)
        if entry is None:
            if len(table.entries) >= table.max_sessions:
                self._evict_oldest(now)
            entry = table.create(key, worker, now)
        else:
            table.touch(entry, now)
        if credit.fork_count:
            # Reserve first, so a forking final turn never passes through zero.
            table.reserve(entry, key, credit.fork_count)
        if credit.turn_index + 1 >= credit.num_turns and table.end_own(entry):
            table.remove(entry, None)

    def _refill(self, worker: Worker, now: float) -> None:
        """A slot may have opened on ``worker``: serve its queue, then the global queue."""
        if worker.state is WorkerState.SUSPECT or worker.state is WorkerState.GONE:
            return
        waiting = worker.queue
        tickets = worker.tickets
        while waiting and len(tickets) < worker.capacity:
            ticket = waiting.popleft()
            credit = ticket.credit
            fork = credit.branch_mode is _FORK
            key: str = credit.parent_correlation_id if fork else credit.x_correlation_id  # type: ignore[assignment]
            entry = self.table.resolve(key)
            if (entry is not None and entry.worker is not worker) or (
                entry is None and (fork or key in self.table.tombstones)
            ):
                # Its session moved (or ended) while it waited: route it afresh, which sends
                # it where its session is now, or ends it with the reason.
                ticket.worker = None
                ticket.booked = False
                self._route(ticket, now)
                continue
            self._dispatch(ticket, worker, now)
        queue = self.queue
        index = self.index
        while queue:
            best = index.peek()
            if best is None or len(best.tickets) >= best.capacity:
                break
            self._dispatch(queue.popleft(), best, now)

    def _reindex(self, worker: Worker) -> None:
        """``worker``'s key may have shrunk: refresh it in the index if it takes new sessions."""
        if worker.state is WorkerState.ACTIVE:
            self.index.add(worker)

    def _maybe_rehome(self, entry: Entry, gap: float) -> Worker:
        worker = entry.worker
        best = self.index.peek()
        if (
            best is None
            or best is worker
            or len(worker.tickets) / worker.capacity - len(best.tickets) / best.capacity <= gap
        ):
            return worker
        del worker.sessions[entry.key]
        best.sessions[entry.key] = entry
        entry.worker = best
        self.stats.rehomes += 1
        self._effects.to_worker.append(
            (worker.name, EndSession(x_correlation_id=entry.key, reason="rehomed"))
        )
        self._reindex(worker)
        return best

    def _spawn_target(self, credit: Credit) -> Worker | None:
        parent = credit.parent_correlation_id
        entry = self.table.resolve(parent) if parent is not None else None
        if entry is None:
            return None
        home = entry.worker
        best = self.index.peek()
        if home.state is not WorkerState.ACTIVE or len(home.tickets) >= home.capacity:
            return None
        slack = self.spawn_affinity_slack or 0.0
        if best is not None and len(home.tickets) / home.capacity > (
            len(best.tickets) / best.capacity + slack
        ):
            return None
        return home

    def _maybe_evict(self, entry: Entry, *, notify: bool = True) -> None:
        """Evict ``entry`` if nothing holds it any more; tell its worker, which may still keep
        the session's history for FORK children that will now never start."""
        if entry.ref_count == 0 and entry.key in self.table.entries:
            worker = entry.worker
            self.table.remove(entry, None)
            if notify:
                self._effects.to_worker.append(
                    (worker.name, EndSession(x_correlation_id=entry.key, reason="released"))
                )
            self._reindex(worker)

    def _evict(self, entry: Entry, reason: str) -> None:
        worker = entry.worker
        self.stats.evictions[reason] += 1
        self._effects.to_worker.append(
            (worker.name, EndSession(x_correlation_id=entry.key, reason=reason))
        )
        self.table.remove(entry, reason)
        self._reindex(worker)

    def _evict_oldest(self, now: float) -> None:
        oldest = self.table.oldest()
        if oldest is not None:
            self._evict(oldest, "capacity")

    def _expire_sessions(self, now: float) -> None:
        horizon = now - self.session_idle_ttl_s
        table = self.table
        while True:
            oldest = table.oldest()
            if oldest is None or oldest.last_used > horizon:
                return
            self._evict(oldest, "idle")

    def _lose(self, worker: Worker, reason: str, now: float, *, disconnect: bool = True) -> None:
        """``worker`` is gone: account for its credits, sessions and queue (§6)."""
        worker.state = WorkerState.GONE
        self.index.discard(worker)
        del self.workers[worker.name]
        self.stats.workers_lost += 1
        self.stats.departures[reason] = self.stats.departures.get(reason, 0) + 1
        if disconnect:
            self._effects.disconnect.append(worker.name)
        # Credits chosen for it but not yet sent leave with the rest of its in-flight set.
        worker.pending = {}
        for ticket in list(worker.tickets):
            self._end(ticket, Status.LOST, reason)
        worker.tickets.clear()
        for entry in list(worker.sessions.values()):
            self.stats.evictions[reason] += 1
            self.table.remove(entry, reason)
        waiting = list(worker.queue)
        worker.queue.clear()
        for ticket in waiting:
            # Its book-keeping went with the worker's entries: route it as if new.
            ticket.worker = None
            ticket.booked = False
            self._route(ticket, now)

    def _end(self, ticket: Ticket, status: Status, reason: str) -> None:
        """Emit the one outcome of ``ticket`` and forget it."""
        credit = ticket.credit
        producer = ticket.producer
        del self.ledgers[producer][credit.id]
        worker = ticket.worker
        dispatched = ticket.dispatched_at >= 0
        if dispatched and worker is not None:
            worker.tickets.discard(ticket)
            if credit.fork_count:
                self._drop_declared(credit)
        elif credit.branch_mode is _FORK and credit.turn_index == 0:
            # A FORK child that never started gives its reservation back.
            parent: str = credit.parent_correlation_id  # type: ignore[assignment]
            entry = self.table.resolve(parent)
            if entry is not None and credit.x_correlation_id not in self.table.aliases:
                self.table.unreserve(entry, parent, 1)
                self._maybe_evict(entry)
        self.stats.outcomes[status] += 1
        if status is not _COMPLETED:
            self.stats.count_reason(status, reason)
        if dispatched and worker is not None:
            worker.outcomes[status] = worker.outcomes.get(status, 0) + 1
        outcome = Outcome(
            credit_id=credit.id,
            status=status,
            reason=reason,
            worker=worker.name if worker is not None and dispatched else "",
            submit_to_dispatch_s=(ticket.dispatched_at - ticket.submitted_at)
            if dispatched
            else None,
            subagent_type=credit.subagent_type,
        )
        self._effects.outcomes.setdefault(producer, []).append(outcome)

    def _drop_declared(self, credit: Credit) -> None:
        """A declaring turn did not complete: the children it declared will never start."""
        node = credit.x_correlation_id
        entry = self.table.resolve(node)
        if entry is not None:
            self.table.unreserve(entry, node, credit.fork_count)
            self._maybe_evict(entry)

    def shutdown(self, now: float) -> None:
        """End every credit still queued (``rejected: router_shutdown``) or in flight (lost)."""
        for ticket in list(self.queue):
            self._end(ticket, Status.REJECTED, SHUTDOWN)
        self.queue.clear()
        for worker in list(self.workers.values()):
            for ticket in list(worker.queue):
                self._end(ticket, Status.REJECTED, SHUTDOWN)
            worker.queue.clear()
            revoked: dict[str, list[int]] = {}
            for ticket in list(worker.tickets):
                revoked.setdefault(ticket.producer, []).append(ticket.credit.id)
                self._end(ticket, Status.LOST, SHUTDOWN)
            for producer, ids in revoked.items():
                # Tell the worker: it stops them and never reports them (so the next router
                # incarnation never forwards a second outcome for them).
                self._effects.to_worker.append(
                    (worker.name, Cancel(producer=producer, credit_ids=ids, revoked=True))
                )

    def __repr__(self) -> str:
        in_flight = sum(len(w.tickets) for w in self.workers.values())
        return (
            f"<RouterCore workers={len(self.workers)} in_flight={in_flight} "
            f"queued={len(self.queue)} sessions={len(self.table.entries)} "
            f"aliases={len(self.table.aliases)}>"
        )


def _awake_state(worker: Worker) -> WorkerState:
    """The state a suspect worker returns to when it speaks again."""
    return WorkerState.DRAINING if worker.draining else WorkerState.ACTIVE


def _validate(credit: Credit) -> str | None:
    """Why ``credit`` cannot be routed, or ``None``. Cheap checks first: this is the hot path."""
    if not credit.x_correlation_id:
        return "x_correlation_id is empty"
    if credit.num_turns < 1 or not 0 <= credit.turn_index < credit.num_turns:
        return f"turn_index {credit.turn_index} is outside num_turns {credit.num_turns}"
    if credit.fork_count < 0:
        return f"fork_count {credit.fork_count} is negative"
    if credit.branch_mode is _FORK:
        if credit.subagent_type is not None:
            return "subagent_type is only allowed on SPAWN children, not on FORK"
        if not credit.parent_correlation_id:
            return "a FORK child needs parent_correlation_id"
    return None
