"""Restart chaos: the router is restarted again and again under a mixed load with real workers,
and every credit still ends with exactly one outcome (issue 9, "Restart chaos").

Real processes on loopback: a router (``python -m credit_router serve``), three worker agents
(``python -m worker_agent --executor sim``, each credit taking tens of milliseconds so that
dozens are always in flight) and, in the test process, one ``RouterClient`` producer running a
10,000-credit mixed workload: single-turn credits, multi-turn sticky sessions, FORK trees (a
turn declaring ``fork_count`` children that run on the parent's worker from its history) and
SPAWN trees. While it runs the router is restarted several times, alternately by ``kill -9``
and by SIGTERM, and stays down 0.5-3 s each time (seeded). Restarts are triggered by progress
(every 1/(N+1) of the outcomes), so they fall inside the run however fast the machine is.

What must hold (docs/PROTOCOL.md §5.5, §5.6, §6.1, §7):

* every submitted credit gets exactly one outcome at the client (``submitted == outcomes``);
  a frame that reaches the client for a credit already ended is only ever a repeat of the
  outcome it had, resent through ``Recovered`` because a router was killed in the instant
  between forwarding it and acknowledging it (PROTOCOL.md §6.1, rare: at most 0.1 % here) —
  never a contradicting one (a credit given up, then completed), never a late completion of a
  credit a draining router already ended, no ``duplicate_credit`` error report; and every
  completion the workers
  count (their ``/metrics``) reached the producer, but for credits the router had ended;
* no hang: the whole workload ends within a bounded time (``recovery_grace_s`` is short, so
  credits the dead router held end in bounded time too);
* every process exits cleanly at the end (SIGTERM: exit code 0), every SIGTERM-ed router
  exited 0 within its drain deadline plus a margin, and after each restart every worker and
  the producer were back;
* every outcome is one a router restart explains (``lost: orphaned``, ``worker_lost``… would
  each be a fault: no worker died);
* a later turn of a session that may not migrate, and a FORK child, runs with its history or
  ends with an explicit outcome (``session_unknown``, ``parent_session_unavailable``), never
  silently elsewhere; the sim executor's prompt token count tells.

One run (a module fixture, ~30 s) feeds the four tests, one promise each.

The figures (credits by status and reason, by kind of credit, restarts, time) are printed; run
with ``-s`` to see them. ``CHAOS_CREDITS``, ``CHAOS_RESTARTS`` and ``CHAOS_SEED`` change the
size, the number of restarts and the seed (a longer soak: ``CHAOS_CREDITS=100000``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import msgspec
import pytest

from protocol import Credit, Outcome, Status
from protocol.inference import decode_result
from protocol.messages import BranchMode
from router_service.client import RouterClient
from tests.integration.test_faults import worker_samples
from tests.ports import free_port

CREDITS: Final = int(os.environ.get("CHAOS_CREDITS", "10000"))
RESTARTS: Final = int(os.environ.get("CHAOS_RESTARTS", "5"))
SEED: Final = int(os.environ.get("CHAOS_SEED", "9"))

BEAT_S: Final = 0.2
LOST_AFTER_S: Final = 2.0
DRAIN_DEADLINE_S: Final = 1.0
RECOVERY_GRACE_S: Final = 4.0
"""Long enough for the longest credit (2 s) to come back as ``Recovered`` on a loaded machine;
short enough that credits the dead router had end in bounded time."""
WORKERS: Final = ("w1", "w2", "w3")
CAPACITY: Final = 16
CONCURRENT_UNITS: Final = 96
"""Workload units (a single credit, a session, a tree) running at once."""
MIN_UP_S: Final = 1.0
"""Once every peer is back, a restarted router serves 0.5-1.5 times this before the next
restart (if the run still needs one)."""
WORKLOAD_BOUND_S: Final = 40.0 + CREDITS / 100
"""No hang: the workload must end within this (normally it takes a fraction of it)."""

pytestmark = [pytest.mark.integration, pytest.mark.timeout(int(WORKLOAD_BOUND_S) + 120)]


# ------------------------------------------------------------------------------ workload


@dataclass
class Unit:
    """One piece of the workload: a list of steps; each step is credits submitted together and
    awaited together before the next step (a session's turns are sequential; FORK siblings run
    side by side)."""

    kind: str
    steps: list[list[Credit]]

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.steps)


def _payload(rng: random.Random) -> bytes:
    # Sim executor: ~20 ms + 4 ms per output token. Mostly short; one in twenty ~0.2-0.3 s, so
    # credits are running whenever the router dies; one in a hundred 1.2-2 s, longer than a
    # SIGTERM-ed router's drain deadline, so some end lost: router_shutdown and are revoked.
    draw = rng.random()
    if draw < 0.01:
        tokens = rng.randint(300, 500)
    elif draw < 0.06:
        tokens = rng.randint(40, 80)
    else:
        tokens = rng.randint(2, 6)
    return msgspec.msgpack.encode({"input_tokens": rng.randint(16, 128), "output_tokens": tokens})


def build_workload(total: int, rng: random.Random) -> list[Unit]:
    """Exactly ``total`` credits in units of four kinds, in a seeded random order."""
    ids = iter(range(1, total + 1))
    units: list[Unit] = []
    left = total
    n = 0

    def credit(sid: str, turn: int, turns: int, **kw: Any) -> Credit:
        return Credit(
            id=next(ids), x_correlation_id=sid, turn_index=turn, num_turns=turns,
            payload=_payload(rng), **kw,
        )  # fmt: skip

    while left:
        n += 1
        pick = rng.random()
        migrate = rng.random() < 0.3
        if pick < 0.35 or left < 6:
            units.append(Unit("single", [[credit(f"s{n}", 0, 1)]]))
        elif pick < 0.65:
            turns = rng.randint(2, 5)
            sid = f"m{n}"
            steps = [[credit(sid, t, turns, allow_migration=migrate)] for t in range(turns)]
            units.append(Unit("session", steps))
        elif pick < 0.85:
            # Root turn 0 declares two FORK children; they run (two turns each) on the root's
            # worker from a copy of its history; then the root's final turn.
            root = f"f{n}"
            kids = [f"f{n}.{k}" for k in range(2)]
            tree = {"parent_correlation_id": root, "root_correlation_id": root, "agent_depth": 1,
                    "branch_mode": BranchMode.FORK}  # fmt: skip
            steps = [
                [credit(root, 0, 2, fork_count=2)],
                [credit(k, 0, 2, **tree) for k in kids],
                [credit(k, 1, 2, **tree) for k in kids],
                [credit(root, 1, 2)],
            ]
            units.append(Unit("fork", steps))
        else:
            root = f"p{n}"
            kid = f"p{n}.0"
            tree = {"parent_correlation_id": root, "root_correlation_id": root, "agent_depth": 1,
                    "branch_mode": BranchMode.SPAWN, "subagent_type": "Explore",
                    "allow_migration": migrate}  # fmt: skip
            steps = [
                [credit(root, 0, 2)],
                [credit(kid, 0, 2, **tree)],
                [credit(kid, 1, 2, **tree)],
                [credit(root, 1, 2)],
            ]
            units.append(Unit("spawn", steps))
        left -= units[-1].size
    assert sum(u.size for u in units) == total
    return units


# ------------------------------------------------------------------------------- cluster


class Cluster:
    """A router and three worker agents as real processes, the router restartable."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.worker_port = free_port()
        self.producer_port = free_port()
        self.http_port = free_port()
        self.router: subprocess.Popen[bytes] | None = None
        self.routers: list[subprocess.Popen[bytes]] = []
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_http: dict[str, int] = {}
        self._files: list[IO[bytes]] = []

    @property
    def producer_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.producer_port}"

    def _log(self, name: str) -> IO[bytes]:
        f = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        self._files.append(f)
        return f

    def start_router(self) -> None:
        cmd = [
            sys.executable, "-m", "credit_router", "serve",
            "--workers", f"tcp://127.0.0.1:{self.worker_port}",
            "--producers", self.producer_endpoint, "--http-port", str(self.http_port),
            "--heartbeat-interval-s", str(BEAT_S), "--lost-after-s", str(LOST_AFTER_S),
            "--inflight-report-interval-s", "0.5",
            "--drain-deadline-s", str(DRAIN_DEADLINE_S), "--log-level", "info",
        ]  # fmt: skip
        log = self._log(f"router{len(self.routers)}")
        self.router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.routers.append(self.router)

    def start_worker(self, name: str) -> None:
        cmd = [
            sys.executable, "-m", "worker_agent",
            "--router", f"tcp://127.0.0.1:{self.worker_port}",
            "--name", name, "--capacity", str(CAPACITY), "--executor", "sim",
            "--drain-deadline-s", "10", "--log-level", "INFO",
            "--http-port", str(self.worker_http.setdefault(name, free_port())),
        ]  # fmt: skip
        self.workers[name] = subprocess.Popen(cmd, stdout=self._log(name), stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/status"
        with urllib.request.urlopen(url, timeout=1) as r:
            doc: dict[str, Any] = json.load(r)
        return doc

    def worker_completed(self) -> int:
        """Credits the workers completed, from their Prometheus endpoints."""
        samples = worker_samples(self.worker_http.values(), "credit_worker_requests_total")
        return int(sum(s.value for s in samples if s.labels["status"] == "completed"))

    async def rejoined(self, within_s: float) -> float | None:
        """Seconds from the router's first answer on HTTP until every worker is active and
        the producer connected; ``None`` if that did not happen within ``within_s``."""
        deadline = time.monotonic() + within_s
        first: float | None = None
        while time.monotonic() < deadline:
            try:
                doc = await asyncio.to_thread(self.status)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            now = time.monotonic()
            first = now if first is None else first
            states = [w["state"] for w in doc["workers"]]
            if states.count("active") == len(WORKERS) and doc["totals"]["producers"] >= 1:
                return now - first
            await asyncio.sleep(0.02)
        return None

    def kill(self) -> None:
        for proc in [*self.workers.values(), *self.routers]:
            if proc.poll() is None:
                proc.kill()
        for proc in [*self.workers.values(), *self.routers]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for f in self._files:
            f.close()
        self._files.clear()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
            for p in sorted(self.tmp.glob("*.log"))
        )


async def _exit_code(proc: subprocess.Popen[bytes], within_s: float) -> int | None:
    """The process's exit code, or ``None`` if it is still running after ``within_s``."""
    deadline = time.monotonic() + within_s
    while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110 - no event for it
        await asyncio.sleep(0.02)
    return proc.poll()


# -------------------------------------------------------------------------------- the run


@dataclass
class Restart:
    signal: str
    down_s: float
    exit_code: int | None
    """Of the router that was stopped (``None``: it did not exit in time)."""
    at: float = 0.0
    """When the signal was sent (monotonic)."""
    rejoin_s: float | None = None
    """From the new router's first HTTP answer until every peer was back (``None``: never)."""


@dataclass
class ChaosRun:
    """What one chaos run observed."""

    units: list[Unit]
    credits: dict[int, Credit] = field(default_factory=dict)
    submitted: int = 0
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    second_outcomes: list[Outcome] = field(default_factory=list)
    streamed: collections.Counter[int] = field(default_factory=collections.Counter)
    restarts: list[Restart] = field(default_factory=list)
    hung: bool = False
    elapsed_s: float = 0.0
    unmatched: int = 0
    late: list[Outcome] = field(default_factory=list)
    duplicate_reports: int = 0
    outstanding: int = 0
    incarnations_seen: int = 0
    worker_completed: int = 0
    """Credits the workers completed (their own count), some revoked afterwards."""
    worker_codes: dict[str, int | None] = field(default_factory=dict)
    router_code: int | None = None
    logs: str = ""
    submitted_at: dict[int, float] = field(default_factory=dict)
    ended_at: dict[int, float] = field(default_factory=dict)
    """Credit id -> when its outcome arrived (monotonic)."""
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever an outcome arrives."""

    def by_status(self) -> collections.Counter[tuple[str, str]]:
        return collections.Counter((o.status.value, o.reason) for o in self.outcomes.values())

    def report(self) -> str:
        by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for unit in self.units:
            for step in unit.steps:
                for credit in step:
                    outcome = self.outcomes.get(credit.id)
                    by_kind[unit.kind][outcome.status.value if outcome else "none"] += 1
        restarts = ", ".join(
            f"{r.signal} down {r.down_s:.1f}s exit {r.exit_code} "
            f"rejoined {'never' if r.rejoin_s is None else f'{r.rejoin_s:.2f}s'}"
            for r in self.restarts
        )
        statuses = ", ".join(
            f"{s}{':' + r if r else ''} {n}" for (s, r), n in self.by_status().most_common()
        )
        kinds = "; ".join(f"{k} {dict(c)}" for k, c in sorted(by_kind.items()))
        return "\n".join([
            f"restart chaos: {CREDITS} credits, seed {SEED}, {self.elapsed_s:.1f} s, "
            f"{len(self.restarts)} restarts: {restarts}",
            f"  submitted {self.submitted}, outcomes {len(self.outcomes)}, second outcomes "
            f"{len(self.second_outcomes)}, unmatched at the client {self.unmatched}, "
            f"duplicate_credit reports {self.duplicate_reports}, outstanding {self.outstanding}, "
            f"hung {self.hung}, router incarnations seen by the client {self.incarnations_seen}",
            f"  by status and reason: {statuses}",
            f"  completed by the workers {self.worker_completed}",
            f"  by kind: {kinds}",
            f"  exit codes: workers {self.worker_codes}, last router {self.router_code}",
        ])  # fmt: skip


async def _run_unit(client: RouterClient, unit: Unit, run: ChaosRun) -> None:
    for step in unit.steps:
        futures = []
        for credit in step:
            run.credits[credit.id] = credit
            run.submitted_at[credit.id] = time.monotonic()
            futures.append(await client.submit(credit))
            run.submitted += 1
        pause = False
        for credit, outcome in zip(step, await asyncio.gather(*futures), strict=True):
            assert outcome.credit_id == credit.id
            if credit.id in run.outcomes:
                run.second_outcomes.append(outcome)
            run.outcomes[credit.id] = outcome
            run.ended_at[credit.id] = time.monotonic()
            run.progress.set()
            pause = pause or outcome.reason in _ROUTER_LEAVING
        if pause:
            # A producer told the router is leaving waits a moment before its next turn,
            # rather than burning the rest of its session on the draining router.
            await asyncio.sleep(0.2)


_ROUTER_LEAVING: Final = frozenset({"router_draining", "router_shutdown"})


async def _chaos_run(cluster: Cluster) -> ChaosRun:
    rng = random.Random(SEED)
    run = ChaosRun(units=build_workload(CREDITS, rng))
    cluster.start_router()
    for name in WORKERS:
        cluster.start_worker(name)
    started = time.monotonic()
    client = RouterClient(
        cluster.producer_endpoint, name="chaos", max_outstanding=4096,
        heartbeat_interval_s=BEAT_S, recovery_grace_s=RECOVERY_GRACE_S,
    )  # fmt: skip
    await client.connect(timeout_s=20)
    try:
        await cluster.rejoined(20)

        async def watch_stream() -> None:
            async for outcome in client.stream():
                run.streamed[outcome.credit_id] += 1

        async def chaos() -> None:
            # Restart i when (i + 1) / (RESTARTS + 1) of the credits have their outcome.
            for i in range(RESTARTS):
                goal = CREDITS * (i + 1) // (RESTARTS + 1)
                while len(run.outcomes) < goal:
                    run.progress.clear()
                    await run.progress.wait()
                router = cluster.router
                assert router is not None
                how = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
                down_s = rng.uniform(0.5, 3.0)
                router.send_signal(how)
                sent_at = time.monotonic()
                # A SIGTERM-ed router drains for DRAIN_DEADLINE_S, waits about a second for
                # its workers' confirmations, then exits 0; a killed one is gone at once.
                code = await _exit_code(router, DRAIN_DEADLINE_S + 8.0)
                restart = Restart(how.name, down_s, code, at=sent_at)
                run.restarts.append(restart)
                if code is None:
                    return  # it hangs: the assertions say so
                await asyncio.sleep(down_s)
                cluster.start_router()
                restart.rejoin_s = await cluster.rejoined(10)
                await asyncio.sleep(MIN_UP_S * rng.uniform(0.5, 1.5))

        streaming = asyncio.create_task(watch_stream())
        chaos_task = asyncio.create_task(chaos())
        gate = asyncio.Semaphore(CONCURRENT_UNITS)

        async def gated(unit: Unit) -> None:
            async with gate:
                await _run_unit(client, unit, run)

        work = asyncio.gather(*(gated(u) for u in run.units))
        try:
            await asyncio.wait_for(work, WORKLOAD_BOUND_S)
        except TimeoutError:
            run.hung = True
        run.elapsed_s = time.monotonic() - started
        if run.hung:
            chaos_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            # Every restart's goal was reached: at most the last one's rejoin and up time left.
            await chaos_task
        await asyncio.sleep(5 * BEAT_S)  # a late second outcome would arrive now
        streaming.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await streaming
        run.unmatched = client.unmatched_outcomes
        run.late = list(client.late_outcomes)
        run.duplicate_reports = sum(e.code == "duplicate_credit" for e in client.errors)
        run.outstanding = client.outstanding
        run.incarnations_seen = client.session.restarts
        run.worker_completed = await asyncio.to_thread(cluster.worker_completed)
    finally:
        await client.close()

    # Everything stops cleanly: the workers drain and leave (0), then the router drains (0).
    for proc in cluster.workers.values():
        proc.send_signal(signal.SIGTERM)
    run.worker_codes = {n: await _exit_code(p, 15.0) for n, p in cluster.workers.items()}
    assert cluster.router is not None
    cluster.router.send_signal(signal.SIGTERM)
    run.router_code = await _exit_code(cluster.router, DRAIN_DEADLINE_S + 8.0)
    return run


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> ChaosRun:
    """One chaos run, shared by the tests below (each checks one promise)."""
    cluster = Cluster(tmp_path_factory.mktemp("chaos"))
    try:
        run = asyncio.run(_chaos_run(cluster))
    finally:
        cluster.kill()
    run.logs = cluster.logs()
    print("\n" + run.report())
    return run


def _context(run: ChaosRun) -> str:
    return run.report() + "\n" + run.logs


# --------------------------------------------------------------------------------- tests


def test_every_credit_ends_with_exactly_one_outcome(chaos: ChaosRun) -> None:
    run = chaos
    assert not run.hung, f"hang: {run.outstanding} credits without an outcome\n{_context(run)}"
    assert run.submitted == CREDITS == len(run.outcomes), _context(run)
    assert not run.second_outcomes, _context(run)
    assert len(run.streamed) == CREDITS, _context(run)
    assert set(run.streamed.values()) == {1}, _context(run)
    # Repeats of an outcome the credit already had, from the one documented window; never a
    # contradiction.
    assert run.unmatched <= CREDITS // 1000, f"{run.unmatched} late outcomes\n{_context(run)}"
    assert len(run.late) == run.unmatched, _context(run)
    for late in run.late:
        first = run.outcomes[late.credit_id]
        assert (late.status, late.reason) == (first.status, first.reason), (
            f"credit {late.credit_id}: {first!r}, then {late!r}\n{_context(run)}"
        )
    assert run.duplicate_reports == 0, _context(run)
    assert run.outstanding == 0, _context(run)
    # Every completed outcome is a completion a worker made (none invented, none doubled), and
    # every completion a worker made reached the producer, unless the router had already ended
    # its credit (lost: router_shutdown, revoked: the worker forgets it).
    completed = sum(o.status is Status.COMPLETED for o in run.outcomes.values())
    revoked = run.by_status()[("lost", "router_shutdown")]
    assert completed <= run.worker_completed <= completed + revoked, _context(run)


def test_every_restart_happened_and_every_process_exits_cleanly(chaos: ChaosRun) -> None:
    run = chaos
    assert [r.signal for r in run.restarts] == [
        "SIGKILL" if i % 2 == 0 else "SIGTERM" for i in range(RESTARTS)
    ], _context(run)
    for r in run.restarts:
        # A SIGTERM-ed router drained and exited 0 in bounded time; a killed one died of it.
        assert r.exit_code == (0 if r.signal == "SIGTERM" else -signal.SIGKILL), _context(run)
        assert r.rejoin_s is not None, f"peers never came back\n{_context(run)}"
    assert run.incarnations_seen == RESTARTS, _context(run)
    assert run.worker_codes == dict.fromkeys(WORKERS, 0), _context(run)
    assert run.router_code == 0, _context(run)


EXPLAINED: Final = {
    ("completed", ""),
    # Sent to a router that was draining or shutting down: never ran.
    ("rejected", "router_draining"),
    ("rejected", "router_shutdown"),
    # Held by a router that was killed, and not among the credits its workers recovered.
    ("lost", "router_restarted"),
    # In flight past a draining router's deadline (its worker was told to forget it).
    ("lost", "router_shutdown"),
    # A later turn, or a FORK child, whose session a restarted router never saw.
    ("rejected", "session_unknown"),
    ("rejected", "parent_session_unavailable"),
}


def test_every_outcome_is_one_a_router_restart_explains(chaos: ChaosRun) -> None:
    """No worker died, no credit was cancelled: ``lost: orphaned`` (a Dispatch before the
    Welcome), ``worker_lost``, ``session_lost`` and the like would each be a fault."""
    unexplained = {k: n for k, n in chaos.by_status().items() if k not in EXPLAINED}
    assert not unexplained, f"{unexplained}\n{_context(chaos)}"


def _prompt_tokens(credit: Credit) -> tuple[int, int]:
    req = msgspec.msgpack.decode(credit.payload)
    return int(req["input_tokens"]), int(req["output_tokens"])


def test_later_turns_run_with_their_history_or_end_explicitly(chaos: ChaosRun) -> None:
    """A non-first turn of a session that may not migrate, and a FORK child, runs where its
    history is or ends with an explicit outcome, never silently elsewhere (issue 9, the routing
    invariant; docs/PROTOCOL.md §7 ``session_unknown``). The sim executor's result says how many
    prompt tokens the turn had: with the history, the sum of every earlier turn's input and
    output plus its own input; the history the worker holds after a turn is that turn's prompt
    and output."""
    run = chaos
    silently_fresh: list[str] = []
    across_restart = 0
    for unit in run.units:
        # session id -> (tokens of its history so far, when its last turn was submitted); None
        # once a turn did not complete (no claim on the turns after it)
        history: dict[str, tuple[int, float] | None] = {}
        for step in unit.steps:
            done: dict[str, tuple[int, float] | None] = {}
            for credit in step:
                sid = credit.x_correlation_id
                inp, out = _prompt_tokens(credit)
                fork_start = credit.turn_index == 0 and credit.branch_mode is BranchMode.FORK
                source = credit.parent_correlation_id if fork_start else sid
                assert source is not None
                before = history.get(source, (0, 0.0))
                outcome = run.outcomes.get(credit.id)
                if before is None or outcome is None or outcome.status is not Status.COMPLETED:
                    done[sid] = None
                    continue
                tokens, since = before
                ended = run.ended_at[credit.id]
                result = decode_result(outcome.result)
                assert result is not None, outcome
                needs_history = credit.turn_index > 0 or fork_start
                if (
                    needs_history
                    and not credit.allow_migration
                    and result.input_tokens != tokens + inp
                ):
                    between = [r.signal for r in run.restarts if since < r.at < ended]
                    across_restart += bool(between)
                    silently_fresh.append(
                        f"{unit.kind} {sid} turn {credit.turn_index} (credit {credit.id}) "
                        f"on {outcome.worker}: prompt {result.input_tokens} tokens, "
                        f"history + input = {tokens + inp}; restarts since the history's last "
                        f"turn was submitted: {between}"
                    )
                # What the worker now holds, whatever it held before: a turn that lost the
                # history is counted once, not again at every later turn.
                done[sid] = (result.input_tokens + out, run.submitted_at[credit.id])
            history.update(done)
    assert not silently_fresh, (
        f"{len(silently_fresh)} later turns ran without their history ({across_restart} with a "
        "router restart since the turn before it was submitted), e.g.\n"
        + "\n".join(sorted(silently_fresh, key=lambda line: not line.endswith("[]"))[:10])
        + "\n"
        + run.report()
    )
