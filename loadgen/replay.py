"""The replayer: a producer that turns a workload into credits on a ``RouterClient``.

Each root of the workload starts a *tree*: the root session and every child it declares. A
session instance runs its turns in order; a turn is issued when the previous one completed,
its joins are satisfied (every child of a branch joined at this turn has finished, whatever its
outcome) and its think time has passed (and, for traces, its offset from the session's first
turn). When a turn completes, the children it declares start: FORK children with the parent as
``parent_correlation_id`` and ``fork_count`` set on the declaring credit (so the router reserves
the parent's worker for them), SPAWN children as fresh sessions with their ``subagent_type``.
A turn that does not complete ends its session (the router and worker drop it; its children
already started go on).

How trees start (``ReplayOptions.mode``):

* ``concurrency`` — keep ``concurrency`` trees live; a new one starts when one ends;
* ``rate`` — start trees at ``rate`` per second (constant, Poisson or gamma arrivals);
* ``timestamps`` — start each root at its ``start_s`` (divided by ``speedup``).

Every schedule is anchored (``loadgen.schedule``): a tree's start is an absolute time from the
run's start, computed from the arrival process or the trace alone, and a turn's is the moment it
became ready (the previous turn completed, its joins released; a child's: its declaring turn
completed) plus its think time, or its trace offset from the session's first *intended* time.
The producer waits until that time and, if it wakes late, sends at once: lateness is recorded per
credit (``intended_at_s``), never carried into the next arrival. ``speedup`` divides every time
of the workload (start times, offsets, think times); ``think_scale`` multiplies think times only.

Roots are taken in file order, cycling, so a workload can feed a run longer than itself. The run
stops issuing after ``duration_s`` (a credit is issued if its intended time is before the stop,
even when it is sent a little after) or once ``sessions`` trees were started (timestamps: after
the last root), then waits for the credits in flight up to ``grace_s``, cancels the rest through
the router, and ends every session it abandoned (``EndSession``), so nothing stays reserved.
A credit whose outcome still has not come ``cancel_wait_s`` after that cancellation is given
up: it counts in ``unfinished`` and gets a record of status ``NO_OUTCOME``.

Under ``concurrency``, a ``rejected: router_draining`` outcome (a router draining for shutdown
rejects every new credit) holds new trees for ``BACKOFF_FIRST_S``, doubling to ``BACKOFF_MAX_S``
while the rejections go on, instead of starting the next root the moment a rejected one frees
its slot; a dispatched credit, or a new router incarnation, ends the hold (``Replayer._pace``).

Every credit submitted becomes one ``CreditRecord`` (its identity, its schedule, its outcome and the
executor's ``RequestResult``) handed to ``on_record``; ``affinity`` says whether a turn with
history (a later turn, or a FORK child's first) ran on the worker that held that history.
What the workload declared but the run never sent is counted in ``not_sent`` (``NotSent``): after
a failed turn (its session's later turns, the children of that turn and later ones, the joins
that never happened) apart from what the run's stop cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from loadgen.schedule import Arrival, Clock, arrival_times, monotonic, sleep_until
from loadgen.workload import BranchPlan, Recorded, SessionSpec, Workload
from protocol.inference import TurnRequest, decode_result, encode_request
from protocol.messages import BranchMode, Credit, Outcome, Status

__all__ = [
    "BACKOFF_FIRST_S",
    "BACKOFF_MAX_S",
    "NO_OUTCOME",
    "CreditRecord",
    "Mode",
    "NotSent",
    "Producer",
    "ReplayOptions",
    "ReplayProgress",
    "Replayer",
]

logger = logging.getLogger(__name__)

Mode = Literal["concurrency", "rate", "timestamps"]

NO_OUTCOME = "no_outcome"
"""A record's ``status`` when the credit never got an outcome: the run gave up waiting (the
grace period and the cancel wait ran out, e.g. while the router restarted)."""
GAVE_UP_WAITING = "gave_up_waiting"
"""The ``reason`` of a ``NO_OUTCOME`` record."""
ROUTER_DRAINING = "router_draining"
"""The reason of a ``rejected`` outcome from a router draining for shutdown (PROTOCOL.md)."""
BACKOFF_FIRST_S = 0.5
"""After a ``router_draining`` rejection, new trees wait this long (``concurrency``)…"""
BACKOFF_MAX_S = 5.0
"""…doubling on each further rejection up to this."""
BACKOFF_STEP_S = 0.1
"""How often a back-off looks for a stop or a new router incarnation."""


class Producer(Protocol):
    """What the replayer needs of a ``RouterClient`` (tests pass a fake)."""

    async def submit(self, credit: Credit) -> asyncio.Future[Outcome]:
        """Submit one credit; the future resolves with its one outcome."""
        ...

    def cancel(self, credit_ids: Iterable[int]) -> None:
        """Cancel credits."""
        ...

    def end_session(self, session: str, reason: str = "") -> None:
        """No more turns (or FORK children) of this session."""
        ...


@dataclass(frozen=True)
class ReplayOptions:
    """How to replay a workload (module docstring).

    Attributes:
        mode: ``concurrency``, ``rate`` or ``timestamps``.
        concurrency: live trees in ``concurrency`` mode.
        rate: trees started per second in ``rate`` mode.
        arrival: ``constant``, ``poisson`` or ``gamma`` spacing in ``rate`` mode.
        burstiness: ``gamma`` arrivals: the gap distribution's shape (1 = Poisson).
        speedup: the workload's times (start times, offsets, think times) run this much faster.
        think_scale: think times (a turn's ``delay_s``) are multiplied by this.
        duration_s: stop issuing after this long (``None``: no time limit).
        sessions: stop after starting this many trees (``None``: one pass over the roots when
            there is no ``duration_s`` either).
        grace_s: after the stop, wait this long for credits in flight before cancelling them.
        cancel_wait_s: after cancelling, wait this long for their outcomes.
        seed: seeds arrivals and sampled think times.
        allow_migration: set ``allow_migration`` on every credit (else the workload's).
        phase: ``Credit.phase``.
        model: the model the workers send when a turn names none (for the records only).
    """

    mode: Mode = "concurrency"
    concurrency: int = 16
    rate: float = 4.0
    arrival: Arrival = "poisson"
    burstiness: float = 1.0
    speedup: float = 1.0
    think_scale: float = 1.0
    duration_s: float | None = None
    sessions: int | None = None
    grace_s: float = 10.0
    cancel_wait_s: float = 5.0
    seed: int = 0
    allow_migration: bool = False
    phase: str = "profiling"
    model: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.rate <= 0 or self.speedup <= 0:
            raise ValueError("concurrency must be >= 1, rate and speedup > 0")
        if self.burstiness <= 0 or self.think_scale < 0:
            raise ValueError("burstiness must be > 0 and think_scale >= 0")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration_s must be > 0")
        if self.sessions is not None and self.sessions < 1:
            raise ValueError("sessions must be >= 1")


class CreditRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One credit: who it was, when it was due, how it ended, what it measured.

    A line of ``--records`` and ``records.jsonl``; ``docs/RUN.md`` lists the fields. Times named
    ``*_at_s`` are seconds from the run's start on the producer's monotonic clock; durations are
    seconds. Token counts are ``None`` for a credit that did not complete.
    """

    credit_id: int
    request_id: str = ""
    """``<session>/<turn>``: the session's ``X-Correlation-ID`` (the worker's header) and turn."""
    x_request_id: str = ""
    """The ``X-Request-ID`` header the worker sent (HTTP executors; empty otherwise): the key
    to this request in the server's logs."""
    session: str
    conversation: str
    root: str
    parent: str | None = None
    branch_mode: str | None = None
    depth: int = 0
    subagent_type: str | None = None
    turn_index: int = 0
    num_turns: int = 1
    fork_count: int = 0
    model: str | None = None
    """The model name sent (the turn's, else the run's ``--model``; ``None`` if unknown)."""
    max_tokens: int | None = None
    """The ``max_tokens`` requested (the workload's output length; ``None``: server default)."""
    intended_at_s: float | None = None
    """When the schedule wanted it sent."""
    submitted_at_s: float
    """When it was submitted to the router."""
    submitted_unix_s: float = 0.0
    """The same moment, wall clock (Unix seconds)."""
    first_token_at_s: float | None = None
    """When the worker's first-token notice reached the producer."""
    done_at_s: float | None = None
    """When its outcome reached the producer."""
    status: str
    reason: str = ""
    error: str = ""
    """The worker's detail for a failed request (a server's message)."""
    stopped: bool = False
    """Cancelled by the run's own stop (grace period over): not an error."""
    worker: str = ""
    affinity: bool | None = None
    """Had history (later turn, FORK child): did it run on the worker holding it?"""
    lateness_s: float | None = None
    """Intended → dispatched: ``submitted_at_s - intended_at_s + submit_to_dispatch_s``."""
    submit_to_dispatch_s: float | None = None
    dispatch_to_outcome_s: float | None = None
    ttft_s: float | None = None
    """Worker-measured, from the request's send."""
    ttft_from_intended_s: float | None = None
    """From the intended time to the first token (what a user of the trace would wait)."""
    itl_s: float | None = None
    e2e_s: float | None = None
    """Worker-measured, from the request's send to its last byte."""
    e2e_from_intended_s: float | None = None
    """From the intended time to the outcome's arrival."""
    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    http_status: int | None = None
    endpoint: str | None = None
    rebuilt: bool = False
    recorded: Recorded | None = None
    """What the trace recorded for this request (its ``api_time_s``, ``ttft_s``…)."""
    reasoning_tokens: int | None = None
    """Of ``output_tokens``, reasoning (``None``: unknown)."""
    ttft_content_s: float | None = None
    """Time to the first content token (``ttft_s`` counts reasoning and tool calls too)."""
    tool_calls: int = 0


@dataclass
class NotSent:
    """What the workload declared and the run never sent, for one cause."""

    turns: int = 0
    """Later turns of sessions that ended early."""
    children: int = 0
    """Child sessions never started (with every session below them)."""
    credits: int = 0
    """Requests those turns and children would have sent."""
    joins: int = 0
    """Joins that never happened (their children ran, the joining turn did not)."""

    def as_dict(self) -> dict[str, int]:
        """Plain data."""
        return {"turns": self.turns, "children": self.children, "credits": self.credits,
                "joins": self.joins}  # fmt: skip


@dataclass
class ReplayProgress:
    """A snapshot for progress displays."""

    elapsed_s: float
    submitted: int
    done: int
    errors: int
    in_flight: int
    trees_started: int
    trees_live: int
    expected_credits: int | None
    """Credits the run will issue if it is bounded by a count (``None`` under a time limit)."""
    stopping: bool


class _Tree:
    __slots__ = ("live", "root")

    def __init__(self, root: str) -> None:
        self.root = root
        self.live = 0


class _Instance:
    """One running session: a template, its place in a tree, its progress."""

    __slots__ = (
        "context_tokens",
        "depth",
        "done",
        "expected_worker",
        "failed",
        "first_intended",
        "issued",
        "join",
        "join_turns",
        "joined",
        "joins",
        "last_done_at",
        "mode",
        "parent",
        "reached",
        "ready_at",
        "root_xid",
        "sleeping",
        "spec",
        "task",
        "tree",
        "unstarted_forks",
        "waiting",
        "xid",
    )

    def __init__(
        self,
        spec: SessionSpec,
        xid: str,
        tree: _Tree,
        ready_at: float,
        *,
        parent: _Instance | None = None,
        mode: BranchMode | None = None,
        root_xid: str | None = None,
    ) -> None:
        self.spec = spec
        self.xid = xid
        self.tree = tree
        self.parent = parent
        self.mode = mode
        self.root_xid = root_xid or xid
        fork = mode is BranchMode.FORK and parent is not None
        self.depth: int = parent.depth + 1 if parent is not None else (0 if root_xid is None else 1)
        self.context_tokens: int = parent.context_tokens if fork and parent else 0
        """Tokens of history so far (a FORK child starts with its parent's)."""
        self.expected_worker: str = parent.expected_worker if fork and parent else ""
        """The worker holding the history (the last turn's, or a FORK parent's)."""
        self.joins: dict[int, int] = {}
        self.joined = asyncio.Event()
        self.join: tuple[_Instance, int] | None = None
        self.join_turns: set[int] = set()
        """Turns that join children already started."""
        self.issued = 0
        self.reached = 0
        """Turns the session got to (sent, or for an orchestrator passed)."""
        self.unstarted_forks = 0
        self.ready_at = ready_at
        """When the next turn became ready (run-start seconds): the tree's or the child's start,
        then each completion or join release. Its think time counts from here."""
        self.last_done_at = ready_at
        self.first_intended: float | None = None
        self.failed = False
        self.waiting = False
        """Awaiting an outcome (not to be cancelled at the stop: the router ends it)."""
        self.sleeping = False
        """Waiting for its intended time or its joins (cancelled at the stop)."""
        self.done = 0
        """Turns finished."""
        self.task: asyncio.Task[None] | None = None


class Replayer:
    """Replays ``workload`` through ``producer`` (module docstring).

    Args:
        workload: what to send.
        producer: a connected ``RouterClient`` (or anything with its ``Producer`` methods).
        options: how.
        on_record: called with every credit's record, when its outcome arrives.
        clock: the schedule's clock (``loadgen.schedule.monotonic``; tests may pass another).

    Attributes:
        not_sent: ``{"failure": NotSent, "stop": NotSent}`` (module docstring).
    """

    def __init__(
        self,
        workload: Workload,
        producer: Producer,
        options: ReplayOptions | None = None,
        on_record: Callable[[CreditRecord], None] | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self.workload = workload
        self.producer = producer
        self.options = options or ReplayOptions()
        self.on_record = on_record
        self.clock = clock
        self._rng = random.Random(self.options.seed)
        self._tag = secrets.token_hex(3)
        self._ids = itertools.count(1)
        self._instances = itertools.count(1)
        self._live: set[_Instance] = set()
        self._outstanding: dict[int, _Instance] = {}
        self._sent: dict[int, tuple[Credit, float, float]] = {}
        """Outstanding credit id -> (credit, intended, submitted_at): to record one that never
        gets an outcome."""
        self._backoff_s = 0.0
        """The current back-off after a ``router_draining`` rejection (0: none)."""
        self._backoff_until = 0.0
        """Run-start second before which no new tree starts (a draining router)."""
        self._backoff_since = 0.0
        """When the credit that started the back-off was sent (run-start seconds)."""
        self._backoff_router: str | None = None
        """The router incarnation that rejected us as draining."""
        self._first_tokens: dict[int, float] = {}
        self._stop_cancelled: set[int] = set()
        self._tree_done = asyncio.Event()
        self._stopping = False
        self._stop_at: float | None = None
        self._t0 = 0.0
        self._unix0 = 0.0
        self._expected: int | None = None
        self._expected_known = False
        self._sizes: dict[str, int] = {}
        self.submitted = 0
        self.done = 0
        self.errors = 0
        self.unfinished = 0
        """Credits still without an outcome when the replayer gave up waiting."""
        self.trees_started = 0
        self.trees_live = 0
        self.outcomes: dict[str, int] = {}
        self.not_sent: dict[str, NotSent] = {"failure": NotSent(), "stop": NotSent()}

    # ------------------------------------------------------------------ public

    def now(self) -> float:
        """Seconds since the run started (the schedule's clock)."""
        return self.clock() - self._t0

    def progress(self) -> ReplayProgress:
        """Where the run stands (cheap: counters only)."""
        return ReplayProgress(
            elapsed_s=self.now() if self._t0 else 0.0,
            submitted=self.submitted,
            done=self.done,
            errors=self.errors,
            in_flight=len(self._outstanding),
            trees_started=self.trees_started,
            trees_live=self.trees_live,
            expected_credits=self._expected_credits(),
            stopping=self._stopping,
        )

    def first_token(self, credit_id: int, ttft_s: float) -> None:
        """A worker saw a credit's first token (``RouterClient(on_first_token=…)``)."""
        if credit_id in self._outstanding:
            self._first_tokens.setdefault(credit_id, self.now())

    def stop(self, at: float | None = None) -> None:
        """Issue nothing intended from now (or from ``at``, run-start seconds) on.

        What is in flight finishes, within the grace period; a credit intended before the stop
        is still sent, however late its producer wakes.
        """
        if self._stopping:
            return
        self._stopping = True
        self._stop_at = self.now() if at is None else at
        for inst in list(self._live):
            if inst.sleeping and inst.task is not None:
                inst.task.cancel()
        self._tree_done.set()

    async def run(self) -> None:
        """Replay until a stop condition, then settle what is in flight (module docstring)."""
        loop = asyncio.get_running_loop()
        self._t0 = self.clock()
        self._unix0 = time.time()
        opts = self.options
        timer = None
        if opts.duration_s is not None:
            # The stop is at the schedule's ``duration_s`` whenever the timer fires: what was
            # intended before it still goes out, however late.
            duration = opts.duration_s
            timer = loop.call_later(duration, lambda: self.stop(at=duration))
        try:
            await self._launch()
            await self._drain()
        finally:
            if timer is not None:
                timer.cancel()
            self.stop()
            for inst in list(self._live):
                if inst.task is not None:
                    inst.task.cancel()
            tasks = [i.task for i in self._live if i.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ trees

    def _limit(self) -> int | None:
        opts = self.options
        if opts.sessions is not None:
            return opts.sessions
        if opts.duration_s is None or opts.mode == "timestamps":
            return len(self.workload.roots)
        return None

    def _expected_credits(self) -> int | None:
        if not self._expected_known:
            self._expected_known = True
            limit = self._limit()
            if limit is not None and self.options.duration_s is None:
                roots, w = self.workload.roots, self.workload
                self._expected = sum(w.credits_in_tree(roots[i % len(roots)]) for i in range(limit))
        return self._expected

    async def _until(self, at: float) -> None:
        """Wait until run-start second ``at``."""
        await sleep_until(self._t0 + at, self.clock)

    def _schedule(self) -> Iterable[tuple[str, float | None]]:
        """``(root, intended start)`` in order; ``None``: when a slot frees (concurrency)."""
        opts = self.options
        roots = self.workload.roots
        limit = self._limit()
        if opts.mode == "timestamps":
            order = sorted(roots, key=lambda r: self.workload.sessions[r].start_s or 0.0)
            first = (self.workload.sessions[order[0]].start_s or 0.0) / opts.speedup
            last = (self.workload.sessions[order[-1]].start_s or 0.0) / opts.speedup
            # Another pass over the trace (``sessions`` beyond its length) follows the last
            # root by the trace's mean gap, as the trace's own next root would.
            k = len(order)
            period = (last - first) * k / (k - 1) if k > 1 else 0.0
            for n in range(limit if limit is not None else k):
                root = order[n % k]
                start = (self.workload.sessions[root].start_s or 0.0) / opts.speedup
                yield root, start + (n // k) * period
            return
        counter = range(limit) if limit is not None else itertools.count()
        if opts.mode == "rate":
            times = arrival_times(
                opts.rate, opts.arrival, seed=opts.seed, burstiness=opts.burstiness
            )
            for n, at in zip(counter, times, strict=False):
                yield roots[n % len(roots)], at
        else:
            for n in counter:
                yield roots[n % len(roots)], None

    async def _launch(self) -> None:
        """Start trees as the mode says, until the stop or the limit."""
        opts = self.options
        duration = opts.duration_s
        for root, at in self._schedule():
            if at is None:  # concurrency: a tree starts when a slot frees
                while self.trees_live >= opts.concurrency and not self._stopping:
                    self._tree_done.clear()
                    await self._tree_done.wait()
                await self._held()
                if self._stopping:
                    return
                self._start_tree(root, self.now())
                continue
            if duration is not None and at >= duration:
                break
            while not self._cut(at):
                # In steps, so that a stop (Ctrl-C) is seen during a long gap of a trace.
                step = min(at, self.now() + 0.25)
                await self._until(step)
                if step >= at:
                    break
            if self._cut(at):
                return
            self._start_tree(root, at)

    async def _drain(self) -> None:
        """Wait for the live trees; past the stop, give them ``grace_s``, then cancel."""
        opts = self.options
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while self._live:
            if self._stopping and deadline is None:
                deadline = loop.time() + opts.grace_s
            self._tree_done.clear()
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tree_done.wait(), timeout)
            if deadline is not None and loop.time() >= deadline:
                break
        if not self._outstanding:
            return
        logger.info("cancelling %d credits still in flight", len(self._outstanding))
        self._stop_cancelled.update(self._outstanding)
        self.producer.cancel(list(self._outstanding))
        end = loop.time() + opts.cancel_wait_s
        while self._outstanding and loop.time() < end:
            self._tree_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tree_done.wait(), max(0.0, end - loop.time()))
        self.unfinished = len(self._outstanding)
        if self.unfinished:
            logger.warning("%d credits had no outcome when the replayer stopped", self.unfinished)
            # Still one record per credit: these say they have none (``NO_OUTCOME``).
            for credit_id, inst in list(self._outstanding.items()):
                credit, intended, submitted_at = self._sent[credit_id]
                self._record_no_outcome(inst, credit, intended, submitted_at)

    def _start_tree(self, root: str, at: float) -> None:
        tree = _Tree(root)
        self.trees_started += 1
        self.trees_live += 1
        inst = self._instance(self.workload.sessions[root], tree, at)
        for child in inst.spec.pre_spawns:  # before turn 0: no parent id, depth 1
            pre = self._instance(
                self.workload.sessions[child], tree, at, mode=None, parent=None, root_xid=inst.xid
            )
            self._begin(pre)
        self._begin(inst)

    def _instance(
        self,
        spec: SessionSpec,
        tree: _Tree,
        ready_at: float,
        *,
        parent: _Instance | None = None,
        mode: BranchMode | None = None,
        root_xid: str | None = None,
    ) -> _Instance:
        xid = f"{spec.id[:200]}~{self._tag}{next(self._instances):x}"
        root = root_xid or (parent.root_xid if parent is not None else None)
        inst = _Instance(spec, xid, tree, ready_at, parent=parent, mode=mode, root_xid=root)
        tree.live += 1
        self._live.add(inst)
        return inst

    def _begin(self, inst: _Instance) -> None:
        inst.task = asyncio.get_running_loop().create_task(self._session(inst))
        inst.task.add_done_callback(_log_failure)

    # ------------------------------------------------------------------ one session

    async def _session(self, inst: _Instance) -> None:
        complete = False
        try:
            complete = await self._turns(inst)
        finally:
            self._finish(inst, complete)

    def _intended(self, inst: _Instance, k: int) -> float:
        """Turn ``k``'s intended time: ready + think time, or its trace offset (anchored)."""
        opts = self.options
        turn = inst.spec.turns[k]
        think = turn.think_time(self._rng) * opts.think_scale / opts.speedup
        at = inst.ready_at + think
        if turn.offset_s is not None and inst.first_intended is not None:
            at = max(at, inst.first_intended + turn.offset_s / opts.speedup)
        return at

    def _cut(self, at: float) -> bool:
        """Is a turn intended at ``at`` past the stop?"""
        return self._stopping and (self._stop_at is None or at >= self._stop_at)

    async def _turns(self, inst: _Instance) -> bool:
        """Run the turns; ``True`` if every one completed."""
        spec = inst.spec
        for k in range(len(spec.turns)):
            if inst.joins.get(k, 0) > 0:
                inst.sleeping = True
                try:
                    while inst.joins.get(k, 0) > 0:
                        if self._stopping:
                            return False
                        inst.joined.clear()
                        await inst.joined.wait()
                finally:
                    inst.sleeping = False
            at = self._intended(inst, k)
            if self._cut(at):
                return False
            if at > self.now():
                inst.sleeping = True
                try:
                    await self._until(at)
                finally:
                    inst.sleeping = False
                if self._cut(at):
                    return False
            if inst.first_intended is None:
                inst.first_intended = at
            inst.reached = k + 1
            if not spec.orchestrator and not await self._issue(inst, k, at):
                return False
            inst.done = k + 1
            # An orchestrator's turn sends nothing: it is over at its intended time.
            inst.ready_at = at if spec.orchestrator else inst.last_done_at
            self._branches(inst, k)
        return True

    async def _issue(self, inst: _Instance, k: int, intended: float) -> bool:
        """Send turn ``k`` and await its outcome; ``True`` if it completed."""
        credit = self._credit(inst, k)
        inst.waiting = True
        inst.issued += 1
        try:
            future = await self.producer.submit(credit)
            submitted_at = self.now()
            self.submitted += 1
            self._outstanding[credit.id] = inst
            self._sent[credit.id] = (credit, intended, submitted_at)
            try:
                outcome = await future
            finally:
                self._outstanding.pop(credit.id, None)
                self._sent.pop(credit.id, None)
        finally:
            inst.waiting = False
        inst.last_done_at = self.now()
        self._record(inst, credit, outcome, intended, submitted_at)
        self._pace(outcome, submitted_at)
        self._tree_done.set()  # wakes _drain's wait on outstanding credits too
        if outcome.status is Status.COMPLETED:
            return True
        inst.failed = credit.id not in self._stop_cancelled
        return False

    def _credit(self, inst: _Instance, k: int) -> Credit:
        spec = inst.spec
        turn = spec.turns[k]
        w = self.workload
        request = TurnRequest(
            messages=turn.messages,
            input_tokens=turn.input_tokens,
            hash_ids=turn.hash_ids,
            block_tokens=w.block_tokens if turn.hash_ids else None,
            output_tokens=turn.output_tokens,
            model=turn.model,
            tools=turn.tools,
            extra=turn.extra,
            context_tokens=inst.context_tokens,
        )
        parent = inst.parent
        if parent is not None and parent.spec.orchestrator:
            parent = None  # an orchestrator sends nothing: its children have no parent (AIPerf)
        return Credit(
            id=next(self._ids),
            x_correlation_id=inst.xid,
            turn_index=k,
            num_turns=len(spec.turns),
            conversation_id=spec.id[:256],
            phase=self.options.phase,
            parent_correlation_id=parent.xid if parent is not None else None,
            root_correlation_id=inst.root_xid if inst.root_xid != inst.xid else None,
            branch_mode=inst.mode,
            fork_count=w.fork_count(spec.id, k),
            agent_depth=inst.depth,
            subagent_type=spec.subagent_type if inst.mode is BranchMode.SPAWN else None,
            allow_migration=spec.allow_migration or self.options.allow_migration,
            cancel_after_s=turn.cancel_after_s,
            payload=encode_request(request),
        )

    def _branches(self, inst: _Instance, k: int) -> None:
        """Turn ``k`` completed: start the children it declares (unless stopping)."""
        plans: list[BranchPlan] = self.workload.branches.get((inst.spec.id, k), [])
        for plan in plans:
            for child_id in plan.children:
                if self._cut(inst.ready_at):
                    if plan.mode is BranchMode.FORK:
                        inst.unstarted_forks += 1
                    self._not_started(self.not_sent["stop"], child_id)
                    continue
                child = self._instance(
                    self.workload.sessions[child_id],
                    inst.tree,
                    inst.ready_at,
                    parent=inst,
                    mode=plan.mode,
                )
                if plan.join_at is not None:
                    inst.joins[plan.join_at] = inst.joins.get(plan.join_at, 0) + 1
                    inst.join_turns.add(plan.join_at)
                    child.join = (inst, plan.join_at)
                self._begin(child)

    def _sessions_in(self, sid: str) -> int:
        """Sessions one instance of ``sid`` starts, itself included."""
        cached = self._sizes.get(sid)
        if cached is None:
            spec = self.workload.sessions[sid]
            cached = 1 + sum(self._sessions_in(c) for c in spec.pre_spawns)
            for t in range(len(spec.turns)):
                for plan in self.workload.branches.get((sid, t), ()):
                    cached += sum(self._sessions_in(c) for c in plan.children)
            self._sizes[sid] = cached
        return cached

    def _not_started(self, tally: NotSent, child: str) -> None:
        tally.children += self._sessions_in(child)
        tally.credits += self.workload.credits_in_tree(child)

    def _count_unsent(self, inst: _Instance) -> None:
        """The session ended early: count what it will never send, by cause."""
        tally = self.not_sent["failure" if inst.failed else "stop"]
        spec = inst.spec
        if not spec.orchestrator:
            tally.turns += len(spec.turns) - inst.reached
            tally.credits += len(spec.turns) - inst.reached
        for t in range(inst.done, len(spec.turns)):
            for plan in self.workload.branches.get((spec.id, t), ()):
                for child in plan.children:
                    self._not_started(tally, child)
        tally.joins += sum(1 for t in inst.join_turns if t >= inst.reached)

    def _finish(self, inst: _Instance, complete: bool) -> None:
        """The session is over: free what it holds, release its join, maybe its tree."""
        if inst not in self._live:
            return
        self._live.discard(inst)
        if not complete:
            self._count_unsent(inst)
        if inst.issued and (not complete or inst.unstarted_forks):
            # Turns or FORK children it declared will never come: the router and the worker
            # free the session (and its reservations) now rather than at their idle timeout.
            self.producer.end_session(inst.xid, "replay_stopped" if self._stopping else "ended")
        if inst.join is not None:
            parent, turn = inst.join
            parent.joins[turn] -= 1
            # The join's release is when the parent's turn becomes ready (if later than its
            # own previous completion).
            parent.ready_at = max(parent.ready_at, self.now())
            parent.joined.set()
        tree = inst.tree
        tree.live -= 1
        if tree.live == 0:
            self.trees_live -= 1
        self._tree_done.set()

    # ------------------------------------------------------------------ records

    def _record(
        self,
        inst: _Instance,
        credit: Credit,
        outcome: Outcome,
        intended: float,
        submitted_at: float,
    ) -> None:
        self.done += 1
        status = outcome.status.value
        stopped = credit.id in self._stop_cancelled and outcome.status is Status.CANCELLED
        self.outcomes[status] = self.outcomes.get(status, 0) + 1
        completed = outcome.status is Status.COMPLETED
        if not completed and not stopped:
            self.errors += 1
        result = decode_result(outcome.result)
        expected = inst.expected_worker
        has_history = credit.turn_index > 0 or credit.branch_mode is BranchMode.FORK
        affinity = None
        if has_history and expected and outcome.worker:
            affinity = outcome.worker == expected
        if outcome.worker:
            inst.expected_worker = outcome.worker
        if result is not None and completed:
            inst.context_tokens = result.input_tokens + result.output_tokens
        done_at = inst.last_done_at
        first_token_at = self._first_tokens.pop(credit.id, None)
        wait = outcome.submit_to_dispatch_s
        record = self._identity(inst, credit, intended, submitted_at)
        record.first_token_at_s = _round(first_token_at)
        record.done_at_s = _round(done_at)
        record.status = status
        record.reason = outcome.reason
        record.stopped = stopped
        record.worker = outcome.worker
        record.affinity = affinity
        record.lateness_s = _round(submitted_at - intended + wait) if wait is not None else None
        record.submit_to_dispatch_s = wait
        record.dispatch_to_outcome_s = outcome.dispatch_to_outcome_s
        record.e2e_from_intended_s = _round(done_at - intended)
        ttft = outcome.ttft_s if result is None or result.ttft_s is None else result.ttft_s
        if result is not None:
            record.http_status = result.http_status
            record.endpoint = result.endpoint or None
            record.error = result.error
            record.x_request_id = result.request_id
        if completed:
            record.ttft_s = ttft
            if first_token_at is not None:
                record.ttft_from_intended_s = _round(first_token_at - intended)
            elif ttft is not None and result is not None and result.e2e_s is not None:
                # No first-token notice: the outcome's arrival less the worker's decode tail.
                tail = max(0.0, result.e2e_s - ttft)
                record.ttft_from_intended_s = _round(done_at - intended - tail)
            if result is not None:
                # A failed request's token counts are unknown (the result's 0 is a default).
                record.itl_s = result.itl_s
                record.e2e_s = result.e2e_s
                record.input_tokens = result.input_tokens
                record.cached_tokens = result.cached_tokens
                record.output_tokens = result.output_tokens
                record.rebuilt = result.rebuilt
                record.reasoning_tokens = result.reasoning_tokens
                record.ttft_content_s = result.ttft_content_s
                record.tool_calls = result.tool_calls
        if self.on_record is not None:
            self.on_record(record)

    def _identity(
        self, inst: _Instance, credit: Credit, intended: float, submitted_at: float
    ) -> CreditRecord:
        """A record of who the credit was and when it was due and sent (no outcome yet)."""
        turn = inst.spec.turns[credit.turn_index]
        return CreditRecord(
            credit_id=credit.id,
            request_id=f"{credit.x_correlation_id}/{credit.turn_index}",
            session=credit.x_correlation_id,
            conversation=credit.conversation_id,
            root=inst.root_xid,
            parent=credit.parent_correlation_id,
            branch_mode=credit.branch_mode.value if credit.branch_mode is not None else None,
            depth=credit.agent_depth,
            subagent_type=credit.subagent_type,
            turn_index=credit.turn_index,
            num_turns=credit.num_turns,
            fork_count=credit.fork_count,
            model=turn.model or self.options.model,
            max_tokens=turn.output_tokens,
            intended_at_s=_round(intended),
            submitted_at_s=round(submitted_at, 6),
            submitted_unix_s=round(self._unix0 + submitted_at, 6),
            status=NO_OUTCOME,
            recorded=turn.recorded,
        )

    def _record_no_outcome(
        self, inst: _Instance, credit: Credit, intended: float, submitted_at: float
    ) -> None:
        """The run gave up waiting for this credit's outcome: a record that says so."""
        record = self._identity(inst, credit, intended, submitted_at)
        record.reason = GAVE_UP_WAITING
        record.first_token_at_s = _round(self._first_tokens.pop(credit.id, None))
        if self.on_record is not None:
            self.on_record(record)

    # ------------------------------------------------------------------ back-off

    def _pace(self, outcome: Outcome, submitted_at: float) -> None:
        """Back off new trees after a ``router_draining`` rejection; resume once accepted.

        A draining router rejects every new credit at once, so under ``concurrency`` each
        rejected root frees its slot and the next would start at once: a hot loop. The first
        rejection holds new trees for ``BACKOFF_FIRST_S``; a rejection of a credit sent after
        that hold doubles it, up to ``BACKOFF_MAX_S``. A credit sent since the first rejection
        and dispatched (the router accepts again), or a welcome from a new router incarnation,
        ends the back-off.
        """
        if outcome.status is Status.REJECTED and outcome.reason == ROUTER_DRAINING:
            if self._backoff_s == 0.0:
                self._backoff_s = BACKOFF_FIRST_S
                self._backoff_since = submitted_at
                self._backoff_router = _incarnation(self.producer)
                logger.warning(
                    "the router is draining: new trees wait %.1f s (doubling to %.0f s)",
                    BACKOFF_FIRST_S,
                    BACKOFF_MAX_S,
                )
            elif submitted_at >= self._backoff_until:
                self._backoff_s = min(BACKOFF_MAX_S, self._backoff_s * 2)
            else:
                return  # sent before the hold: the same burst, not a new attempt
            self._backoff_until = self.now() + self._backoff_s
        elif (
            self._backoff_s
            and submitted_at >= self._backoff_since
            and (outcome.submit_to_dispatch_s is not None or outcome.status is Status.COMPLETED)
        ):
            self._end_backoff()

    def _end_backoff(self) -> None:
        if self._backoff_s:
            logger.info("the router accepts credits again: new trees start")
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self._backoff_router = None

    async def _held(self) -> None:
        """Wait out a back-off (``_pace``), in steps so a stop or a new router ends it."""
        while not self._stopping and self.now() < self._backoff_until:
            if _incarnation(self.producer) != self._backoff_router:
                self._end_backoff()  # a new router incarnation welcomed us
                return
            await self._until(min(self._backoff_until, self.now() + BACKOFF_STEP_S))


def _incarnation(producer: Producer) -> str | None:
    """The router incarnation that last welcomed ``producer`` (``RouterClient``), if known."""
    value = getattr(producer, "router_incarnation", None)
    return value if isinstance(value, str) else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _log_failure(task: asyncio.Task[None]) -> None:
    """A session task that died of a bug: say so (its session was finished in ``finally``)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("session task failed", exc_info=task.exception())
