"""Pure state of the worker agent: sessions, the completion log, back-off, liveness, throttling.

No ``await``, no sockets, no clock reads (a test parses this module with ``ast``): time comes
in as ``now`` (seconds, monotonic) and randomness through an injected ``random.Random``. The
agent (``worker_agent.agent``) owns the I/O and calls these classes; the tests drive them by
hand.

Sessions (PROTOCOL.md §5.3). ``SessionTable`` keeps one ``Session`` per ``x_correlation_id``
with its history (a list of ``Turn``), in LRU order under a cap. A FORK child starts from a copy
of its parent's history on its first turn here; a SPAWN child and a root start empty. A session
is dropped after its final turn, when a turn fails or is cancelled, and on the router's
``EndSession``. One exception keeps the contract whole: a session whose turns declared FORK
children (``fork_count``) that have not started yet keeps its history after its final turn, as
the template those children copy, until the last declared child has started (a balance that may
go negative if a child starts before its declaring turn completes). A single-turn session that
declares no children never enters the table (the dominant benchmark case costs no allocation).

Completions (§5.3, §5.6). ``CompletionLog`` numbers completions from 1 and keeps each until a
cumulative ``Ack`` covers it, with the router incarnation that dispatched its credit;
``completion_messages`` turns a run of them into frames: current-incarnation completions as one
``Completion`` or ``CompletionBatch``, other incarnations' as ``Recovered`` per incarnation. An
ended FORK child's release travels in its completion (``session_ended``), which is acknowledged
and resent; no separate ``ChildRelease`` follows it (the router would count the second release
as unknown).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from typing import Final, Protocol

import msgspec

from credit_common.peer import Backoff, Liveness
from protocol.messages import (
    MAX_IDS,
    BranchMode,
    Completion,
    CompletionBatch,
    Credit,
    Recovered,
    Status,
    WorkerToRouter,
)

__all__ = [
    "MAX_BLOB",
    "MAX_ID",
    "MAX_IN_FLIGHT_PRODUCERS",
    "MAX_LABELS",
    "MAX_TEXT",
    "Backoff",
    "CompletionLog",
    "Liveness",
    "LogThrottle",
    "Logged",
    "Outcome",
    "Session",
    "SessionStats",
    "SessionTable",
    "Turn",
    "bound_in_flight",
    "completion_messages",
]

_FORK: Final = BranchMode.FORK
_COMPLETED: Final = Status.COMPLETED
# The small value types built once per credit (Turn, TurnEnd, Logged) are msgspec Structs:
# ~60 ns to build against ~700 ns for a frozen dataclass, on the zero-latency hot path.

# Bounds of the fields a worker writes (PROTOCOL.md §4.1). protocol.messages exports only
# MAX_BATCH and MAX_IDS; tests/worker_agent/test_core.py checks these against its Meta.
MAX_TEXT: Final = 4_096
"""Characters of a ``reason`` (``Text``)."""
MAX_BLOB: Final = 1 << 20
"""Bytes of a ``result`` (``Blob``)."""
MAX_ID: Final = 256
"""Characters of a name, id or label key (``Id``)."""
MAX_LABELS: Final = 64
"""Entries of ``Hello.labels``."""
MAX_IN_FLIGHT_PRODUCERS: Final = 1_024
"""Producers in ``Hello.in_flight`` and ``InFlightReport.credits``."""
_turn_ids: Final = itertools.count(1)


class Turn(msgspec.Struct, frozen=True, gc=False):
    """One finished turn of a session: what its request and its response added to the history.

    Attributes:
        input_tokens: tokens the turn's request added (the new user input, not the history).
        output_tokens: tokens of the response.
        uid: identifies this turn's tokens (e.g. for prefix-cache hashing); unique in the
            process, shared by every session that copied the turn (FORK children).
        request: opaque, executor-defined (e.g. the request's messages as JSON).
        response: opaque, executor-defined (e.g. the response text).
    """

    input_tokens: int
    output_tokens: int
    uid: int = msgspec.field(default_factory=lambda: next(_turn_ids))
    request: bytes = b""
    response: bytes = b""


class Session:
    """One conversation on this worker: its history and its place in an agent tree.

    Attributes:
        x_correlation_id: the session id.
        history: finished turns, oldest first. A FORK child's starts as a copy of its parent's.
        branch_mode: ``fork``/``spawn`` for children, ``None`` for roots.
        parent: the parent's session id, if any.
        rebuilt: the history this worker should have had was not here (a later turn of a
            session it never saw, or a FORK child whose parent is gone): it starts empty, and
            an executor that cannot rebuild the context may fail the turn.
    """

    __slots__ = (
        "branch_mode",
        "final_done",
        "history",
        "last_used",
        "parent",
        "pending_forks",
        "producer",
        "rebuilt",
        "released",
        "x_correlation_id",
    )

    def __init__(
        self,
        x_correlation_id: str,
        *,
        branch_mode: BranchMode | None = None,
        parent: str | None = None,
        history: list[Turn] | None = None,
        rebuilt: bool = False,
    ) -> None:
        self.x_correlation_id = x_correlation_id
        self.history: list[Turn] = [] if history is None else history
        self.branch_mode = branch_mode
        self.parent = parent
        self.rebuilt = rebuilt
        self.pending_forks = 0
        """FORK children declared by completed turns minus those started here."""
        self.final_done = False
        self.released = False
        """Its end was already reported (or needs no ``ChildRelease``)."""
        self.producer = ""
        """The producer whose session it is (sessions are per producer)."""
        self.last_used = 0.0
        """When a turn of it last began or ended (the worker's monotonic clock)."""

    def __repr__(self) -> str:
        return (
            f"<Session {self.x_correlation_id} turns={len(self.history)} "
            f"mode={self.branch_mode} pending_forks={self.pending_forks} "
            f"final_done={self.final_done}>"
        )

    @property
    def history_tokens(self) -> int:
        """Tokens in the history (inputs and outputs of every finished turn)."""
        return sum(t.input_tokens + t.output_tokens for t in self.history)


class SessionStats:
    """Counters of the session table (read by logs and tests)."""

    __slots__ = (
        "ended",
        "ended_by_router",
        "evicted",
        "expired",
        "fork_parent_missing",
        "rebuilt",
        "started",
    )

    def __init__(self) -> None:
        self.started = 0
        """Sessions that entered the table (single-turn sessions without children never do)."""
        self.ended = 0
        self.ended_by_router = 0
        self.evicted = 0
        """Dropped at the ``max_sessions`` cap, least recently used first."""
        self.rebuilt = 0
        """Later turns of sessions this worker did not hold."""
        self.fork_parent_missing = 0
        """FORK children whose parent's history was not here."""
        self.expired = 0
        """Dropped as orphans: idle past the router's session TTL, or held from a router
        incarnation that restarted (it will never send their turns here again)."""

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        return {name: getattr(self, name) for name in self.__slots__}


class TurnEnd(msgspec.Struct, frozen=True, gc=False):
    """What ending a turn did to its session."""

    session_ended: bool
    """The session is no longer held (goes into ``Completion.session_ended``)."""
    child_release: str | None
    """A FORK child's id whose session ended with this turn (its completion says so)."""


class SessionTable:
    """The sessions this worker holds, in LRU order, bounded by ``max_sessions``.

    Args:
        max_sessions: the cap; at the cap the least recently used session is dropped and
            counted in ``stats.evicted``.
    """

    def __init__(self, max_sessions: int = 100_000) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self._live: OrderedDict[str, Session] = OrderedDict()
        self.stats = SessionStats()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, x_correlation_id: object) -> bool:
        return x_correlation_id in self._live

    def key(self, producer: str, x_correlation_id: str) -> str:
        """The table's key of a producer's session: sessions belong to the producer that
        started them, so two producers' equal ids are two sessions."""
        return f"{producer}\x1f{x_correlation_id}" if producer else x_correlation_id

    def __iter__(self) -> Iterator[Session]:
        return iter(self._live.values())

    def __repr__(self) -> str:
        return f"<SessionTable live={len(self._live)} {self.stats.snapshot()}>"

    def get(self, x_correlation_id: str, producer: str = "") -> Session | None:
        """The held session, or ``None`` (does not refresh its LRU position)."""
        return self._live.get(self.key(producer, x_correlation_id))

    def expire(self, horizon: float, keep: Iterable[Session] = ()) -> int:
        """Drop sessions not used since ``horizon`` (histories orphaned by a router that
        forgot them: it will never send their turns here again), except ``keep``;
        ``math.inf`` drops every session but those (a router that holds none of them).

        Returns:
            How many were dropped.
        """
        live = self._live
        kept = {id(s) for s in keep}
        dropped = 0
        for key, session in list(live.items()):
            if session.last_used >= horizon:
                break  # LRU order: the rest are newer
            if id(session) in kept:
                continue
            del live[key]
            dropped += 1
        self.stats.expired += dropped
        return dropped

    def clear(self) -> int:
        """Drop every session (a drain deadline). Returns how many were dropped."""
        count = len(self._live)
        self._live.clear()
        self.stats.ended += count
        return count

    def begin(self, credit: Credit, producer: str = "", now: float = 0.0) -> Session:
        """The session a credit's turn runs in, created (and for a FORK child, copied) if new.

        Args:
            credit: the credit about to execute.
            producer: the producer of its ``Dispatch`` (sessions are per producer).
            now: the worker's monotonic clock (for the idle expiry).

        Returns:
            The session; the executor reads its history and must not keep it.
        """
        xid = self.key(producer, credit.x_correlation_id)
        live = self._live
        session = live.get(xid)
        if session is not None:
            live.move_to_end(xid)
            session.last_used = now
            return session
        session = self._new(credit, producer)
        session.producer = producer
        session.last_used = now
        if credit.turn_index == 0 and credit.num_turns <= 1 and credit.fork_count == 0:
            return session  # begins and ends with this credit: never enters the table
        self.stats.started += 1
        live[xid] = session
        if len(live) > self.max_sessions:
            live.popitem(last=False)
            self.stats.evicted += 1
        return session

    def _new(self, credit: Credit, producer: str) -> Session:
        mode = credit.branch_mode
        parent_id = credit.parent_correlation_id
        if mode is _FORK:
            parent = (
                self._live.get(self.key(producer, parent_id)) if parent_id is not None else None
            )
            if parent is None:
                self.stats.fork_parent_missing += 1
                return Session(
                    credit.x_correlation_id, branch_mode=mode, parent=parent_id, rebuilt=True
                )
            history = list(parent.history)  # a copy: the child's turns never reach the parent
            parent.pending_forks -= 1
            if parent.final_done and parent.pending_forks <= 0:
                self._drop(self.key(producer, parent.x_correlation_id))
            return Session(
                credit.x_correlation_id, branch_mode=mode, parent=parent_id, history=history
            )
        rebuilt = credit.turn_index > 0
        if rebuilt:
            self.stats.rebuilt += 1
        return Session(credit.x_correlation_id, branch_mode=mode, parent=parent_id, rebuilt=rebuilt)

    def end(
        self,
        credit: Credit,
        session: Session | None,
        *,
        completed: bool,
        turn: Turn | None = None,
        producer: str = "",
        now: float = 0.0,
    ) -> TurnEnd:
        """Account for the end of a credit's turn.

        Args:
            credit: the credit whose turn ended.
            session: the session it ran in, or ``None`` if it never started (cancelled while
                queued).
            completed: ``True`` if the turn completed; a failed or cancelled turn drops the
                session.
            turn: the finished turn to append to the history (completed turns only).
            producer: the producer of its ``Dispatch``.
            now: the worker's monotonic clock.

        Returns:
            Whether the session ended, and the FORK child to release, if any.
        """
        xid = self.key(producer, credit.x_correlation_id)
        if session is None:
            session = self._live.get(xid)
            if session is None:
                child = credit.x_correlation_id if credit.branch_mode is _FORK else None
                return TurnEnd(True, child)
        session.last_used = now
        held = self._live.get(xid) is session
        if completed:
            if turn is not None:
                session.history.append(turn)
            session.pending_forks += credit.fork_count
            if credit.turn_index < credit.num_turns - 1:
                return TurnEnd(not held, None)
        session.final_done = True
        if held and not (completed and session.pending_forks > 0):
            self._drop(xid)
        if session.released:
            return TurnEnd(True, None)
        session.released = True
        return TurnEnd(True, session.x_correlation_id if session.branch_mode is _FORK else None)

    def end_session(self, x_correlation_id: str, producer: str = "") -> bool:
        """The router's ``EndSession``: drop the session. Returns whether it was held."""
        session = self._live.pop(self.key(producer, x_correlation_id), None)
        if session is None:
            return False
        session.released = True  # the router ended it: no ChildRelease owed
        self.stats.ended_by_router += 1
        return True

    def _drop(self, x_correlation_id: str) -> None:
        if self._live.pop(x_correlation_id, None) is not None:
            self.stats.ended += 1


# ------------------------------------------------------------------------------ completions


class Logged(msgspec.Struct, frozen=True, gc=False):
    """A completion kept until acknowledged, with what is needed to send it again."""

    completion: Completion
    router_incarnation: str
    """The router incarnation that dispatched the credit."""
    child_release: str | None = None
    """The FORK child whose session this completion ended, to release after it."""


class Outcome(Protocol):
    """What ``CompletionLog.record_completed`` reads of an execution's result."""

    @property
    def ttft_s(self) -> float | None: ...

    @property
    def result(self) -> bytes: ...


class CompletionLog:
    """Worker-local sequence numbers and the completions the router has not acknowledged."""

    def __init__(self) -> None:
        self._next_seq = 1
        self._unacked: deque[Logged] = deque()
        self.acked_seq = 0
        """The highest sequence number acknowledged so far."""

    def __len__(self) -> int:
        return len(self._unacked)

    def __repr__(self) -> str:
        return f"<CompletionLog next_seq={self._next_seq} unacked={len(self._unacked)}>"

    @property
    def next_seq(self) -> int:
        """The sequence number the next completion will get."""
        return self._next_seq

    def record(
        self,
        producer: str,
        credit_id: int,
        status: Status,
        router_incarnation: str,
        reason: str = "",
        ttft_s: float | None = None,
        duration_s: float | None = None,
        session_ended: bool = False,
        result: bytes = b"",
        child_release: str | None = None,
    ) -> Logged:
        """Number a new completion and keep it until acknowledged.

        Returns:
            The kept entry (its completion carries the new ``seq``).
        """
        seq = self._next_seq
        self._next_seq = seq + 1
        entry = Logged(
            Completion(
                seq=seq,
                producer=producer,
                credit_id=credit_id,
                status=status,
                reason=reason,
                ttft_s=ttft_s,
                duration_s=duration_s,
                session_ended=session_ended,
                result=result,
            ),
            router_incarnation,
            child_release,
        )
        self._unacked.append(entry)
        return entry

    def record_completed(
        self, producer: str, router_incarnation: str, done: Iterable[tuple[int, Outcome]]
    ) -> list[Logged]:
        """Number the completions of credits that completed the moment they started.

        ``record`` for each ``(credit_id, outcome)`` in order, with status ``COMPLETED``,
        ``duration_s`` 0, ``session_ended`` and the outcome's ``ttft_s`` and ``result``: the
        zero-latency executions of lone turns (one call per dispatch frame, not per credit).

        Returns:
            The kept entries, in ``seq`` order.
        """
        seq = self._next_seq
        out: list[Logged] = []
        append = out.append
        for credit_id, outcome in done:
            append(
                Logged(
                    Completion(
                        seq=seq,
                        producer=producer,
                        credit_id=credit_id,
                        status=_COMPLETED,
                        ttft_s=outcome.ttft_s,
                        duration_s=0.0,
                        session_ended=True,
                        result=outcome.result,
                    ),
                    router_incarnation,
                )
            )
            seq += 1
        self._next_seq = seq
        self._unacked.extend(out)
        return out

    def ack(self, seq: int) -> int:
        """A cumulative ``Ack``: forget every completion up to and including ``seq``.

        Returns:
            How many completions were forgotten.
        """
        unacked = self._unacked
        if unacked and unacked[-1].completion.seq <= seq:  # it covers them all (the usual)
            dropped = len(unacked)
            unacked.clear()
            if seq > self.acked_seq:
                self.acked_seq = seq
            return dropped
        dropped = 0
        while unacked and unacked[0].completion.seq <= seq:
            unacked.popleft()
            dropped += 1
        if seq > self.acked_seq:
            self.acked_seq = seq
        return dropped

    def forget(self, producer: str, credit_ids: Iterable[int]) -> int:
        """Drop unacknowledged completions of these credits: the router ended them itself
        (``Cancel(revoked=True)``), so they must never be reported, here or as ``Recovered``.

        Returns:
            How many were dropped.
        """
        ids = set(credit_ids)
        before = len(self._unacked)
        self._unacked = deque(
            e
            for e in self._unacked
            if not (e.completion.producer == producer and e.completion.credit_id in ids)
        )
        return before - len(self._unacked)

    def unacked(self) -> list[Logged]:
        """Every unacknowledged completion, in ``seq`` order."""
        return list(self._unacked)


def completion_messages(
    entries: Iterable[Logged], router_incarnation: str | None, max_batch: int = 1024
) -> list[WorkerToRouter]:
    """The frames that carry ``entries`` to a router of incarnation ``router_incarnation``.

    Frames leave in ``seq`` order, because the router acknowledges cumulatively: an ``Ack``
    for a frame's highest ``seq`` must never cover a lower one still behind it. So the entries
    are cut into consecutive runs of one incarnation (in practice: one run).

    Args:
        entries: completions in ``seq`` order.
        router_incarnation: the incarnation of the router we now speak to.
        max_batch: the most completions in one frame (``protocol.MAX_BATCH`` at most).

    Returns:
        Per run and chunk: the current incarnation's completions as one ``Completion`` or
        ``CompletionBatch``, another incarnation's as a ``Recovered`` naming it.
    """
    if isinstance(entries, list) and entries and len(entries) <= max_batch:
        # The usual flush: one run of one incarnation, one frame, without the per-entry cut.
        incarnation = entries[0].router_incarnation
        if all(e.router_incarnation == incarnation for e in entries):
            return [_frame([e.completion for e in entries], incarnation, router_incarnation)]
    out: list[WorkerToRouter] = []
    run: list[Completion] = []
    run_incarnation: str | None = None
    for entry in entries:
        if run and (entry.router_incarnation != run_incarnation or len(run) >= max_batch):
            out.append(_frame(run, run_incarnation, router_incarnation))
            run = []
        run_incarnation = entry.router_incarnation
        run.append(entry.completion)
    if run:
        out.append(_frame(run, run_incarnation, router_incarnation))
    return out


def _frame(run: list[Completion], incarnation: str | None, current: str | None) -> WorkerToRouter:
    if incarnation != current and incarnation is not None:
        return Recovered(router_incarnation=incarnation, completions=run)
    return run[0] if len(run) == 1 else CompletionBatch(completions=run)


def bound_in_flight(
    credits: dict[str, list[int]],
    max_producers: int = MAX_IN_FLIGHT_PRODUCERS,
    max_ids: int = MAX_IDS,
) -> tuple[dict[str, list[int]], int]:
    """Fit an in-flight map into the protocol's bounds (PROTOCOL.md §4.1).

    A map beyond them would make the whole ``Hello`` or ``InFlightReport`` invalid (and a
    ``Hello`` that never decodes means never joining), so the excess is left out instead: the
    router may then end those credits ``lost: orphaned``, which is visible and bounded.

    Returns:
        The bounded map and how many ids were left out.
    """
    if len(credits) <= max_producers and all(len(ids) <= max_ids for ids in credits.values()):
        return credits, 0
    kept: dict[str, list[int]] = {}
    left_out = 0
    for producer, ids in credits.items():
        if len(kept) >= max_producers:
            left_out += len(ids)
            continue
        kept[producer] = ids[:max_ids]
        left_out += max(0, len(ids) - max_ids)
    return kept, left_out


# ---------------------------------------------------------------------- timing and throttling


class LogThrottle:
    """At most one log line per key and interval; the rest are counted and reported with it.

    Args:
        interval_s: the minimum time between two lines of one key.
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def ready(self, key: str, now: float) -> int | None:
        """Whether a line of ``key`` may be logged now.

        Returns:
            ``None`` if not (the line is counted as suppressed); otherwise how many lines of
            this key were suppressed since the last one logged.
        """
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
