"""WorkerAgent: the worker side of the router conversation (PROTOCOL.md §5), on one asyncio loop.

Life cycle: ``serve()`` runs ``startup()`` (connect, first ``Hello``), then
``main_loop()`` (a tick that drives every deadline), then ``shutdown()`` (settle what is still
running, flush, ``Goodbye``, close). Signals are the CLI's business: it calls ``drain()`` and
``force_exit()``, which only record the request and wake the loop.

Theory of operation
-------------------
Frames arrive through the transport's reader callback, a batch per wakeup, and are decoded and
handled synchronously (``_on_frames``); a frame that does not decode is counted, logged at a
throttled WARNING and dropped (R5). Everything the worker does is keyed by the credit key
``(producer, credit_id)``, never a bare id.

Joining: the agent is ``JOINING`` until the first ``Welcome``, sending only ``Hello`` (paced by
a back-off, 1 s doubling to 10 s). A ``Refusal`` stops it (``serve()`` raises
``RefusedError``). Once ``JOINED`` it sends a ``Heartbeat`` whenever nothing else left for a
heartbeat interval, and an ``InFlightReport`` every report interval. Any frame from the router
counts as its heartbeat; after three silent intervals (or an ``ErrorReport`` with code
``unknown_worker``) the router is presumed gone and the agent is ``REJOINING``: it keeps the
socket (libzmq reconnects by itself), discards frames not yet handed to libzmq, and sends
``Hello`` with the same incarnation and ``in_flight`` set, paced by the back-off, until a
``Welcome`` comes back. Then it resends every unacknowledged completion in ``seq`` order.

Credits: each credit is a ``_Held`` record from ``Dispatch`` to its one ``Completion``. Up to
``capacity`` run at once, each in its own task (or synchronously when the executor can answer
without waiting); more wait in a local queue rather than being dropped. A credit ends through
exactly one call of ``_finish``, which is synchronous, so no cancellation can interrupt the
bookkeeping: the ``done`` flag makes every later path (a late task, a second cancel, the
shutdown sweep) a no-op. ``Cancel``, ``cancel_after_s`` (reason ``client_disconnect``), the
drain deadline (``drain_deadline``) and a forced exit (``forced_exit``) all go through
``_cancel``: it records the reason, then cancels the task; the task's ``CancelledError`` handler
reports that reason.

Completions: ``_finish`` numbers the completion in the ``CompletionLog`` (kept until a
cumulative ``Ack`` covers it) and appends it to the iteration's outbox; one ``call_soon``'d
``_flush`` per loop iteration (or the end of the reader wakeup that produced them) sends the
outbox as one frame in ``seq`` order (``Completion``/``CompletionBatch``; ``Recovered`` for
credits an earlier router incarnation dispatched), after the iteration's ``FirstToken`` events
(minus those whose completion is in the same flush: it carries the TTFT already) and before the
``ChildRelease`` of FORK children that ended.

Staleness: the agent never blames the router for silence measured by a tick that was itself
late (our loop stalled; the router's frames may be waiting unread), and it never writes a field
beyond the protocol's bounds (a frame the router rejects would be rejected on every resend).

Draining: on ``drain()`` or the router's ``Drain`` the agent sends ``Draining(deadline_s)``,
keeps serving, and stops when it holds no credit and no session (``drained``) or at the
deadline (``drain_deadline``: the rest is cancelled, its completions flushed); either way
``Goodbye`` follows the last completion on the same connection, so the router reads them first.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final

from credit_common.histogram import Histogram
from credit_common.peer import HEARTBEAT, HELLO, PeerSession, PeerState
from protocol import PROTOCOL_VERSION
from protocol.codec import decode_router_to_worker, encode
from protocol.errors import DecodeError
from protocol.messages import (
    Ack,
    BranchMode,
    Cancel,
    Credit,
    Dispatch,
    DispatchBatch,
    Drain,
    Draining,
    EndSession,
    ErrorReport,
    FirstToken,
    Goodbye,
    Heartbeat,
    Hello,
    InFlightReport,
    Recovered,
    Refusal,
    RouterToWorker,
    Status,
    Welcome,
    WorkerToRouter,
)
from worker_agent.core import (
    MAX_BLOB,
    MAX_ID,
    MAX_LABELS,
    MAX_TEXT,
    CompletionLog,
    Logged,
    LogThrottle,
    Session,
    SessionTable,
    Turn,
    TurnEnd,
    bound_in_flight,
    completion_messages,
)
from worker_agent.errors import RefusedError, TransportError
from worker_agent.executor import ExecResult, Executor
from worker_agent.transport import DealerTransport, ErrorHandler, FrameHandler, Transport

__all__ = ["AgentState", "AgentStats", "StopReason", "TransportFactory", "WorkerAgent"]

logger = logging.getLogger(__name__)

CANCELLED: Final = "cancelled"
CLIENT_DISCONNECT: Final = "client_disconnect"
DRAIN_DEADLINE: Final = "drain_deadline"
FORCED_EXIT: Final = "forced_exit"
WORKER_STOPPED: Final = "worker_stopped"
RESULT_TOO_LARGE: Final = "result_too_large"
UNKNOWN_WORKER: Final = "unknown_worker"
REVOKED: Final = "revoked"

_COMPLETED: Final = Status.COMPLETED
_FAILED: Final = Status.FAILED
_CANCELLED: Final = Status.CANCELLED
_DEBUG: Final = logging.DEBUG
_FORK: Final = BranchMode.FORK
UNANSWERED_WARN_S: Final = 5.0
"""A worker never welcomed warns this long after it started (then every 5 s at most)."""
_COMPLETED_KEY: Final = _COMPLETED.value

TransportFactory = Callable[[str, str, FrameHandler, ErrorHandler], Transport]
"""``(endpoint, routing_id, on_frames, on_error) -> Transport``; the default builds a
``DealerTransport`` on the running loop."""


class AgentState(enum.Enum):
    """Where the agent stands with the router."""

    JOINING = "joining"
    """No ``Welcome`` yet: only ``Hello`` may be sent."""
    JOINED = "joined"
    REJOINING = "rejoining"
    """The router went silent (or forgot us): re-hello until a ``Welcome``."""
    STOPPED = "stopped"


_READY: Final = PeerState.READY
_PEER_STOPPED: Final = (PeerState.REFUSED, PeerState.FAILED, PeerState.CLOSED)
"""The peer states ``_AGENT_STATE`` maps to ``STOPPED`` (a tuple: enum hashing is slow)."""

_AGENT_STATE: Final = {
    PeerState.JOINING: AgentState.JOINING,
    PeerState.READY: AgentState.JOINED,
    PeerState.REJOINING: AgentState.REJOINING,
    PeerState.REFUSED: AgentState.STOPPED,
    PeerState.FAILED: AgentState.STOPPED,
    PeerState.CLOSED: AgentState.STOPPED,
}


class StopReason(enum.StrEnum):
    """Why ``serve()`` returned (also the ``Goodbye`` reason)."""

    DRAINED = "drained"
    """Drained: no credit and no session left."""
    DRAIN_DEADLINE = "drain_deadline"
    """The drain deadline passed; what was left was cancelled."""
    FORCED = "forced"
    """``force_exit()`` (a second signal): everything was cancelled."""
    REFUSED = "refused"
    """The router refused the ``Hello`` (``serve()`` raises ``RefusedError``)."""
    TRANSPORT_ERROR = "transport_error"
    """The socket failed for good (``serve()`` raises ``TransportError``)."""


_CANCEL_REASON: Final = {
    StopReason.DRAINED: WORKER_STOPPED,
    StopReason.DRAIN_DEADLINE: DRAIN_DEADLINE,
    StopReason.FORCED: FORCED_EXIT,
    StopReason.REFUSED: WORKER_STOPPED,
    StopReason.TRANSPORT_ERROR: WORKER_STOPPED,
}
_SAYS_GOODBYE: Final = frozenset({StopReason.DRAINED, StopReason.DRAIN_DEADLINE, StopReason.FORCED})


class AgentStats:
    """Counters of the agent (logs, tests, a later metrics layer)."""

    def __init__(self) -> None:
        self.credits_received = 0
        self.completions: dict[str, int] = {s.value: 0 for s in (_COMPLETED, _FAILED, _CANCELLED)}
        self.queued_over_capacity = 0
        """Credits that arrived with every slot busy and waited locally."""
        self.duplicate_credits = 0
        """Dispatches of a credit key already held (ignored)."""
        self.credits_before_welcome = 0
        """Dispatches received before any ``Welcome`` (a router bug; dropped)."""
        self.bad_frames: dict[str, int] = {}
        """Frames that did not decode, by ``DecodeError.reason``."""
        self.rehellos = 0
        self.router_restarts = 0
        self.recovered_completions = 0
        self.revoked = 0
        """Credits a draining router ended itself (stopped here, never reported)."""
        self.first_tokens_sent = 0
        self.first_tokens_coalesced = 0
        """First tokens not sent because the completion left in the same frame batch."""
        self.ttft_s = Histogram()
        """Time to first token of completed credits (as the executor measured it)."""
        self.duration_s = Histogram()
        """Execution time of every credit that started."""
        self.errors: dict[str, int] = {}
        """Failed credits by kind: the reason up to its first ':' (bounded, see ``_kind``)."""

    def snapshot(self) -> dict[str, object]:
        """A copy of every counter (a histogram as its count and sum, fit for a log line)."""
        out: dict[str, object] = {}
        for key, value in vars(self).items():
            if isinstance(value, dict):
                out[key] = dict(value)
            elif isinstance(value, Histogram):
                out[key] = {"count": value.count, "sum": round(value.sum, 6)}
            else:
                out[key] = value
        return out


MAX_ERROR_KINDS: Final = 32
"""Distinct error kinds kept as metric labels; later ones are counted as ``other``."""


def _kind(reason: str, seen: Mapping[str, int]) -> str:
    """A bounded label for a failure reason (``http_503: Service Unavailable`` -> ``http_503``)."""
    kind = reason.split(":", 1)[0].strip()[:64] or "unknown"
    if kind in seen or len(seen) < MAX_ERROR_KINDS:
        return kind
    return "other"


class _Held:
    """A credit from its ``Dispatch`` to its ``Completion``."""

    __slots__ = (
        "cancel_reason",
        "credit",
        "done",
        "key",
        "on_first_token",
        "revoked",
        "router_incarnation",
        "session",
        "started_at",
        "task",
        "timer",
        "ttft_s",
    )

    def __init__(self, producer: str, credit: Credit, router_incarnation: str) -> None:
        self.key = (producer, credit.id)
        self.credit = credit
        self.router_incarnation = router_incarnation
        self.session: Session | None = None
        self.started_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.cancel_reason: str | None = None
        self.ttft_s: float | None = None
        self.done = False
        self.revoked = False
        """The router ended it itself: stopped, never reported."""
        self.on_first_token: Callable[[float], None] | None = None

    def __repr__(self) -> str:
        state = "done" if self.done else "running" if self.started_at is not None else "queued"
        return f"<credit {self.key[0]}/{self.key[1]} {state}>"


class WorkerAgent:
    """A worker agent: joins a router, executes its credits, reports them exactly once.

    Args:
        router: the router's worker endpoint, e.g. ``tcp://10.0.0.5:5555``.
        name: the worker's stable name (its ZeroMQ routing id).
        executor: runs the credits.
        capacity: credits executed at once (announced in ``Hello``).
        labels: extra ``Hello`` labels; ``executor`` is added.
        first_token_events: send ``FirstToken`` when the executor reports the first token.
        drain_deadline_s: the deadline of a ``drain()`` that names none.
        max_sessions: cap of the session table (LRU eviction beyond it, counted).
        rehello_initial_s: first re-hello delay (doubles up to ``rehello_max_s``).
        rehello_max_s: longest re-hello delay.
        silence_beats: heartbeat intervals of router silence before re-helloing.
        max_auth_failures: failed CURVE handshakes in a row (no welcome) before giving up:
            ``serve()`` raises ``RefusedError`` naming why.
        session_idle_ttl_s: a session history unused this long is dropped (an orphan: the
            router forgot it, e.g. it restarted or declared this worker lost).
        settle_timeout_s: at shutdown, how long cancelled executions get to finish before
            their completions are written without them.
        incarnation: this process's incarnation; random hex when omitted (tests pin it).
        transport_factory: builds the transport (inject a fake to run without sockets); a
            ``DealerTransport`` by default.

    Raises:
        ValueError: a bound is out of range, or the name or labels would make every
            ``Hello`` invalid (PROTOCOL.md §4.1).
    """

    def __init__(
        self,
        *,
        router: str,
        name: str,
        executor: Executor,
        capacity: int = 64,
        labels: Mapping[str, str] | None = None,
        first_token_events: bool = True,
        drain_deadline_s: float = 30.0,
        max_sessions: int = 100_000,
        rehello_initial_s: float = 0.25,
        rehello_max_s: float = 1.0,
        silence_beats: int = 3,
        max_auth_failures: int = 5,
        session_idle_ttl_s: float = 900.0,
        settle_timeout_s: float = 1.0,
        incarnation: str | None = None,
        transport_factory: TransportFactory | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if drain_deadline_s < 0 or settle_timeout_s < 0:
            raise ValueError("drain_deadline_s and settle_timeout_s must be >= 0")
        if silence_beats < 1:
            raise ValueError(f"silence_beats must be >= 1, got {silence_beats}")
        if session_idle_ttl_s <= 0:
            raise ValueError(f"session_idle_ttl_s must be > 0, got {session_idle_ttl_s}")
        all_labels = {**(labels or {}), "executor": executor.kind}
        _check_identity(name, all_labels)
        self.router = router
        self.name = name
        self.capacity = capacity
        self.incarnation = incarnation if incarnation is not None else secrets.token_hex(8)
        self.labels = all_labels
        self.first_token_events = first_token_events
        self.drain_deadline_s = drain_deadline_s
        self.settle_timeout_s = settle_timeout_s
        self.sessions = SessionTable(max_sessions)
        self.completions = CompletionLog()
        self.stats = AgentStats()
        self._executor = executor
        self._execute_lone: Callable[[Credit], ExecResult | None] | None = getattr(
            executor, "execute_lone_nowait", None
        )
        """The executor's optional fast path for lone turns (see ``_on_dispatch``)."""
        self.executor = executor
        """What runs the credits (read by ``/metrics`` for its token counts)."""
        self._transport_factory = transport_factory
        self._transport: Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.session_idle_ttl_s = session_idle_ttl_s
        self._session = PeerSession(
            heartbeat_interval_s=1.0,
            silence_beats=silence_beats,
            rehello_initial_s=rehello_initial_s,
            rehello_max_s=rehello_max_s,
            max_auth_failures=max_auth_failures,
        )
        self._stopped = False
        self._next_expiry_at = 0.0
        self._throttle = LogThrottle()
        self._report_interval_s = 5.0
        self._tick_s = 0.1
        self._last_tick = 0.0
        self._started_at = 0.0
        self._next_report_at = 0.0
        self._held: dict[tuple[str, int], _Held] = {}
        self._waiting: deque[_Held] = deque()
        self._running = 0
        self._outbox: list[Logged] = []
        self._first_tokens: list[FirstToken] = []
        self._flush_scheduled = False
        self._wake = asyncio.Event()
        self._drain_request: float | None = None
        self._force_request = False
        self._draining = False
        self._drain_deadline = 0.0
        self._stop: StopReason | None = None
        self._refusal: Refusal | None = None
        self._transport_error: TransportError | None = None

    def __repr__(self) -> str:
        return (
            f"<WorkerAgent {self.name} {self._state.value} router={self._router_incarnation} "
            f"held={len(self._held)} running={self._running} waiting={len(self._waiting)} "
            f"sessions={len(self.sessions)} unacked={len(self.completions)}"
            f"{' draining' if self._draining else ''}>"
        )

    # ---------------------------------------------------------------------- public surface

    @property
    def state(self) -> AgentState:
        """Where the agent stands with the router."""
        return self._state

    @property
    def _state(self) -> AgentState:
        if self._stopped:
            return AgentState.STOPPED
        return _AGENT_STATE[self._session.state]

    @property
    def _router_incarnation(self) -> str | None:
        return self._session.router_incarnation

    @property
    def router_incarnation(self) -> str | None:
        """The incarnation of the router that last welcomed us."""
        return self._session.router_incarnation

    @property
    def draining(self) -> bool:
        """Whether a drain is under way."""
        return self._draining

    def in_flight(self) -> dict[str, list[int]]:
        """Credits held (running or queued, no completion yet) by producer, of every router."""
        return self._held_by_producer(None)

    def drain(self, deadline_s: float | None = None) -> None:
        """Ask the agent to drain and leave (SIGTERM). Safe to call from a signal handler.

        Args:
            deadline_s: leave after at most this long; ``drain_deadline_s`` when omitted. A
                second request may only shorten the deadline.
        """
        wanted = self.drain_deadline_s if deadline_s is None else max(0.0, deadline_s)
        if self._drain_request is None or wanted < self._drain_request:
            self._drain_request = wanted
        self._wake.set()

    def force_exit(self) -> None:
        """Leave now: cancel everything, flush the completions, say goodbye (second signal)."""
        self._force_request = True
        self._wake.set()

    async def serve(self) -> StopReason:
        """Run the agent until it drains, is forced out, refused, or its socket fails.

        Returns:
            Why it stopped: ``DRAINED``, ``DRAIN_DEADLINE`` or ``FORCED``.

        Raises:
            RefusedError: the router refused the ``Hello``.
            TransportError: the socket failed for good.
        """
        await self.startup()
        try:
            reason = await self.main_loop()
        finally:
            await self.shutdown()
        if self._refusal is not None:
            refusal = self._refusal
            raise RefusedError(refusal.reason, refusal.router_version, refusal.peer_version)
        if self._stop is StopReason.REFUSED:
            # Not the session's state: shutdown() closed the session, which was FAILED.
            raise RefusedError(f"authentication failed: {self._session.why}", 0, PROTOCOL_VERSION)
        if self._transport_error is not None:
            raise self._transport_error
        return reason

    # ------------------------------------------------------------------------- life cycle

    async def startup(self) -> None:
        """Connect and send the first ``Hello``."""
        self._loop = loop = asyncio.get_running_loop()
        self._last_tick = self._started_at = loop.time()
        factory = self._transport_factory or _dealer_factory
        # The routing id is NAME/INCARNATION: two processes never share one (a copied config
        # or a stale process cannot take over this one's connection); the router arbitrates
        # the name itself by the hello.
        routing_id = f"{self.name}/{self.incarnation}"
        self._transport = factory(
            self.router, routing_id, self._on_frames, self._on_transport_error
        )
        watch = getattr(self._transport, "watch", None)
        if watch is not None:
            watch(self._on_connected, self._on_handshake_failed)
        logger.info(
            "worker starting name=%s incarnation=%s router=%s capacity=%d executor=%s",
            self.name,
            self.incarnation,
            self.router,
            self.capacity,
            self._executor.kind,
        )
        self._session.start(loop.time())
        self._on_tick(loop.time())

    async def main_loop(self) -> StopReason:
        """Tick until a stop reason is set; frames are handled by the reader callback."""
        loop = self._require_loop()
        while self._stop is None:
            self._wake.clear()
            try:
                async with asyncio.timeout(self._tick_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._on_tick(loop.time())
        return self._stop

    async def shutdown(self) -> None:
        """Settle what still runs, flush every completion, say ``Goodbye``, close the socket.

        The settling (cancelling executions and waiting, bounded, for them to record their
        completions) is shielded: if ``serve()`` itself is cancelled meanwhile, the ``finally``
        below still completes whatever did not settle, synchronously, and flushes it.
        """
        reason = self._stop or StopReason.FORCED
        cancel_reason = _CANCEL_REASON[reason]
        try:
            await asyncio.shield(self._settle(cancel_reason))
        finally:
            loop = self._require_loop()
            for held in list(self._held.values()):
                self._cancel(held, cancel_reason)
                self._finish(held, _CANCELLED, cancel_reason, loop.time())
            self._flush()
            if self._state is AgentState.JOINED and reason in _SAYS_GOODBYE:
                self._send(Goodbye(reason=reason.value), loop.time())
            self._stopped = True
            self._session.close()
            if self._transport is not None:
                self._transport.close()
            logger.info(
                "worker stopped name=%s reason=%s unacked=%d stats=%s sessions=%s",
                self.name,
                reason.value,
                len(self.completions),
                self.stats.snapshot(),
                self.sessions.stats.snapshot(),
            )
        await self._executor.aclose()

    async def _settle(self, reason: str) -> None:
        loop = self._require_loop()
        for held in list(self._waiting):
            self._finish(held, _CANCELLED, reason, loop.time())
        self._waiting.clear()
        tasks = [h.task for h in self._held.values() if h.task is not None]
        for held in list(self._held.values()):
            self._cancel(held, reason)
        if tasks:
            await asyncio.wait(tasks, timeout=self.settle_timeout_s)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the agent is not started")
        return self._loop

    # ------------------------------------------------------------------------------ ticks

    def _on_tick(self, now: float) -> None:
        # A late tick means our own loop stalled: the router's frames may be waiting unread in
        # the socket, so this tick does not judge its silence (the next one will, once read).
        session = self._session
        stalled = now - self._last_tick > session.liveness.heartbeat_interval_s
        self._last_tick = now
        self._apply_requests(now)
        if not self._stopped:
            was_ready = session.ready
            what = session.due(now, stalled=stalled)
            if was_ready and not session.ready:
                logger.warning("router presumed gone (%s): rejoining", session.why)
            if what == HELLO:
                self._send_hello(now)
                if session.state is PeerState.JOINING:
                    self._warn_unanswered(now)
            elif what == HEARTBEAT:
                self._send(Heartbeat(sent_at_s=now), now)
            if session.ready:
                self._tick_joined(now)
            if now >= self._next_expiry_at:
                self._next_expiry_at = now + 1.0
                self._expire_sessions(now)
        if self._stop is None:
            self._stop = self._stop_reason(now)

    def _warn_unanswered(self, now: float) -> None:
        """Never welcomed yet: say so now and then, with what to check (a worker pointed at
        a port nothing listens on would otherwise say nothing at all)."""
        waited = now - self._started_at
        if waited >= UNANSWERED_WARN_S and self._throttle.ready("unanswered", now) is not None:
            logger.warning(
                "no answer from the router at %s after %.0f s (is it running, and is --router "
                "its --workers endpoint?)",
                self.router,
                waited,
            )

    def _apply_requests(self, now: float) -> None:
        if self._force_request and self._stop is None:
            logger.warning("forced exit: cancelling %d credits", len(self._held))
            self._stop = StopReason.FORCED
        request = self._drain_request
        if request is not None:
            self._drain_request = None
            self._start_drain(request, now)

    def _tick_joined(self, now: float) -> None:
        if now >= self._next_report_at:
            self._next_report_at = now + self._report_interval_s
            credits = self._report(self._router_incarnation, now)
            self._send(InFlightReport(credits=credits), now)

    def _running_sessions(self) -> list[Session]:
        """The sessions of credits held here (never dropped as orphans)."""
        return [h.session for h in self._held.values() if h.session is not None]

    def _expire_sessions(self, now: float) -> None:
        """Drop histories unused for ``session_idle_ttl_s`` (orphans the router forgot)."""
        dropped = self.sessions.expire(now - self.session_idle_ttl_s, self._running_sessions())
        if dropped:
            logger.info("dropped %d idle session histories (orphans)", dropped)

    def _stop_reason(self, now: float) -> StopReason | None:
        if not self._draining:
            return None
        if self._router_incarnation is None or self._session.final:
            return StopReason.DRAINED  # never joined, or refused: nobody to tell
        if not self._held and not self.sessions:
            if self._state is AgentState.JOINED:
                return StopReason.DRAINED
            if not self.completions:
                # The router is away and we owe it nothing: no credit, no session, no
                # completion to deliver. Waiting for it until the deadline would only hold up
                # a `systemctl stop` (it will see us gone, with nothing lost).
                return StopReason.DRAINED
        if now >= self._drain_deadline:
            return StopReason.DRAIN_DEADLINE
        return None

    def _start_drain(self, deadline_s: float, now: float) -> None:
        deadline = now + deadline_s
        if self._draining and deadline >= self._drain_deadline:
            return
        self._draining = True
        self._drain_deadline = deadline
        logger.info(
            "draining deadline_s=%.1f credits=%d sessions=%d",
            deadline_s,
            len(self._held),
            len(self.sessions),
        )
        if self._state is AgentState.JOINED:
            self._send(Draining(deadline_s=deadline_s), now)

    # --------------------------------------------------------------------------- joining

    def _send_hello(self, now: float) -> None:
        transport = self._transport
        if transport is None:
            return
        # Only Hello may precede the Welcome, and anything not yet handed to libzmq is either
        # resent after the Welcome (completions) or periodic: drop it so Hello goes first.
        dropped = transport.discard_backlog()
        incarnation = self._router_incarnation
        in_flight = self._report(incarnation, now) if incarnation is not None else {}
        hello = Hello(
            name=self.name,
            incarnation=self.incarnation,
            protocol_version=PROTOCOL_VERSION,
            capacity=self.capacity,
            labels=self.labels,
            in_flight=in_flight,
        )
        self._send(hello, now)
        if self._state is AgentState.REJOINING:
            self.stats.rehellos += 1
            logger.info(
                "hello again name=%s in_flight=%d discarded_frames=%d",
                self.name,
                sum(len(ids) for ids in in_flight.values()),
                dropped,
            )

    def _on_connected(self, reconnected: bool) -> None:
        """The transport (re-)connected: the router may be a new process; say hello now."""
        if self._session.connected(self._require_loop().time(), reconnected=reconnected):
            self._wake.set()

    def _on_handshake_failed(self, why: str, hangup: bool) -> None:
        now = self._require_loop().time()
        suppressed = self._throttle.ready("handshake", now)
        if suppressed is not None:
            logger.warning("handshake with %s failed: %s", self.router, why)
        if self._session.auth_failed(why, now, hangup=hangup):
            logger.error("giving up on %s: %s", self.router, self._session.why)
            if self._stop is None:
                self._stop = StopReason.REFUSED
            self._wake.set()

    def _on_welcome(self, welcome: Welcome, now: float) -> None:
        session = self._session
        previous = session.router_incarnation
        incarnation = welcome.router_incarnation
        was_ready = session.ready
        self._apply_intervals(welcome, now)
        if session.final or (was_ready and incarnation == previous):
            return  # a second answer to an earlier Hello of the same rejoin
        session.welcomed(incarnation, welcome.heartbeat_interval_s, now)
        self._next_report_at = now + self._report_interval_s
        if previous is not None and not welcome.resumed:
            # The router holds nothing of ours (it restarted, or it had declared us lost): it
            # will never send a turn of the sessions we hold again. Keep only those of credits
            # still running here.
            dropped = self.sessions.expire(math.inf, self._running_sessions())
            if dropped:
                logger.info("dropped %d session histories the router no longer holds", dropped)
        if previous is None:
            logger.info("joined router=%s incarnation=%s", self.router, incarnation)
        elif incarnation != previous:
            self.stats.router_restarts += 1
            logger.warning(
                "router restarted old_incarnation=%s new_incarnation=%s unacked=%d",
                previous,
                incarnation,
                len(self.completions),
            )
        else:
            logger.info("rejoined router=%s unacked=%d", self.router, len(self.completions))
        self._outbox.clear()  # all of it is in the log, resent just below
        self._send_completions(self.completions.unacked(), now)
        if self._draining:
            self._send(Draining(deadline_s=max(0.0, self._drain_deadline - now)), now)

    def _apply_intervals(self, welcome: Welcome, now: float) -> None:
        if welcome.protocol_version != PROTOCOL_VERSION:
            logger.warning(
                "welcome names protocol %d, we speak %d", welcome.protocol_version, PROTOCOL_VERSION
            )
        # Clamp what the router says: a zero or negative interval must not spin the loop.
        heartbeat = max(0.01, welcome.heartbeat_interval_s)
        self._report_interval_s = max(0.01, welcome.inflight_report_interval_s)
        self._tick_s = min(0.25, max(0.005, min(heartbeat, self._report_interval_s) / 4))

    def _on_refusal(self, refusal: Refusal) -> None:
        self._session.refused(refusal.code, refusal.reason)
        logger.error(
            "refused by the router: %s (router protocol %d, ours %d)",
            refusal.reason,
            refusal.router_version,
            refusal.peer_version,
        )
        self._refusal = refusal
        if self._stop is None:
            self._stop = StopReason.REFUSED
        self._wake.set()

    def _on_error_report(self, report: ErrorReport, now: float) -> None:
        suppressed = self._throttle.ready("error:" + report.code, now)
        if suppressed is not None:
            logger.warning(
                "router reports an error code=%s message=%s suppressed=%d",
                report.code,
                report.message,
                suppressed,
            )
        if self._session.error_report(report.code, now):
            # One line per burst: every frame in flight when the router forgot us is answered
            # so, in the same millisecond.
            if self._throttle.ready("rejoin:" + report.code, now) is not None:
                logger.warning("the router does not know us (%s): saying hello again", report.code)
            self._wake.set()

    def _on_transport_error(self, error: TransportError) -> None:
        self._transport_error = error
        if self._stop is None:
            self._stop = StopReason.TRANSPORT_ERROR
        self._wake.set()

    # ---------------------------------------------------------------------------- inbound

    def _on_frames(self, frames: list[bytes]) -> None:
        now = self._require_loop().time()
        self._session.received(now)  # any frame is a heartbeat, even one that fails to decode
        debug = logger.isEnabledFor(_DEBUG)
        # Completions made inside this wakeup (zero-latency executions) leave with it, in one
        # frame, rather than an event-loop iteration later: the flush below, so none is
        # scheduled meanwhile (one call_soon and one empty _flush less per wakeup).
        scheduled = self._flush_scheduled
        self._flush_scheduled = True
        try:
            for frame in frames:
                try:
                    msg = decode_router_to_worker(frame)
                except DecodeError as err:
                    self._bad_frame(err, now)
                    continue
                if debug:
                    logger.debug("<<- %r", msg)
                try:
                    self._handle(msg, now)
                except Exception:
                    logger.exception("failed to handle %s from the router", type(msg).__name__)
        finally:
            if not scheduled:
                self._flush_scheduled = False
        if self._outbox or (not scheduled and self._first_tokens):
            self._flush()

    def _bad_frame(self, err: DecodeError, now: float) -> None:
        bad = self.stats.bad_frames
        bad[err.reason] = bad.get(err.reason, 0) + 1
        suppressed = self._throttle.ready("bad_frame", now)
        if suppressed is not None:
            logger.warning("dropped a frame from the router: %s suppressed=%d", err, suppressed)

    def _handle(self, msg: RouterToWorker, now: float) -> None:
        match msg:
            case DispatchBatch(producer=producer, credits=credits):
                self._on_dispatch(producer, credits, now)
            case Dispatch(producer=producer, credit=credit):
                self._on_dispatch(producer, [credit], now)
            case Ack(seq=seq):
                self.completions.ack(seq)
            case Heartbeat():
                pass
            case Cancel(producer=producer, credit_ids=ids, revoked=revoked):
                if revoked:
                    self._on_revoke(producer, ids, now)
                else:
                    self._on_cancel(producer, ids)
            case EndSession(x_correlation_id=xid, producer=producer):
                self.sessions.end_session(xid, producer)
            case Welcome():
                self._on_welcome(msg, now)
            case Refusal():
                self._on_refusal(msg)
            case Drain(deadline_s=deadline_s):
                self.drain(deadline_s)
            case ErrorReport():
                self._on_error_report(msg, now)

    def _on_dispatch(self, producer: str, credits: list[Credit], now: float) -> None:
        """Start (or queue) each credit, in order.

        A lone turn (turn 0 of 1, no FORK children, not a FORK child, no session of its id
        held) needs no session: with an executor that offers ``execute_lone_nowait`` it runs
        here without a ``_Held`` record or a ``Session``, and the completions of a run of such
        credits are numbered in one ``CompletionLog.record_completed`` call (``_end_lone``).
        Same completions, seqs, counts and histograms as ``_start``/``_finish`` would make;
        anything else (a result that is not a plain completion, an exception, ``None``) takes
        the general path with the result already in hand (``_start_executed``).
        """
        incarnation = self._router_incarnation
        if incarnation is None:
            self.stats.credits_before_welcome += len(credits)
            logger.warning("dropped %d credits sent before any Welcome", len(credits))
            return
        held = self._held
        lone = self._execute_lone
        sessions = self.sessions
        done: list[tuple[int, ExecResult]] = []
        fast: bool | None = None
        tabled = False
        try:
            for credit in credits:
                if held and (producer, credit.id) in held:
                    self.stats.duplicate_credits += 1
                    logger.warning("ignored a second dispatch of credit %s/%d", producer, credit.id)
                    continue
                if (
                    credit.turn_index == 0
                    and credit.num_turns <= 1
                    and not credit.fork_count
                    and credit.branch_mode is not _FORK
                    and credit.cancel_after_s is None
                ):
                    if fast is None:  # asked again only when a lone turn follows another kind
                        fast, tabled = self._lone_ready()
                    eligible = fast and (
                        not tabled or sessions.get(credit.x_correlation_id, producer) is None
                    )
                else:
                    eligible = False
                if eligible:
                    assert lone is not None  # (`fast` says so)
                    try:
                        result = lone(credit)
                    except Exception as exc:
                        self._end_lone(producer, incarnation, done, now)
                        self._start_executed(producer, credit, incarnation, now, None, exc)
                        fast = None
                        continue
                    if (
                        result is not None
                        and result.status is _COMPLETED
                        and len(result.result) <= MAX_BLOB
                    ):
                        done.append((credit.id, result))
                        continue
                    self._end_lone(producer, incarnation, done, now)
                    self._start_executed(producer, credit, incarnation, now, result, None)
                else:
                    self._end_lone(producer, incarnation, done, now)
                    self._dispatch_one(producer, credit, incarnation, now)
                fast = None
        finally:  # (a bug raising mid-frame must not lose the completions made before it)
            self._end_lone(producer, incarnation, done, now)

    def _lone_ready(self) -> tuple[bool, bool]:
        """Whether a lone turn dispatched now may take the fast path (the executor offers it,
        and the credit would start at once in ``_dispatch_one``); whether any session is held
        (else none can be the credit's). Lone turns change neither: it is asked again only
        after a credit took the general path (``fast = None``), and only if a lone turn
        follows."""
        fast = (
            self._execute_lone is not None
            and self._running < self.capacity
            and self._stop is None
            and not self._waiting
        )
        return fast, len(self.sessions) > 0

    def _dispatch_one(self, producer: str, credit: Credit, incarnation: str, now: float) -> None:
        record = _Held(producer, credit, incarnation)
        self._held[record.key] = record
        self.stats.credits_received += 1
        if self._running < self.capacity and self._stop is None:
            self._start(record, now)
        else:
            self.stats.queued_over_capacity += 1
            self._waiting.append(record)

    def _start_executed(
        self,
        producer: str,
        credit: Credit,
        incarnation: str,
        now: float,
        result: ExecResult | None,
        error: Exception | None,
    ) -> None:
        """``_dispatch_one`` of a lone turn ``execute_lone_nowait`` already ran (or declined:
        ``None``, no error): ``_start`` from the point where ``execute_nowait`` returned."""
        if result is None and error is None:
            self._dispatch_one(producer, credit, incarnation, now)
            return
        record = _Held(producer, credit, incarnation)
        self._held[record.key] = record
        self.stats.credits_received += 1
        record.session = self.sessions.begin(credit, producer, now)
        record.started_at = now
        self._running += 1
        if error is not None:
            self._finish(record, _FAILED, self._failure_reason(record, error, now), now)
        elif result is not None:
            self._finish_with(record, result, now)

    def _end_lone(
        self, producer: str, incarnation: str, done: list[tuple[int, ExecResult]], now: float
    ) -> None:
        """The completions of lone turns that completed in ``_on_dispatch`` (``done`` is
        emptied): what ``_finish`` and ``_record`` do for each, once for the run."""
        if not done:
            return
        count = len(done)
        self._outbox += self.completions.record_completed(producer, incarnation, done)
        stats = self.stats
        stats.credits_received += count
        stats.completions[_COMPLETED_KEY] += count
        stats.duration_s.observe_many(0.0, count)  # started and ended at the same `now`
        zero_ttft = 0
        ttft_s = stats.ttft_s
        for _, result in done:
            ttft = result.ttft_s
            if ttft == 0.0:
                zero_ttft += 1
            elif ttft is not None:
                ttft_s.observe(ttft)
        if zero_ttft:
            ttft_s.observe_many(0.0, zero_ttft)
        done.clear()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._require_loop().call_soon(self._flush)
        if self._draining:
            self._wake.set()

    def _on_cancel(self, producer: str, credit_ids: list[int]) -> None:
        held = self._held
        for credit_id in credit_ids:
            record = held.get((producer, credit_id))
            if record is not None:  # ids we no longer hold: their completion stands
                self._cancel(record, CANCELLED)

    def _on_revoke(self, producer: str, credit_ids: list[int], now: float) -> None:
        """The router ended these credits itself (it is shutting down): stop them and never
        report them, then confirm with an ``InFlightReport`` (PROTOCOL.md §5.5)."""
        held = self._held
        revoked = 0
        for credit_id in credit_ids:
            record = held.get((producer, credit_id))
            if record is not None and not record.done:
                record.revoked = True
                revoked += 1
                self._cancel(record, REVOKED)
        forgotten = self.completions.forget(producer, credit_ids)
        self.stats.revoked += revoked + forgotten
        logger.info(
            "router ended %d credits itself: %d stopped, %d completions forgotten",
            len(credit_ids),
            revoked,
            forgotten,
        )
        self._send(InFlightReport(credits=self._report(self._router_incarnation, now)), now)

    # ---------------------------------------------------------------------------- credits

    def _start(self, held: _Held, now: float) -> None:
        credit = held.credit
        session = self.sessions.begin(credit, held.key[0], now)
        held.session = session
        held.started_at = now
        self._running += 1
        delay = credit.cancel_after_s
        if delay is not None and delay <= 0:
            self._finish(held, _CANCELLED, CLIENT_DISCONNECT, now)
            return
        try:
            result = self._executor.execute_nowait(credit, session)
        except Exception as exc:
            self._finish(held, _FAILED, self._failure_reason(held, exc, now), now)
            return
        if result is not None:
            self._finish_with(held, result, now)
            return
        held.on_first_token = lambda ttft_s: self._on_first_token(held, ttft_s)
        held.task = self._require_loop().create_task(self._execute(held, session))
        if delay is not None:
            held.timer = self._require_loop().call_later(
                delay, self._cancel, held, CLIENT_DISCONNECT
            )

    async def _execute(self, held: _Held, session: Session) -> None:
        callback = held.on_first_token
        assert callback is not None
        try:
            result = await self._executor.execute(held.credit, session, callback)
        except asyncio.CancelledError:
            reason = held.cancel_reason
            self._finish(held, _CANCELLED, reason or WORKER_STOPPED, self._require_loop().time())
            if reason is None:
                raise  # not ours (the loop is shutting down): honour the cancellation
            # Ours, with a reason, and reported above: the task ends normally.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return
        except Exception as exc:
            now = self._require_loop().time()
            self._finish(held, _FAILED, self._failure_reason(held, exc, now), now)
            return
        self._finish_with(held, result, self._require_loop().time())

    def _failure_reason(self, held: _Held, exc: Exception, now: float) -> str:
        reason = type(exc).__name__
        suppressed = self._throttle.ready("exec:" + reason, now)
        if suppressed is not None:
            logger.warning(
                "execution failed credit=%s/%d error=%r suppressed=%d",
                held.key[0],
                held.key[1],
                exc,
                suppressed,
            )
        return reason

    def _on_first_token(self, held: _Held, ttft_s: float) -> None:
        if held.done or held.ttft_s is not None:
            return
        held.ttft_s = ttft_s
        if (
            self.first_token_events
            and self._state is AgentState.JOINED
            and held.router_incarnation == self._router_incarnation
        ):
            producer, credit_id = held.key
            self._first_tokens.append(
                FirstToken(producer=producer, credit_id=credit_id, ttft_s=ttft_s)
            )
            self._schedule_flush()

    def _cancel(self, held: _Held, reason: str) -> None:
        """Abort a held credit for ``reason``; its completion follows (now if it was queued)."""
        if held.done:
            return
        if held.cancel_reason is None:
            held.cancel_reason = reason
        if held.task is not None:
            held.task.cancel()
        elif held.started_at is None:  # still queued: it ends here and now
            self._finish(held, _CANCELLED, reason, self._require_loop().time())

    def _finish_with(self, held: _Held, result: ExecResult, now: float) -> None:
        ttft = result.ttft_s if result.ttft_s is not None else held.ttft_s
        if len(result.result) > MAX_BLOB:
            # Past the protocol's bound the whole frame would be invalid, on every resend.
            suppressed = self._throttle.ready("result_too_large", now)
            if suppressed is not None:
                logger.warning(
                    "result of %d bytes exceeds %d: credit %s/%d reported failed suppressed=%d",
                    len(result.result),
                    MAX_BLOB,
                    held.key[0],
                    held.key[1],
                    suppressed,
                )
            self._finish(held, _FAILED, RESULT_TOO_LARGE, now, ttft)
        elif result.status is _COMPLETED:
            self._finish(held, _COMPLETED, "", now, ttft, result.result, result.turn)
        else:  # an executor says completed or failed; anything else counts as a failure
            self._finish(held, _FAILED, result.reason or "failed", now, ttft, result.result)

    def _finish(
        self,
        held: _Held,
        status: Status,
        reason: str,
        now: float,
        ttft_s: float | None = None,
        result: bytes = b"",
        turn: Turn | None = None,
    ) -> None:
        """The one place a credit ends: session bookkeeping, the completion, the next credit.

        This is the zero-latency hot path (once per credit), hence positional calls and
        inlined checks.
        """
        if held.done:
            return
        held.done = True
        del self._held[held.key]
        if held.timer is not None:
            held.timer.cancel()
        started = held.started_at
        if started is not None:
            self._running -= 1
        credit = held.credit
        end = self.sessions.end(
            credit,
            held.session,
            completed=status is _COMPLETED,
            turn=turn,
            producer=held.key[0],
            now=now,
        )
        if not held.revoked:  # (revoked: the router ended it already; never reported)
            self._record(held, status, reason, now, started, ttft_s, result, end)
        if self._waiting:
            self._start_waiting(now)
        if self._draining:
            self._wake.set()

    def _record(
        self,
        held: _Held,
        status: Status,
        reason: str,
        now: float,
        started: float | None,
        ttft_s: float | None,
        result: bytes,
        end: TurnEnd,
    ) -> None:
        """Number the credit's completion, count it, and queue it for this iteration's flush."""
        credit = held.credit
        entry = self.completions.record(
            held.key[0],
            credit.id,
            status,
            held.router_incarnation,
            reason if len(reason) <= MAX_TEXT else reason[:MAX_TEXT],  # the protocol's bound
            ttft_s if ttft_s is not None else held.ttft_s,
            None if started is None else now - started,
            end.session_ended,
            result,
            end.child_release,
        )
        stats = self.stats
        stats.completions[status] += 1  # a StrEnum member finds its str key
        if started is not None:
            stats.duration_s.observe(now - started)
        if status is _COMPLETED:
            ttft = ttft_s if ttft_s is not None else held.ttft_s
            if ttft is not None:
                stats.ttft_s.observe(ttft)
        elif status is _FAILED:
            kind = _kind(reason, stats.errors)
            stats.errors[kind] = stats.errors.get(kind, 0) + 1
        self._outbox.append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._require_loop().call_soon(self._flush)

    def _start_waiting(self, now: float) -> None:
        if self._stop is not None:
            return  # stopping: the shutdown sweep ends whatever still waits
        waiting = self._waiting
        while waiting and self._running < self.capacity:
            held = waiting.popleft()
            if not held.done:
                self._start(held, now)

    # --------------------------------------------------------------------------- outbound

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._require_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send this iteration's first tokens and completions (one frame for the completions)."""
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, []
        first_tokens, self._first_tokens = self._first_tokens, []
        # (`self._state is not AgentState.JOINED`, without the property and its enum lookup)
        if self._stopped or self._session.state is not _READY or self._transport is None:
            return  # completions stay in the log and go after the next Welcome
        now = self._require_loop().time()
        if first_tokens:
            self._send_first_tokens(first_tokens, outbox, now)
        if outbox:
            self._send_completions(outbox, now)

    def _send_first_tokens(
        self, first_tokens: list[FirstToken], outbox: list[Logged], now: float
    ) -> None:
        done = {(e.completion.producer, e.completion.credit_id) for e in outbox}
        for event in first_tokens:
            if (event.producer, event.credit_id) in done:
                self.stats.first_tokens_coalesced += 1  # the completion carries the TTFT
                continue
            self._send(event, now)
            self.stats.first_tokens_sent += 1

    def _send_completions(self, entries: list[Logged], now: float) -> None:
        recovered = 0
        for msg in completion_messages(entries, self._router_incarnation):
            self._send(msg, now)
            if type(msg) is Recovered:
                recovered += len(msg.completions)
        self.stats.recovered_completions += recovered

    def _send(self, msg: WorkerToRouter, now: float) -> None:
        transport = self._transport
        # (`self._state is AgentState.STOPPED`, without the property and its enum lookup)
        if transport is None or self._stopped or self._session.state in _PEER_STOPPED:
            return
        if logger.isEnabledFor(_DEBUG):
            logger.debug("->> %r", msg)
        try:
            transport.send(encode(msg))
        except TransportError as exc:
            self._on_transport_error(exc)
            return
        self._session.sent(now)

    def _report(self, incarnation: str | None, now: float) -> dict[str, list[int]]:
        """Held credits of ``incarnation`` by producer, within the protocol's bounds."""
        credits, left_out = bound_in_flight(self._held_by_producer(incarnation))
        if left_out:
            suppressed = self._throttle.ready("in_flight_bound", now)
            if suppressed is not None:
                logger.warning(
                    "in-flight set exceeds the protocol's bounds: %d ids left out suppressed=%d",
                    left_out,
                    suppressed,
                )
        return credits

    def _held_by_producer(self, incarnation: str | None) -> dict[str, list[int]]:
        """Held credit ids by producer: of one router incarnation, or all with ``None``."""
        out: dict[str, list[int]] = {}
        for held in self._held.values():
            if held.revoked:
                continue  # the router ended it: it is not ours to report any more
            if incarnation is None or held.router_incarnation == incarnation:
                producer, credit_id = held.key
                ids = out.get(producer)
                if ids is None:
                    out[producer] = [credit_id]
                else:
                    ids.append(credit_id)
        return out


def _check_identity(name: str, labels: Mapping[str, str]) -> None:
    """Refuse, up front, a name or labels that would make every ``Hello`` invalid."""
    encoded = name.encode("utf-8")
    if not name or len(name) > MAX_ID or len(encoded) > 255 or encoded[0] == 0:
        raise ValueError(
            f"worker name must be 1-{MAX_ID} characters, at most 255 bytes of UTF-8 "
            f"(a ZeroMQ routing id), not starting with NUL: {name!r}"
        )
    if "/" in name:
        raise ValueError(
            f"worker name {name!r} must not contain '/': the routing id is NAME/INCARNATION "
            "(the router reads the name up to the first '/')"
        )
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if len(key) > MAX_ID or len(value) > MAX_TEXT:
            raise ValueError(f"label {key[:40]!r} too long (keys {MAX_ID}, values {MAX_TEXT})")


def _dealer_factory(
    endpoint: str, routing_id: str, on_frames: FrameHandler, on_error: ErrorHandler
) -> Transport:
    return DealerTransport(endpoint, routing_id, on_frames, on_error=on_error)
