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
migrates or rejects them by ``allow_migration`` (§6). A dispatched credit is never taken back:
frames the transport could not hand over yet are the service's peer link's to hold.

Producers and their sessions
----------------------------
The core's producer key is ``name/incarnation`` (from ``ProducerHello``). A session belongs to the
producer that started it: every session table (entries, aliases, tombstones, reservations, FORK
parent resolution) is that producer's own (``table.Sessions``), so another producer's credits,
``EndSession``, ``ReleaseReservation`` or final turn with the same ``x_correlation_id`` never touch
it, and every ``EndSession`` the core sends a worker names the producer.

A producer restart is a *new producer*: its new incarnation is another key, with an empty ledger
and no sessions. The service calls ``producer_gone(old_key)`` when a new incarnation of the same
name (or the same routing id) says hello, or when the producer is silent too long; the core then
cancels its queued credits at once, asks the workers to cancel its dispatched ones (their
completions still end them, and their outcomes still go to ``Effects.outcomes``, which the service
discards), and ends all its sessions, telling each worker to drop their histories. A producer that
never sends ``EndSession`` leaks nothing: an entry goes when its final turn is dispatched and its
FORK children end, or when the producer is gone (or, as a safety net, when idle).

Worker identity and connections
-------------------------------
A worker name is held by one live incarnation (§6). A hello from another incarnation while the
holder is active or draining is refused (``Refusal.code`` ``name_in_use``) and changes nothing;
once the holder is suspect (silent, or its connection closed) the newcomer replaces it and the
old incarnation is lost and fenced: its later hellos are refused ``superseded`` (a bounded
record per name). ``worker_closed`` (the transport saw the connection close) makes a worker
suspect at once and lost ``closed_grace_s`` later unless it speaks or says hello again first.

Order of what workers are told
------------------------------
``Effects.to_worker`` is one list, per worker in causal order: a ``Welcome`` before the first
dispatch, a dispatch before the ``EndSession`` or ``Cancel`` that follows it. Consecutive dispatches
of one producer to one worker coalesce into one chunk; any control message to that worker closes
the open chunk first.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from typing import Final, NamedTuple, TypeAlias

from credit_common.histogram import WAIT_BUCKETS_S, Histogram
from protocol.messages import (
    MAX_IDS,
    BranchMode,
    Cancel,
    Completion,
    Credit,
    Drain,
    EndSession,
    ErrorReport,
    Outcome,
    ProducerAdopted,
    ProducerFirstToken,
    Refusal,
    RouterToProducer,
    RouterToWorker,
    Status,
    Welcome,
)
from router_service.core.table import NO_HISTORY, Entry, Sessions, SessionTable
from router_service.core.workers import LoadIndex, Ticket, TicketQueue, Worker, WorkerState

__all__ = ["CoreStats", "Effects", "RouterCore", "ToWorker"]

ToWorker: TypeAlias = RouterToWorker | tuple[str, list[Credit]]
"""One item for a worker: a control message, or a dispatch chunk ``(producer, credits)``."""

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
PRODUCER_GONE: Final = "producer_gone"

# Refusal codes (docs/PROTOCOL.md §7.2).
VERSION_MISMATCH: Final = "version_mismatch"
INVALID_CAPACITY: Final = "invalid_capacity"
NAME_IN_USE: Final = "name_in_use"
SUPERSEDED: Final = "superseded"
_REFUSAL_CODES: Final = (VERSION_MISMATCH, INVALID_CAPACITY, NAME_IN_USE, SUPERSEDED)
_SUPERSEDED_KEPT: Final = 8
"""Superseded incarnations remembered per worker name (the fence's memory is bounded)."""
_ADOPTED_ENDED_KEPT: Final = 65_536
"""Adopted credits ended here that are remembered, so that a repeat of one's completion is a
duplicate (the oldest is forgotten first: the memory is bounded; a repeat older than that is
forwarded like any ``Recovered`` completion, and the producer drops it as unmatched)."""

ROUTER_REASONS: Final = frozenset(
    {
        PARENT_UNAVAILABLE, SESSION_LOST, SESSION_EXPIRED, SESSION_EVICTED, WORKER_LOST,
        WORKER_LEFT, ORPHANED, QUEUE_FULL, QUEUE_TIMEOUT, INVALID_CREDIT, CANCELLED, SHUTDOWN,
        DRAINING, SESSION_UNKNOWN, "router_restarted", "stale_incarnation",
    }
)  # fmt: skip
"""Reasons the router itself gives; any other is a worker's own words."""


def reason_label(status: str, reason: str) -> str:
    """A metric label for an outcome's reason, from a bounded set.

    The router's own reasons (``ROUTER_REASONS``, detail after a ``:`` dropped) stay as they
    are; a worker's free text becomes ``worker_error`` (failed) or ``worker`` (other
    statuses), so the label never takes more than ~20 values.
    """
    head = reason.split(":", 1)[0].strip()
    if head in ROUTER_REASONS:
        return head
    if not head:
        return "none"
    return "worker_error" if status == "failed" else "worker"


_TAKEN: Final = "x_correlation_id is already another session's (each session needs its own)"

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
        self.recovered = 0
        """Outcomes forwarded for credits an earlier router incarnation dispatched."""
        self.adopted = 0
        """Credits of an earlier router incarnation taken over from a worker's ``Hello``."""
        self.adoptions_refused = 0
        """Credits a worker's first ``Hello`` listed that were not adopted: beyond the
        capacity it declared (it cannot be running them all), or already known here."""
        self.adoptions_displaced = 0
        """Adopted credits that ended without an outcome because their producer submitted a
        credit with the same id: its own submission wins (the claim was a confused or hostile
        worker's, or a credit the producer had given up already)."""
        self.undelivered = 0
        """Dispatch frames the transport could not hand over yet; the service's peer link
        holds them (the core never takes a dispatch back) and counts them here."""
        self.loop_stalls = 0
        self.workers_lost = 0
        self.refusals = 0
        self.refusals_by_code: dict[str, int] = dict.fromkeys(_REFUSAL_CODES, 0)
        """Refused hellos by ``Refusal.code``."""
        self.producers_gone = 0
        self.closed_connections = 0
        """Times the transport saw a worker's connection close."""
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

    __slots__ = ("departed", "disconnect", "first_tokens", "outcomes", "to_producer", "to_worker")

    def __init__(self) -> None:
        self.to_worker: list[tuple[str, ToWorker]] = []
        """``(worker, item)`` in causal order per worker. ``item`` is a control message, or a
        dispatch chunk ``(producer, credits)`` (consecutive dispatches of one producer to one
        worker, coalesced). A ``Refusal`` is addressed to the peer whose hello was refused,
        which is not the name's holder."""
        self.outcomes: dict[str, list[Outcome]] = {}
        """Outcomes by producer."""
        self.first_tokens: dict[str, list[ProducerFirstToken]] = {}
        self.to_producer: list[tuple[str, RouterToProducer]] = []
        self.disconnect: list[str] = []
        """Workers the transport should forget (lost or left), and not admitted again later in
        the same batch (a hello after a goodbye in one wake-up keeps its name mapped)."""
        self.departed: list[Departure] = []
        """Workers that left the fleet, with why and what they took with them (for the log)."""

    def __bool__(self) -> bool:
        return bool(
            self.outcomes
            or self.first_tokens
            or self.to_worker
            or self.to_producer
            or self.disconnect
            or self.departed
        )


class Departure(NamedTuple):
    """A worker that left the fleet: lost (silent, unreachable, closed, replaced) or gone."""

    name: str
    reason: str
    """The outcome reason of its credits (``worker_lost``, ``worker_left``, …)."""
    credits: int
    """Credits it held, ended with ``reason``."""
    sessions: int
    """Sticky sessions that were on it (their next turn is rejected or migrates)."""


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
        closed_grace_s: float = 1.0,
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
            session_idle_ttl_s: an entry without activity (dispatch or completion) for this
                long, and with no credit in flight, is evicted.
            queue_limit: credits that may wait for any worker (new sessions) at once.
            worker_queue_limit: credits that may wait for one particular worker at once.
            heartbeat_interval_s: the beat both sides send; silence is measured in these.
            suspect_after_missed: silent intervals after which a worker gets nothing new.
            lost_after_s: silence after which a worker is lost (the grace period).
            closed_grace_s: after the transport saw a worker's connection close, how long it
                may take to speak or say hello again before it is lost.
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
        if closed_grace_s < 0:
            raise ValueError("closed_grace_s must be >= 0")
        self.protocol_version = protocol_version
        self.router_incarnation = router_incarnation
        self.sessions = Sessions(max_sessions)
        """Every producer's session table."""
        self._tables = self.sessions.tables
        self.session_idle_ttl_s = session_idle_ttl_s
        self.queue_limit = queue_limit
        self.worker_queue_limit = worker_queue_limit
        self.heartbeat_interval_s = heartbeat_interval_s
        self.suspect_after_s = heartbeat_interval_s * suspect_after_missed
        self.lost_after_s = max(lost_after_s, self.suspect_after_s)
        self.closed_grace_s = closed_grace_s
        self.inflight_report_interval_s = inflight_report_interval_s
        self.soft_affinity_gap = soft_affinity_gap
        self.spawn_affinity_slack = spawn_affinity_slack
        self.stats = CoreStats()
        self.observe_latency = observe_latency
        self.sticky = sticky
        self.queue_timeout_s = queue_timeout_s
        self.workers: dict[str, Worker] = {}
        self.index = LoadIndex()
        self.queue = TicketQueue()
        """Credits of new sessions waiting for any worker."""
        self.ledgers: dict[str, dict[int, Ticket]] = {}
        self.last_refusal: Refusal | None = None
        """The ``Refusal`` of the last refused hello (``None`` after an admitted one)."""
        self._holders: dict[str, str] = {}
        """Worker name -> the incarnation that last held it (kept after it is lost)."""
        self._adopted_ended_kept = _ADOPTED_ENDED_KEPT
        """The bound of ``_adopted_ended`` (an attribute, not the constant, so that a test can
        lower it on a compiled build too: mypyc inlines module constants)."""
        self._adopted_ended: dict[tuple[str, int], None] = {}
        """Adopted credits this router ended (completed, lost with their worker, shut
        down): a later ``Recovered`` completion of one is a duplicate."""
        self._superseded: dict[str, deque[str]] = {}
        """Worker name -> incarnations that a newer one replaced (fenced; bounded)."""
        self._effects = Effects()
        self._dirty: list[Worker] = []
        """Workers with an open dispatch chunk in ``_effects``."""
        self._seq = 0
        self._joins = 0
        self._last_tick = now
        self.accepting = True
        """False while the router drains: new credits are rejected ``router_draining``."""

    def table_of(self, producer: str) -> SessionTable | None:
        """``producer``'s session table, if it has one (for status pages and tests)."""
        return self._tables.get(producer)

    # ------------------------------------------------------------------ effects

    def take_effects(self) -> Effects:
        """Everything to send since the last call; the core starts a fresh ``Effects``."""
        effects = self._effects
        for worker in self._dirty:
            worker.chunk = None
        self._dirty = []
        self._effects = Effects()
        return effects

    def _control(self, name: str, msg: RouterToWorker) -> None:
        """Queue a control message for worker ``name``, after everything sent to it so far."""
        worker = self.workers.get(name)
        if worker is not None:
            worker.chunk = None  # later credits open a new chunk, after this message
        self._effects.to_worker.append((name, msg))

    # ---------------------------------------------------------------- producers

    def submit(self, producer: str, credits: Iterable[Credit], now: float) -> None:
        """Accept credits of ``producer`` (key ``name/incarnation``); each will get exactly
        one outcome."""
        ledger = self.ledgers.get(producer)
        if ledger is None:
            ledger = self.ledgers[producer] = {}
        stats = self.stats
        for credit in credits:
            cid = credit.id
            held = ledger.get(cid)
            if held is not None and held.adopted:
                self._displace(held, now)
            elif held is not None:
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
        """Cancel credits: queued ones end here (O(1) each), dispatched ones are cancelled at
        their worker."""
        ledger = self.ledgers.get(producer)
        if ledger is None:
            return
        forward: dict[str, list[int]] = {}
        for cid in credit_ids:
            ticket = ledger.get(cid)
            if ticket is None:
                continue
            if ticket.dispatched_at < 0:
                self._end(ticket, Status.CANCELLED, CANCELLED)
            else:
                assert ticket.worker is not None
                forward.setdefault(ticket.worker.name, []).append(cid)
        for worker, ids in forward.items():
            for lo in range(0, len(ids), MAX_IDS):
                self._control(worker, Cancel(producer=producer, credit_ids=ids[lo : lo + MAX_IDS]))

    def end_session(self, producer: str, session: str, now: float, reason: str = "") -> None:
        """``producer`` gives up its ``session`` (§3: "or the producer ends it").

        It will send no more turns of it and start no more FORK children from it, so the
        session's unclaimed reservations are released too; children already started go on.
        Another producer's session with the same id is not touched.
        """
        table = self._tables.get(producer)
        if table is None:
            return
        table.tombstones.pop(session, None)
        entry = table.resolve(session)
        if entry is None:
            return
        table.unreserve(entry, session, entry.ref_count)
        if entry.key == session:
            table.end_own(entry)
        else:
            table.end_child(session)
        self._control(
            entry.worker.name,
            EndSession(x_correlation_id=session, reason=reason or "ended", producer=producer),
        )
        self._maybe_evict(entry, notify=session != entry.key)

    def release_reservation(self, producer: str, session: str, count: int, now: float) -> None:
        """Give back FORK reservations that ``producer``'s ``session`` declared and will not
        use."""
        table = self._tables.get(producer)
        entry = table.resolve(session) if table is not None else None
        if table is None or entry is None or count <= 0:
            return
        table.unreserve(entry, session, count)
        self._maybe_evict(entry)

    def producer_gone(self, producer: str, now: float) -> None:
        """``producer`` (a ``name/incarnation`` key) is gone for good (a new incarnation said
        hello, or it was silent too long).

        Its queued credits end ``cancelled`` here; its dispatched ones are cancelled at their
        workers (their completions still end them, outcomes still go to ``Effects.outcomes``).
        All its sessions end — entries, FORK aliases, reservations, tombstones — and each
        worker is told to drop their histories (``EndSession`` naming the producer).
        """
        self.stats.producers_gone += 1
        ledger = self.ledgers.get(producer)
        if ledger:
            self.cancel(producer, list(ledger), now)
        table = self.sessions.tables.pop(producer, None)
        if table is None:
            return
        for entry in list(table.entries.values()):
            worker = entry.worker
            ended = [entry.key, *(entry.aliases or ())]
            for session in ended:
                self._control(
                    worker.name,
                    EndSession(x_correlation_id=session, reason=PRODUCER_GONE, producer=producer),
                )
            table.remove(entry, None)
            self._reindex(worker)
        table.tombstones.clear()

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
    ) -> bool:
        """A worker says hello. Returns whether it was admitted.

        Refused (a ``Refusal`` is queued for the sender, ``last_refusal`` names it and
        ``stats.refusals_by_code`` counts it): another protocol version
        (``version_mismatch``), a capacity below 1 (``invalid_capacity``), an incarnation a
        newer one replaced (``superseded``), or a new incarnation while the name's holder is
        live, i.e. active or draining (``name_in_use``; the holder keeps everything). The same
        incarnation again keeps everything (§6); a new one replaces a suspect or closed holder,
        which is then lost.
        """
        if protocol_version != self.protocol_version:
            return self._refuse(
                name,
                VERSION_MISMATCH,
                f"protocol version mismatch: router speaks {self.protocol_version}, "
                f"worker speaks {protocol_version}",
                protocol_version,
            )
        if capacity < 1:
            return self._refuse(
                name,
                INVALID_CAPACITY,
                f"invalid capacity {capacity}: must be >= 1",
                protocol_version,
            )
        if incarnation in self._superseded.get(name, ()):
            return self._refuse(
                name,
                SUPERSEDED,
                f"worker {name!r} incarnation {incarnation!r} was superseded by incarnation "
                f"{self._holders.get(name, '')!r}: a replaced process may not take its name back",
                protocol_version,
            )
        known = self.workers.get(name)
        if (
            known is not None
            and known.incarnation != incarnation
            and known.state is not WorkerState.SUSPECT
        ):
            return self._refuse(
                name,
                NAME_IN_USE,
                f"worker name {name!r} is held by live incarnation {known.incarnation!r}; "
                f"incarnation {incarnation!r} may not take it (two processes with one name?)",
                protocol_version,
            )
        self.last_refusal = None
        welcome = Welcome(
            router_incarnation=self.router_incarnation,
            protocol_version=self.protocol_version,
            heartbeat_interval_s=self.heartbeat_interval_s,
            inflight_report_interval_s=self.inflight_report_interval_s,
        )
        disconnect = self._effects.disconnect
        if name in disconnect:
            # It left (or was lost) earlier in this same batch and is admitted again: the
            # transport must not forget the name the service is about to map to this peer.
            self._effects.disconnect = [n for n in disconnect if n != name]
        if known is not None and known.incarnation == incarnation:
            # The same process reconnecting within the grace period keeps everything (§6).
            known.last_seen = now
            known.closed_until = None
            known.labels = labels
            if known.capacity != capacity:
                known.capacity = capacity
            if known.state is WorkerState.SUSPECT:
                known.state = _awake_state(known)
            # resumed: this router still holds its state (sessions, credits, completions).
            self._control(
                name,
                Welcome(
                    router_incarnation=self.router_incarnation,
                    protocol_version=self.protocol_version,
                    heartbeat_interval_s=self.heartbeat_interval_s,
                    inflight_report_interval_s=self.inflight_report_interval_s,
                    resumed=True,
                ),
            )
            self._reindex(known)  # before anything is routed: its capacity may have changed
            self.worker_report(name, in_flight, now)
            self._refill(known, now)
            return True
        previous = known.incarnation if known is not None else self._holders.get(name)
        if previous is not None and previous != incarnation:
            fenced = self._superseded.get(name)
            if fenced is None:
                fenced = self._superseded[name] = deque(maxlen=_SUPERSEDED_KEPT)
            fenced.append(previous)
        if known is not None:
            # A new incarnation of the same name is a new worker; the old one (suspect or
            # closed) is lost. The name now belongs to the new one, so the transport keeps it.
            self._lose(known, WORKER_LOST, now, disconnect=False)
        self._holders[name] = incarnation
        worker = Worker(name, incarnation, capacity, labels, self._joins, now)
        self._joins += 1
        active = [w.sent for w in self.workers.values()]
        # A late joiner starts at the fleet mean so it is not flooded by the tie-break.
        worker.sent = sum(active) // len(active) if active else 0
        self.workers[name] = worker
        self._adopt(worker, previous, in_flight, now)  # (before the index sees its load)
        self.index.add(worker)
        self._control(name, welcome)  # before any dispatch to it
        self._refill(worker, now)
        return True

    def _adopt(
        self, worker: Worker, previous: str | None, in_flight: dict[str, list[int]], now: float
    ) -> None:
        """Take over the credits a worker's first hello to this router lists: a predecessor
        router dispatched them (this one has no record of them), and they still run. Each
        gets a ticket on that worker, so it counts against its capacity and gets exactly one
        outcome here (its completion, recovered; or ``lost`` with the worker), and its
        producer is told (``ProducerAdopted``) not to give it up as the old router's.

        Only a first hello of the worker incarnation qualifies: an incarnation this router
        already knew (declared lost, and back) lists credits this router ended already.

        What a hello may claim is bounded, as it comes from a peer that may be confused or
        hostile: no credit this router already tracks (another worker's, or a queued one), no
        adopted credit it already ended, and at most the worker's declared ``capacity`` (a
        worker runs no more than that; the rest are counted in ``adoptions_refused`` and
        their producers give them up after the recovery grace, as without adoption). And a
        claim never outranks the producer: if it submits a credit with an adopted id, its
        submission wins (``_displace``)."""
        if previous == worker.incarnation or not in_flight:
            return  # (``previous``: the incarnation that held the name here before)
        adopted_ended = self._adopted_ended
        room = worker.capacity - len(worker.tickets)
        refused = 0
        for producer, ids in in_flight.items():
            ledger = self.ledgers.get(producer)
            taken: list[int] = []
            for cid in ids:
                if (ledger is not None and cid in ledger) or (producer, cid) in adopted_ended:
                    refused += 1
                    continue
                if room <= 0:
                    refused += 1
                    continue
                if ledger is None:
                    ledger = self.ledgers[producer] = {}
                room -= 1
                ticket = Ticket(producer, Credit(id=cid, x_correlation_id=""), now)
                ticket.dispatched_at = now
                ticket.worker = worker
                ticket.adopted = True
                ledger[cid] = ticket
                worker.tickets[ticket] = None
                taken.append(cid)
            if taken:
                self.stats.adopted += len(taken)
                for lo in range(0, len(taken), MAX_IDS):
                    self._effects.to_producer.append(
                        (producer, ProducerAdopted(credit_ids=taken[lo : lo + MAX_IDS]))
                    )
        self.stats.adoptions_refused += refused

    def _displace(self, ticket: Ticket, now: float) -> None:
        """``ticket`` was adopted, and its producer now submits a credit with its id: the
        producer's submission wins. Each credit id of a producer names one credit at a time,
        and the producer never submits an id it still awaits, so the adopted claim was a
        confused or hostile worker's, or names a credit its producer has given up already
        (its recovery grace passed): either way no outcome of it may reach the producer,
        which would take it for the new credit's. It ends silently (counted in
        ``adoptions_displaced``); a later completion of it from its worker is a duplicate."""
        self.stats.adoptions_displaced += 1
        self._remember_adopted(ticket)
        del self.ledgers[ticket.producer][ticket.credit.id]
        worker = ticket.worker
        assert worker is not None
        del worker.tickets[ticket]
        ticket.worker = None
        self._reindex(worker)
        self._refill(worker, now)

    def _refuse(self, name: str, code: str, reason: str, peer_version: int) -> bool:
        refusal = Refusal(
            reason=reason,
            router_version=self.protocol_version,
            peer_version=peer_version,
            code=code,
        )
        self.stats.refusals += 1
        self.stats.refusals_by_code[code] += 1
        self.last_refusal = refusal
        # Not ``_control``: it is for the refused peer, and must not close the holder's chunk.
        self._effects.to_worker.append((name, refusal))
        return False

    def worker_seen(self, name: str, now: float) -> float:
        """Any message from ``name`` arrived: it is alive (§6: any message counts).

        Returns the silence it ends, in seconds, if that silence had made the worker suspect
        (so the service can say it answered again); 0.0 otherwise.
        """
        worker = self.workers.get(name)
        if worker is None:
            return 0.0
        silence = max(now - worker.last_seen, 0.0) if worker.state is WorkerState.SUSPECT else 0.0
        worker.last_seen = now
        worker.closed_until = None
        if worker.state is WorkerState.SUSPECT:
            worker.state = _awake_state(worker)
            self._reindex(worker)
            self._refill(worker, now)
        return silence

    def worker_closed(self, name: str, now: float) -> None:
        """The transport saw ``name``'s connection close (§6).

        It is suspect at once (nothing new is sent to it; its credits stay dispatched, as the
        peer link keeps what it could not hand over), and lost ``closed_grace_s`` later unless
        it speaks or says hello again (the same incarnation keeps everything).
        """
        worker = self.workers.get(name)
        if worker is None:
            return
        self.stats.closed_connections += 1
        if worker.closed_until is None:
            worker.closed_until = now + self.closed_grace_s
        if worker.state is not WorkerState.SUSPECT:
            self.stats.suspicions += 1
            worker.state = WorkerState.SUSPECT
            self.index.discard(worker)

    def complete(self, name: str, completions: Iterable[Completion], now: float) -> None:
        """Completions from worker ``name``: each ends its credit unless it already ended."""
        worker = self.workers.get(name)
        stats = self.stats
        if worker is None:
            stats.duplicate_completions += sum(1 for _ in completions)
            return
        ledgers = self.ledgers
        outcomes = self._effects.outcomes
        counts = stats.outcomes
        tickets = worker.tickets
        by_worker = worker.outcomes
        # The two latency histograms, observed inline (a method call each cost ~10 % of this
        # loop): bucket counts and sums, as ``Histogram.observe`` keeps them.
        observe = self.observe_latency
        waited = stats.submit_to_dispatch_s
        held = stats.dispatch_to_outcome_s
        waited_bounds, waited_counts = waited.bounds, waited.counts
        held_bounds, held_counts = held.bounds, held.counts
        waited_sum = held_sum = 0.0
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
            del tickets[ticket]
            status = done.status
            counts[status] += 1
            by_worker[status] = by_worker.get(status, 0) + 1
            if status is not _COMPLETED:
                stats.count_reason(status, done.reason)
            wait = ticket.dispatched_at - ticket.submitted_at
            run = now - ticket.dispatched_at
            adopted = ticket.adopted  # (its submission and dispatch times are unknown here)
            if observe and not adopted:
                waited_counts[bisect_left(waited_bounds, wait)] += 1
                waited_sum += wait
                held_counts[bisect_left(held_bounds, run)] += 1
                held_sum += run
            credit = ticket.credit
            entry = ticket.entry
            if entry is not None:
                # Its latest activity (no re-ordering: see ``_expire_sessions``).
                entry.busy -= 1
                entry.last_used = now
                if status is _COMPLETED:
                    entry.has_history = True
            if credit.fork_count or done.session_ended or adopted:
                self._ended_on(name, ticket, done, now)
            outcome = Outcome(
                credit_id=done.credit_id,
                status=status,
                reason=done.reason,
                worker=name,
                submit_to_dispatch_s=None if adopted else wait,
                dispatch_to_outcome_s=None if adopted else run,
                ttft_s=done.ttft_s,
                subagent_type=ticket.credit.subagent_type,
                result=done.result,
            )
            bucket = outcomes.get(producer)
            if bucket is None:
                outcomes[producer] = [outcome]
            else:
                bucket.append(outcome)
        waited.sum += waited_sum
        held.sum += held_sum
        self._reindex(worker)
        if worker.queue.live or self.queue.live:
            self._refill(worker, now)

    def _ended_on(self, name: str, ticket: Ticket, done: Completion, now: float) -> None:
        """The rarer consequences of a completion: an adopted credit is remembered (a repeat
        of its completion is a duplicate); a declaring turn that did not complete gives its
        reservations back; a FORK child whose session the worker dropped is released."""
        if ticket.adopted:
            self._remember_adopted(ticket)
            return  # (it holds no session: its credit is only an id)
        producer, credit = ticket.producer, ticket.credit
        if done.status is not _COMPLETED and credit.fork_count:
            self._drop_declared(producer, credit)
        if done.session_ended and credit.branch_mode is _FORK:
            # The worker dropped this FORK child's session: that is its release (the
            # ChildRelease message may be lost with a connection; this one is acked).
            self.child_release(name, producer, credit.x_correlation_id, now)

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
            if (done.producer, done.credit_id) in self._adopted_ended:
                stats.duplicate_completions += 1  # adopted here, and already ended here
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
        """FORK session ``child`` of ``producer`` ended on worker ``name``: drop its count
        (idempotent).

        Only the worker that holds the child's entry may end it, and only the producer's own
        child (``ChildRelease.producer``) is touched.
        """
        table = self._tables.get(producer)
        alias = table.aliases.get(child) if table is not None else None
        if alias is not None and alias.entry.worker.name != name:
            self.stats.misdirected_completions += 1
            return
        entry = table.end_child(child) if table is not None else None
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
            if ticket.dispatched_at >= judged_before or ticket.adopted:
                continue
            ids = held.get(ticket.producer)
            if ids is not None and ticket.credit.id in ids:
                ticket.missed = False
            elif ticket.missed:
                orphans.append(ticket)
            else:
                ticket.missed = True
        for ticket in orphans:
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
        self._control(name, Drain(deadline_s=deadline_s))
        return True

    def worker_left(self, name: str, now: float) -> None:
        """``name`` said goodbye. Anything it still held is lost (it should hold nothing)."""
        worker = self.workers.get(name)
        if worker is not None:
            self._lose(worker, WORKER_LEFT, now)

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
        """Periodic duties: liveness (§6), closed connections, idle TTL (§3), drain deadlines."""
        gap = now - self._last_tick
        self._last_tick = now
        if gap > self.suspect_after_s:
            # Our own loop was late: silence we measured is ours, not the workers'. Forgive
            # (a closed connection too: its hello may be waiting unread).
            self.stats.loop_stalls += 1
            for worker in self.workers.values():
                worker.last_seen = max(worker.last_seen, now - self.heartbeat_interval_s)
                if worker.closed_until is not None:
                    worker.closed_until = max(worker.closed_until, now + self.closed_grace_s)
        for worker in list(self.workers.values()):
            silent = now - worker.last_seen
            if (
                silent > self.lost_after_s
                or (worker.closed_until is not None and now >= worker.closed_until)
                or (worker.draining and now > worker.drain_deadline + self.lost_after_s)
            ):
                self._lose(worker, WORKER_LOST, now)
            elif silent > self.suspect_after_s and worker.state is WorkerState.ACTIVE:
                self.stats.suspicions += 1
                worker.state = WorkerState.SUSPECT
                self.index.discard(worker)
        self._expire_sessions(now)
        # A ledger (and a session table) per producer incarnation would pile up over a
        # long-lived daemon: drop the empty ones (an active producer's come back with its
        # next credit).
        ledgers = self.ledgers
        for producer in [p for p, ledger in ledgers.items() if not ledger]:
            del ledgers[producer]
        tables = self.sessions.tables
        for producer in [
            p for p, t in tables.items() if not (t.entries or t.tombstones or p in ledgers)
        ]:
            del tables[producer]
        if self.queue_timeout_s is not None:
            self._expire_queued(now - self.queue_timeout_s)

    def _expire_queued(self, horizon: float) -> None:
        """End credits that have waited since before ``horizon`` (queues are in submit order,
        so each scan stops at the first young one)."""
        for queue in (self.queue, *(w.queue for w in self.workers.values())):
            while True:
                ticket = queue.peek()
                if ticket is None or ticket.submitted_at >= horizon:
                    break
                self._end(ticket, Status.REJECTED, QUEUE_TIMEOUT)

    # ---------------------------------------------------------------- internals

    def _route(self, ticket: Ticket, now: float) -> None:
        credit = ticket.credit
        if not self.sticky:  # every credit is a new session
            self.stats.sticky_misses += 1
            self._to_least_loaded(ticket, now)
            return
        table = self._tables.get(ticket.producer)
        if table is None:
            table = self.sessions.table(ticket.producer)
        if credit.branch_mode is _FORK:
            self._route_fork(table, ticket, now)
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
            self._to_worker(ticket, worker, now, table)
            return
        if not self._may_start(table, ticket, key):
            return
        self.stats.sticky_misses += 1
        if self.spawn_affinity_slack is not None and credit.branch_mode is _SPAWN:
            target = self._spawn_target(table, credit)
            if target is not None:
                self._dispatch(ticket, target, now)
                return
        self._to_least_loaded(ticket, now, table)

    def _may_start(self, table: SessionTable, ticket: Ticket, key: str) -> bool:
        """A credit of a session with no entry: may it start one (on the least-loaded
        worker)? If not, it ends here with the reason (invariant 8: never silently without
        its history)."""
        credit = ticket.credit
        tomb = table.tombstones.get(key)
        if tomb is not None:
            reason, fresh, _ = tomb.partition(NO_HISTORY)
            if fresh and credit.turn_index == 0:
                # Its worker was lost before any turn completed: no history exists anywhere,
                # so a retry of turn 0 is a new session (not a migration, not a rejection).
                del table.tombstones[key]
            elif not credit.allow_migration:
                self._end(ticket, Status.REJECTED, _EVICTION_REASONS[reason])
                return False
            else:
                del table.tombstones[key]
                self.stats.migrations += 1
        elif credit.turn_index > 0:
            # A later turn of a session this router never saw (it restarted since the session
            # began, or the session's earlier turns never ran): no worker holds its history
            # that we know of, so it may only start afresh where migration is allowed.
            if not credit.allow_migration:
                self._end(ticket, Status.REJECTED, SESSION_UNKNOWN)
                return False
            self.stats.migrations += 1
        return True

    def _to_least_loaded(
        self, ticket: Ticket, now: float, table: SessionTable | None = None
    ) -> None:
        """A new session: the least-loaded worker, unless others already wait (FIFO)."""
        queue = self.queue
        best = self.index.peek() if not queue.live else None
        if best is not None and len(best.tickets) < best.capacity:
            self._dispatch(ticket, best, now, table)
        elif queue.live < self.queue_limit:
            ticket.worker = None
            queue.append(ticket)
        else:
            self._end(ticket, Status.REJECTED, QUEUE_FULL)

    def _route_fork(self, table: SessionTable, ticket: Ticket, now: float) -> None:
        """A FORK child goes to its parent's entry's worker, or ends with the reason why not."""
        credit = ticket.credit
        entry = table.resolve(credit.parent_correlation_id)  # type: ignore[arg-type]
        child = credit.x_correlation_id
        alias = table.aliases.get(child)
        if child in table.entries or (alias is not None and entry is not alias.entry):
            self._end(ticket, Status.REJECTED, f"{INVALID_CREDIT}: {_TAKEN}")
            return
        if entry is None:
            reason = PARENT_UNAVAILABLE
            tomb = table.tombstones.get(child)
            if tomb is not None:
                reason = _EVICTION_REASONS[tomb.partition(NO_HISTORY)[0]]
            self._end(ticket, Status.REJECTED, reason)
            return
        self.stats.sticky_hits += 1
        self._to_worker(ticket, entry.worker, now, table)

    def _to_worker(
        self, ticket: Ticket, worker: Worker, now: float, table: SessionTable | None = None
    ) -> None:
        """Dispatch to ``worker`` now, or queue for it (full, suspect, or others waiting)."""
        if (
            len(worker.tickets) < worker.capacity
            and not worker.queue.live
            and worker.state is not WorkerState.SUSPECT
        ):
            self._dispatch(ticket, worker, now, table)
        elif worker.queue.live < self.worker_queue_limit:
            ticket.worker = worker
            worker.queue.append(ticket)
        else:
            self._end(ticket, Status.REJECTED, QUEUE_FULL)

    def _dispatch(
        self, ticket: Ticket, worker: Worker, now: float, table: SessionTable | None = None
    ) -> None:
        """Hand ``ticket`` to ``worker``: entry book-keeping of §3, then load accounting.
        ``table``: its producer's, if the caller has it at hand."""
        credit = ticket.credit
        producer = ticket.producer
        if self.sticky:
            if table is None:
                table = self.sessions.table(producer)
            entry: Entry | None
            if credit.branch_mode is _FORK:
                entry = self._book_fork(table, credit, worker, now)
            elif credit.turn_index + 1 < credit.num_turns or credit.fork_count:
                entry = self._book_session(table, credit, worker, now)
            else:
                # A final turn without forks: evict the entry if there is one (no entry, no
                # cost, for the dominant single-turn case).
                entry = table.entries.get(credit.x_correlation_id)
                if entry is not None:
                    assert entry.worker is worker, f"{credit!r} goes past its history"
                    if not entry.parent_final_seen and table.end_own(entry):
                        table.remove(entry, None)
                        entry = None
                    else:
                        table.touch(entry, now)
            if entry is not None:
                entry.busy += 1
                ticket.entry = entry
        ticket.worker = worker
        ticket.dispatched_at = now
        worker.tickets[ticket] = None
        worker.sent += 1
        worker.dispatched += 1
        self._seq += 1
        worker.seq = self._seq
        self.stats.dispatched += 1
        chunk = worker.chunk
        if chunk is not None and worker.chunk_producer == producer:
            chunk.append(credit)
        else:
            worker.chunk = chunk = [credit]
            worker.chunk_producer = producer
            self._effects.to_worker.append((worker.name, (producer, chunk)))
            self._dirty.append(worker)

    def _book_fork(self, table: SessionTable, credit: Credit, worker: Worker, now: float) -> Entry:
        """A FORK child turn: claim the child's reservation on first sight, add its own."""
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
        return entry

    def _book_session(
        self, table: SessionTable, credit: Credit, worker: Worker, now: float
    ) -> Entry | None:
        """An own-keyed turn that needs an entry: create or refresh it, then apply §3.
        Returns the entry if it is still live."""
        key = credit.x_correlation_id
        entry = table.entries.get(key)
        if entry is None:
            if self.sessions.live >= self.sessions.max_sessions:
                self._evict_oldest(now)
            entry = table.create(key, worker, now)
        else:
            assert entry.worker is worker, f"{credit!r} goes past its history"
            table.touch(entry, now)
        if credit.fork_count:
            # Reserve first, so a forking final turn never passes through zero.
            table.reserve(entry, key, credit.fork_count)
        if credit.turn_index + 1 >= credit.num_turns and table.end_own(entry):
            table.remove(entry, None)
            return None
        return entry

    def _refill(self, worker: Worker, now: float) -> None:
        """A slot may have opened on ``worker``: serve its queue, then the global queue."""
        if worker.state is WorkerState.SUSPECT or worker.state is WorkerState.GONE:
            return
        waiting = worker.queue
        tickets = worker.tickets
        tables = self.sessions.tables
        while waiting.live and len(tickets) < worker.capacity:
            ticket = waiting.popleft()
            credit = ticket.credit
            fork = credit.branch_mode is _FORK
            key: str = credit.parent_correlation_id if fork else credit.x_correlation_id  # type: ignore[assignment]
            table = tables.get(ticket.producer)
            entry = table.resolve(key) if table is not None else None
            if (entry is not None and entry.worker is not worker) or (
                entry is None and (fork or (table is not None and key in table.tombstones))
            ):
                # Its session moved (or ended) while it waited: route it afresh, which sends
                # it where its session is now, or ends it with the reason.
                ticket.worker = None
                self._route(ticket, now)
                continue
            self._dispatch(ticket, worker, now)
        queue = self.queue
        index = self.index
        sticky = self.sticky
        while queue.live:
            best = index.peek()
            if best is None or len(best.tickets) >= best.capacity:
                break
            ticket = queue.popleft()
            if sticky:
                # It waited as a new session; an earlier credit of its session may have been
                # dispatched meanwhile (its entry now pins it), or its session lost (a
                # tombstone): then it is routed afresh, never sent to ``best`` past its
                # history (that broke invariants 6 and 8: make fuzz, issue 9 item 21).
                table = tables.get(ticket.producer)
                key = ticket.credit.x_correlation_id
                if table is not None and (
                    key in table.entries or key in table.tombstones or key in table.aliases
                ):
                    self._route(ticket, now)
                    continue
            self._dispatch(ticket, best, now)

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
        del worker.sessions[entry]
        best.sessions[entry] = None
        entry.worker = best
        self.stats.rehomes += 1
        self._control(
            worker.name,
            EndSession(x_correlation_id=entry.key, reason="rehomed", producer=entry.table.producer),
        )
        self._reindex(worker)
        # ``best`` gained a session without a dispatch: its key grew, so its index entry must
        # be refreshed now (a dispatch would bump its sequence and mark the entry stale, but
        # the credit may have to wait in its queue instead).
        self._reindex(best)
        return best

    def _spawn_target(self, table: SessionTable, credit: Credit) -> Worker | None:
        parent = credit.parent_correlation_id
        entry = table.resolve(parent) if parent is not None else None
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
        table = entry.table
        if entry.ref_count == 0 and table.entries.get(entry.key) is entry:
            worker = entry.worker
            table.remove(entry, None)
            if notify:
                self._control(
                    worker.name,
                    EndSession(
                        x_correlation_id=entry.key, reason="released", producer=table.producer
                    ),
                )
            self._reindex(worker)

    def _evict(self, entry: Entry, reason: str) -> None:
        worker = entry.worker
        table = entry.table
        self.stats.evictions[reason] += 1
        self._control(
            worker.name,
            EndSession(x_correlation_id=entry.key, reason=reason, producer=table.producer),
        )
        table.remove(entry, reason)
        self._reindex(worker)

    def _evict_oldest(self, now: float) -> None:
        oldest = self.sessions.oldest()
        if oldest is not None:
            self._evict(oldest, "capacity")

    def _expire_sessions(self, now: float) -> None:
        """Evict entries without activity (dispatch or completion) since ``now -
        session_idle_ttl_s`` (§3), and never one with a credit in flight.

        A table is ordered by last dispatch (a re-insert at each), and a completion only sets
        ``last_used`` (a re-insert per completion too would double the table's memory). So the
        front entry's ``last_used`` is exact; an entry behind a front that a completion kept
        alive waits for it, late by at most that front's turn duration. A busy front is active
        now: it goes to the back.
        """
        horizon = now - self.session_idle_ttl_s
        for table in list(self.sessions.tables.values()):
            entries = table.entries
            while entries:
                oldest = next(iter(entries.values()))
                if oldest.busy:
                    if oldest.last_used > horizon:
                        break
                    table.touch(oldest, now)
                elif oldest.last_used > horizon:
                    break
                else:
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
        # What was queued for it in this batch is never sent: its credits leave with the rest
        # of its in-flight set, and control messages for it are moot.
        name = worker.name
        sends = self._effects.to_worker
        if any(n == name for n, _ in sends):
            self._effects.to_worker = [item for item in sends if item[0] != name]
        worker.chunk = None
        self._effects.departed.append(
            Departure(name, reason, len(worker.tickets), len(worker.sessions))
        )
        for ticket in list(worker.tickets):
            self._end(ticket, Status.LOST, reason)
        for entry in list(worker.sessions):
            self.stats.evictions[reason] += 1
            entry.table.remove(entry, reason, lost=True)
        for ticket in worker.queue.clear():
            # Its book-keeping went with the worker's entries: route it as if new.
            ticket.worker = None
            self._route(ticket, now)

    def _remember_adopted(self, ticket: Ticket) -> None:
        """``ticket``, adopted, ended here: its worker may still send its completion (as
        ``Recovered``), which must then be a duplicate, not a second outcome."""
        ended = self._adopted_ended
        if len(ended) >= self._adopted_ended_kept:
            del ended[next(iter(ended))]  # the oldest
        ended[ticket.producer, ticket.credit.id] = None

    def _end(self, ticket: Ticket, status: Status, reason: str) -> None:
        """Emit the one outcome of ``ticket`` and forget it."""
        credit = ticket.credit
        if ticket.adopted:
            # Its worker may still complete it and send that as ``Recovered``: one outcome.
            self._remember_adopted(ticket)
        producer = ticket.producer
        del self.ledgers[producer][credit.id]
        worker = ticket.worker
        dispatched = ticket.dispatched_at >= 0
        if dispatched and worker is not None:
            del worker.tickets[ticket]
            entry = ticket.entry
            if entry is not None:
                entry.busy -= 1
            if credit.fork_count:
                self._drop_declared(producer, credit)
        else:
            if ticket.queue is not None:
                ticket.queue.remove(ticket)
            if credit.branch_mode is _FORK and credit.turn_index == 0:
                # A FORK child that never started gives its parent's reservation back (it
                # holds nothing else: book-keeping happens at dispatch).
                self._unstarted_child(producer, credit)
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

    def _unstarted_child(self, producer: str, credit: Credit) -> None:
        table = self._tables.get(producer)
        if table is None or credit.x_correlation_id in table.aliases:
            return
        parent: str = credit.parent_correlation_id  # type: ignore[assignment]
        entry = table.resolve(parent)
        if entry is not None:
            table.unreserve(entry, parent, 1)
            self._maybe_evict(entry)

    def _drop_declared(self, producer: str, credit: Credit) -> None:
        """A declaring turn did not complete: the children it declared will never start."""
        table = self._tables.get(producer)
        node = credit.x_correlation_id
        entry = table.resolve(node) if table is not None else None
        if table is not None and entry is not None:
            table.unreserve(entry, node, credit.fork_count)
            self._maybe_evict(entry)

    def shutdown(self, now: float) -> None:
        """End every credit still queued (``rejected: router_shutdown``) or in flight
        (``lost: router_shutdown``), and tell each worker to stop the latter
        (``Cancel(revoked=True)``, after the dispatches): it must never report them, so no
        credit gets a second outcome."""
        for ticket in list(self.queue):
            self._end(ticket, Status.REJECTED, SHUTDOWN)
        for worker in list(self.workers.values()):
            for ticket in list(worker.queue):
                self._end(ticket, Status.REJECTED, SHUTDOWN)
            revoked: dict[str, list[int]] = {}
            for ticket in list(worker.tickets):
                revoked.setdefault(ticket.producer, []).append(ticket.credit.id)
                self._end(ticket, Status.LOST, SHUTDOWN)
            for producer, ids in revoked.items():
                for lo in range(0, len(ids), MAX_IDS):
                    self._control(
                        worker.name,
                        Cancel(producer=producer, credit_ids=ids[lo : lo + MAX_IDS], revoked=True),
                    )

    def __repr__(self) -> str:
        in_flight = sum(len(w.tickets) for w in self.workers.values())
        return (
            f"<RouterCore workers={len(self.workers)} in_flight={in_flight} "
            f"queued={len(self.queue)} sessions={self.sessions.live} "
            f"producers={len(self.sessions.tables)}>"
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
