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
* ``rate`` — start trees at ``rate`` per second (Poisson arrivals, or evenly spaced);
* ``timestamps`` — start each root at its ``start_s`` (divided by ``speedup``).

Roots are taken in file order, cycling, so a workload can feed a run longer than itself. The run
stops issuing after ``duration_s`` or once ``sessions`` trees were started (timestamps: after
the last root), then waits for the credits in flight up to ``grace_s``, cancels the rest through
the router, and ends every session it abandoned (``EndSession``), so nothing stays reserved.

Every credit becomes one ``CreditRecord`` (its identity, its outcome and the executor's
``RequestResult``) handed to ``on_record``; ``affinity`` says whether a turn with history (a
later turn, or a FORK child's first) ran on the worker that held that history.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from loadgen.workload import BranchPlan, Recorded, SessionSpec, Workload
from protocol.inference import TurnRequest, decode_result, encode_request
from protocol.messages import BranchMode, Credit, Outcome, Status

__all__ = ["CreditRecord", "Mode", "Producer", "ReplayOptions", "ReplayProgress", "Replayer"]

logger = logging.getLogger(__name__)

Mode = Literal["concurrency", "rate", "timestamps"]


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
        arrival: ``poisson`` or ``constant`` spacing in ``rate`` mode.
        speedup: ``timestamps`` mode: trace time runs this much faster.
        duration_s: stop issuing after this long (``None``: no time limit).
        sessions: stop after starting this many trees (``None``: one pass over the roots when
            there is no ``duration_s`` either).
        grace_s: after the stop, wait this long for credits in flight before cancelling them.
        cancel_wait_s: after cancelling, wait this long for their outcomes.
        seed: seeds arrivals and sampled think times.
        allow_migration: set ``allow_migration`` on every credit (else the workload's).
        phase: ``Credit.phase``.
    """

    mode: Mode = "concurrency"
    concurrency: int = 16
    rate: float = 4.0
    arrival: Literal["poisson", "constant"] = "poisson"
    speedup: float = 1.0
    duration_s: float | None = None
    sessions: int | None = None
    grace_s: float = 10.0
    cancel_wait_s: float = 5.0
    seed: int = 0
    allow_migration: bool = False
    phase: str = "profiling"

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.rate <= 0 or self.speedup <= 0:
            raise ValueError("concurrency must be >= 1, rate and speedup > 0")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration_s must be > 0")
        if self.sessions is not None and self.sessions < 1:
            raise ValueError("sessions must be >= 1")


class CreditRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One credit: who it was, how it ended, what it measured (a line of ``--records``)."""

    credit_id: int
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
    submitted_at_s: float
    """Seconds from the start of the run."""
    status: str
    reason: str = ""
    worker: str = ""
    affinity: bool | None = None
    """Had history (later turn, FORK child): did it run on the worker holding it?"""
    submit_to_dispatch_s: float | None = None
    dispatch_to_outcome_s: float | None = None
    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    http_status: int | None = None
    endpoint: str | None = None
    rebuilt: bool = False
    recorded: Recorded | None = None
    """What the trace recorded for this request (its ``api_time_s``, ``ttft_s``…)."""
    error: str = ""
    """A failed credit's detail from the worker: the server's message (bounded)."""
    reasoning_tokens: int | None = None
    """Of ``output_tokens``, reasoning (``None``: unknown)."""
    ttft_content_s: float | None = None
    """Time to the first content token (``ttft_s`` counts reasoning and tool calls too)."""
    tool_calls: int = 0


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
        "first_issued_at",
        "issued",
        "join",
        "joined",
        "joins",
        "mode",
        "parent",
        "root_xid",
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
        self.issued = 0
        self.unstarted_forks = 0
        self.first_issued_at: float | None = None
        self.waiting = False
        """Awaiting an outcome (not to be cancelled at the stop: the router ends it)."""
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
    """

    def __init__(
        self,
        workload: Workload,
        producer: Producer,
        options: ReplayOptions | None = None,
        on_record: Callable[[CreditRecord], None] | None = None,
    ) -> None:
        self.workload = workload
        self.producer = producer
        self.options = options or ReplayOptions()
        self.on_record = on_record
        self._rng = random.Random(self.options.seed)
        self._tag = secrets.token_hex(3)
        self._ids = itertools.count(1)
        self._instances = itertools.count(1)
        self._live: set[_Instance] = set()
        self._outstanding: dict[int, _Instance] = {}
        self._tree_done = asyncio.Event()
        self._stopping = False
        self._started_at = 0.0
        self._expected: int | None = None
        self._expected_known = False
        self.submitted = 0
        self.done = 0
        self.errors = 0
        self.unfinished = 0
        """Credits still without an outcome when the replayer gave up waiting."""
        self.trees_started = 0
        self.trees_live = 0
        self.outcomes: dict[str, int] = {}

    # ------------------------------------------------------------------ public

    def progress(self) -> ReplayProgress:
        """Where the run stands (cheap: counters only)."""
        loop = asyncio.get_running_loop()
        return ReplayProgress(
            elapsed_s=loop.time() - self._started_at if self._started_at else 0.0,
            submitted=self.submitted,
            done=self.done,
            errors=self.errors,
            in_flight=len(self._outstanding),
            trees_started=self.trees_started,
            trees_live=self.trees_live,
            expected_credits=self._expected_credits(),
            stopping=self._stopping,
        )

    def stop(self) -> None:
        """Issue nothing more (what is in flight finishes, within the grace period)."""
        if self._stopping:
            return
        self._stopping = True
        for inst in list(self._live):
            if not inst.waiting and inst.task is not None:
                inst.task.cancel()
        self._tree_done.set()

    async def run(self) -> None:
        """Replay until a stop condition, then settle what is in flight (module docstring)."""
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        opts = self.options
        timer = None
        if opts.duration_s is not None:
            timer = loop.call_later(opts.duration_s, self.stop)
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

    async def _launch(self) -> None:
        """Start trees as the mode says, until the stop or the limit."""
        opts = self.options
        limit = self._limit()
        roots = self.workload.roots
        if opts.mode == "timestamps":
            order = sorted(roots, key=lambda r: self.workload.sessions[r].start_s or 0.0)
            if limit is not None:
                order = (order * (limit // len(order) + 1))[:limit]
        else:
            order = [roots[i % len(roots)] for i in range(limit)] if limit else []
        loop = asyncio.get_running_loop()
        for n in itertools.count():
            if self._stopping or (limit is not None and n >= limit):
                return
            root = order[n] if limit is not None else roots[n % len(roots)]
            if opts.mode == "concurrency":
                while self.trees_live >= opts.concurrency and not self._stopping:
                    self._tree_done.clear()
                    await self._tree_done.wait()
            elif opts.mode == "rate":
                if n:
                    gap = 1 / opts.rate
                    await asyncio.sleep(
                        self._rng.expovariate(opts.rate) if opts.arrival == "poisson" else gap
                    )
            else:
                start = (self.workload.sessions[root].start_s or 0.0) / opts.speedup
                await asyncio.sleep(max(0.0, self._started_at + start - loop.time()))
            if not self._stopping:
                self._start_tree(root)

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
        self.producer.cancel(list(self._outstanding))
        end = loop.time() + opts.cancel_wait_s
        while self._outstanding and loop.time() < end:
            self._tree_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tree_done.wait(), max(0.0, end - loop.time()))
        self.unfinished = len(self._outstanding)
        if self.unfinished:
            logger.warning("%d credits had no outcome when the replayer stopped", self.unfinished)

    def _start_tree(self, root: str) -> None:
        tree = _Tree(root)
        self.trees_started += 1
        self.trees_live += 1
        inst = self._instance(self.workload.sessions[root], tree)
        for child in inst.spec.pre_spawns:  # before turn 0: no parent id, depth 1
            pre = self._instance(
                self.workload.sessions[child], tree, mode=None, parent=None, root_xid=inst.xid
            )
            self._begin(pre)
        self._begin(inst)

    def _instance(
        self,
        spec: SessionSpec,
        tree: _Tree,
        *,
        parent: _Instance | None = None,
        mode: BranchMode | None = None,
        root_xid: str | None = None,
    ) -> _Instance:
        xid = f"{spec.id[:200]}~{self._tag}{next(self._instances):x}"
        root = root_xid or (parent.root_xid if parent is not None else None)
        inst = _Instance(spec, xid, tree, parent=parent, mode=mode, root_xid=root)
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

    async def _turns(self, inst: _Instance) -> bool:
        """Run the turns; ``True`` if every one completed."""
        spec = inst.spec
        loop = asyncio.get_running_loop()
        for k, turn in enumerate(spec.turns):
            if self._stopping:
                return False
            while inst.joins.get(k, 0) > 0:
                inst.joined.clear()
                await inst.joined.wait()
            wait = turn.think_time(self._rng)
            if turn.offset_s is not None and inst.first_issued_at is not None:
                due = inst.first_issued_at + turn.offset_s / self.options.speedup
                wait = max(wait, due - loop.time())
            if wait > 0:
                await asyncio.sleep(wait)
            if self._stopping:
                return False
            if not spec.orchestrator and not await self._issue(inst, k):
                return False
            inst.done = k + 1
            self._branches(inst, k)
        return True

    async def _issue(self, inst: _Instance, k: int) -> bool:
        """Send turn ``k`` and await its outcome; ``True`` if it completed."""
        loop = asyncio.get_running_loop()
        credit = self._credit(inst, k)
        inst.waiting = True
        inst.issued += 1
        if inst.first_issued_at is None:
            inst.first_issued_at = loop.time()
        submitted_at = loop.time() - self._started_at
        try:
            future = await self.producer.submit(credit)
            self.submitted += 1
            self._outstanding[credit.id] = inst
            try:
                outcome = await future
            finally:
                self._outstanding.pop(credit.id, None)
        finally:
            inst.waiting = False
        self._record(inst, credit, outcome, submitted_at)
        self._tree_done.set()  # wakes _drain's wait on outstanding credits too
        return outcome.status is Status.COMPLETED

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
                if self._stopping:
                    if plan.mode is BranchMode.FORK:
                        inst.unstarted_forks += 1
                    continue
                child = self._instance(
                    self.workload.sessions[child_id], inst.tree, parent=inst, mode=plan.mode
                )
                if plan.join_at is not None:
                    inst.joins[plan.join_at] = inst.joins.get(plan.join_at, 0) + 1
                    child.join = (inst, plan.join_at)
                self._begin(child)

    def _finish(self, inst: _Instance, complete: bool) -> None:
        """The session is over: free what it holds, release its join, maybe its tree."""
        if inst not in self._live:
            return
        self._live.discard(inst)
        if inst.issued and (not complete or inst.unstarted_forks):
            # Turns or FORK children it declared will never come: the router and the worker
            # free the session (and its reservations) now rather than at their idle timeout.
            self.producer.end_session(inst.xid, "replay_stopped" if self._stopping else "ended")
        if inst.join is not None:
            parent, turn = inst.join
            parent.joins[turn] -= 1
            parent.joined.set()
        tree = inst.tree
        tree.live -= 1
        if tree.live == 0:
            self.trees_live -= 1
        self._tree_done.set()

    # ------------------------------------------------------------------ records

    def _record(
        self, inst: _Instance, credit: Credit, outcome: Outcome, submitted_at: float
    ) -> None:
        self.done += 1
        status = outcome.status.value
        self.outcomes[status] = self.outcomes.get(status, 0) + 1
        if outcome.status is not Status.COMPLETED:
            self.errors += 1
        result = decode_result(outcome.result)
        expected = inst.expected_worker
        has_history = credit.turn_index > 0 or credit.branch_mode is BranchMode.FORK
        affinity = None
        if has_history and expected and outcome.worker:
            affinity = outcome.worker == expected
        if outcome.worker:
            inst.expected_worker = outcome.worker
        if result is not None and outcome.status is Status.COMPLETED:
            inst.context_tokens = result.input_tokens + result.output_tokens
        record = CreditRecord(
            credit_id=credit.id,
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
            submitted_at_s=round(submitted_at, 6),
            status=status,
            reason=outcome.reason,
            worker=outcome.worker,
            affinity=affinity,
            submit_to_dispatch_s=outcome.submit_to_dispatch_s,
            dispatch_to_outcome_s=outcome.dispatch_to_outcome_s,
            ttft_s=outcome.ttft_s if result is None or result.ttft_s is None else result.ttft_s,
            recorded=inst.spec.turns[credit.turn_index].recorded,
        )
        if result is not None:
            record.http_status = result.http_status
            record.endpoint = result.endpoint or None
            record.rebuilt = result.rebuilt
            record.error = result.error
        if result is not None and outcome.status is Status.COMPLETED:
            # A failed request's token counts are unknown (the result's 0 is only a default).
            record.itl_s = result.itl_s
            record.e2e_s = result.e2e_s
            record.input_tokens = result.input_tokens
            record.cached_tokens = result.cached_tokens
            record.output_tokens = result.output_tokens
            record.reasoning_tokens = result.reasoning_tokens
            record.ttft_content_s = result.ttft_content_s
            record.tool_calls = result.tool_calls
        if self.on_record is not None:
            self.on_record(record)


def _log_failure(task: asyncio.Task[None]) -> None:
    """A session task that died of a bug: say so (its session was finished in ``finally``)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("session task failed", exc_info=task.exception())
