"""``credit-router run``: replay a workload through a router, its workers and their servers.

Without ``--router`` the run brings its own cluster, as processes on loopback (free ports):
``--mock-servers`` mock inference servers (``credit-router mock-server``) unless ``--endpoint``
names real ones, a router (``credit-router serve`` with the run's ``routing_policy``), and
``--workers`` worker agents (``credit-router worker --executor openai``). With as many servers
as workers, each worker gets servers of its own, as a client host pinned to its GPU hosts would;
with fewer, every worker uses them all (``deal``). With ``--router`` it submits to a running
daemon, whose workers are already connected.

The replay runs in this process (``Replayer`` on a ``RouterClient``) under a live progress
line; then the report is printed (``loadgen.report``). ``--compare`` runs the same
workload twice on fresh clusters (so every server starts with an empty cache), with
``sticky`` and with ``least_loaded`` routing, and prints the two side by side.

The cluster's processes run in their own process group, so a Ctrl-C reaches only this one:
the first stops the replay (in-flight credits settle), the second abandons it. Whatever
happens, the processes are stopped (SIGTERM: workers drain, then the router, then the
servers; SIGKILL after a few seconds), and their logs are shown if one of them failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import aiohttp
import uvloop

from loadgen.replay import Replayer, ReplayOptions
from loadgen.report import Collector, Progress, Report, render_comparison
from loadgen.workload import (
    FileFormat,
    GeneratorParams,
    Workload,
    WorkloadError,
    generate,
    load_workload,
)
from router_service.client import RouterClient

__all__ = ["ClusterError", "LocalCluster", "RunSettings", "main", "run"]

logger = logging.getLogger(__name__)

Policy = Literal["sticky", "least_loaded"]


class ClusterError(Exception):
    """The local cluster could not start (the message includes the failing process's log)."""


@dataclass(frozen=True)
class RunSettings:
    """Everything ``credit-router run`` was told (see ``commands.add_run_arguments``)."""

    workload: Path | None = None
    fmt: FileFormat = "auto"
    block_tokens: int | None = None
    generator: GeneratorParams = field(default_factory=GeneratorParams)
    replay: ReplayOptions = field(default_factory=ReplayOptions)
    workers: int = 3
    mock_servers: int = 2
    capacity: int = 32
    endpoints: tuple[str, ...] = ()
    model: str = "mock"
    api: str = "chat"
    """The workers' generation API (``worker --api``): chat, completions or responses."""
    worker_args: tuple[str, ...] = ()
    router: str | None = None
    router_http: str | None = None
    policy: Policy = "sticky"
    compare: bool = False
    records: Path | None = None
    json: bool = False
    progress: bool = True
    keep_logs: bool = False
    startup_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.workers < 1 or self.capacity < 1:
            raise ValueError("--workers and --capacity must be >= 1")
        if self.router is None and not self.endpoints and self.mock_servers < 1:
            raise ValueError("--mock-servers must be >= 1 (or give --endpoint)")
        if self.compare and self.router is not None:
            raise ValueError("--compare starts its own clusters: it cannot use --router")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deal(endpoints: list[str], workers: int) -> list[list[str]]:
    """Each worker's endpoints.

    With at least as many servers as workers they are dealt in turn, so each worker has servers
    of its own (a client host pinned to its GPU hosts). With fewer, every worker gets them all
    and spreads its sessions over them (each session keeps the server it started on).
    """
    if len(endpoints) >= workers:
        return [endpoints[i::workers] for i in range(workers)]
    return [list(endpoints) for _ in range(workers)]


class LocalCluster:
    """Mock servers, a router and worker agents as local processes (module docstring).

    Args:
        settings: the run's settings (sizes, endpoints, model).
        policy: the router's ``routing_policy``.
    """

    def __init__(self, settings: RunSettings, policy: Policy) -> None:
        self.settings = settings
        self.policy = policy
        self.log_dir = Path(tempfile.mkdtemp(prefix="credit-router-run-"))
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.servers: list[str] = []
        self.worker_port = _free_port()
        self.producer_port = _free_port()
        self.http_port = _free_port()
        self._logs: list[IO[bytes]] = []
        self.failed = False

    @property
    def producer_endpoint(self) -> str:
        """Where the replayer connects."""
        return f"tcp://127.0.0.1:{self.producer_port}"

    @property
    def topology(self) -> str:
        """For the report's title."""
        s = self.settings
        n = len(s.endpoints) or s.mock_servers
        kind = "endpoint" if s.endpoints else "mock server"
        where = f"{n} {kind}{'s' if n > 1 else ''}"
        return f"local router + {s.workers} workers + {where}"

    async def __aenter__(self) -> LocalCluster:
        try:
            await self._start()
        except BaseException:
            self.failed = True
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            self.failed = True
        await self.stop()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "credit_router", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C is for the run, which stops them in order
        )
        self.procs.append((name, proc))
        return proc

    async def _start(self) -> None:
        s = self.settings
        if s.endpoints:
            self.servers = list(s.endpoints)
        else:
            for i in range(s.mock_servers):
                port = _free_port()
                self._spawn(
                    f"mock-{i}",
                    [
                        "mock-server",
                        "--port",
                        str(port),
                        "--model",
                        s.model,
                        "--seed",
                        str(i),
                        "--record-sessions",  # full messages: keep a few for inspection
                        "64",
                        "--log-level",
                        "warning",
                    ],
                )
                self.servers.append(f"http://127.0.0.1:{port}/v1")
        router = [
            "serve",
            "--workers",
            f"tcp://127.0.0.1:{self.worker_port}",
            "--producers",
            self.producer_endpoint,
            "--http-port",
            str(self.http_port),
            "--routing-policy",
            self.policy,
            "--drain-deadline-s",
            "2",
            "--log-level",
            "warning",
        ]
        self._spawn("router", router)
        for i, endpoints in enumerate(deal(self.servers, s.workers)):
            args = [
                "worker",
                "--router",
                f"tcp://127.0.0.1:{self.worker_port}",
                "--name",
                f"w-{i}",
                "--capacity",
                str(s.capacity),
                "--executor",
                "openai",
                "--model",
                s.model,
                "--api",
                s.api,
                "--drain-deadline-s",
                "3",
                "--log-level",
                "WARNING",
                *s.worker_args,
            ]
            for endpoint in endpoints:
                args += ["--endpoint", endpoint]
            self._spawn(f"worker-{i}", args)
        await self._ready()

    async def _ready(self) -> None:
        """Wait until every server answers and every worker joined the router."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.startup_timeout_s
        mocks = [] if self.settings.endpoints else self.servers
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                self._check_alive()
                if await self._all_up(http, mocks):
                    return
                if loop.time() > deadline:
                    raise ClusterError(
                        f"the cluster was not ready within {self.settings.startup_timeout_s:g} s"
                        + self._log_tails()
                    )
                await asyncio.sleep(0.1)

    async def _all_up(self, http: aiohttp.ClientSession, mocks: list[str]) -> bool:
        try:
            for base in mocks:
                async with http.get(base.removesuffix("/v1") + "/health") as r:
                    if r.status != 200:
                        return False
            async with http.get(f"http://127.0.0.1:{self.http_port}/status") as r:
                doc = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return int(doc["totals"]["workers"]) >= self.settings.workers

    def _check_alive(self) -> None:
        for name, proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise ClusterError(f"{name} exited with status {code}" + self._log_tails())

    def _log_tails(self) -> str:
        for log in self._logs:
            log.flush()
        parts = []
        for name, _ in self.procs:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace").strip()
            if text:
                parts.append(
                    f"\n--- {name} (last lines) ---\n" + "\n".join(text.splitlines()[-15:])
                )
        return "".join(parts)

    async def watch(self, on_failure: Callable[[str], None], period_s: float = 0.5) -> None:
        """Call ``on_failure`` (once) if one of the processes exits while the run goes on."""
        while True:
            await asyncio.sleep(period_s)
            try:
                self._check_alive()
            except ClusterError as exc:
                self.failed = True
                on_failure(str(exc))
                return

    async def server_stats(self) -> list[dict[str, Any]]:
        """The mock servers' counters (none for real endpoints)."""
        if self.settings.endpoints:
            return []
        stats = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            for base in self.servers:
                try:
                    async with http.get(base.removesuffix("/v1") + "/mock/stats") as r:
                        doc = await r.json()
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    continue
                doc.pop("settings", None)
                stats.append({"server": base, **doc})
        return stats

    async def stop(self) -> None:
        """Stop workers (they drain), then the router, then the servers; kill stragglers."""
        order = ("worker", "router", "mock")
        for prefix in order:
            group = [(n, p) for n, p in self.procs if n.startswith(prefix) and p.poll() is None]
            for _, proc in group:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            await _wait([p for _, p in group], 6.0)
        for log in self._logs:
            log.close()
        if self.failed or self.settings.keep_logs:
            print(f"credit-router run: process logs kept in {self.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)


async def _wait(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Wait for ``procs`` to exit (in threads, together); kill those that take too long."""

    async def one(proc: subprocess.Popen[bytes]) -> None:
        try:
            await asyncio.to_thread(proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("process %d did not stop in %.0f s: killed", proc.pid, timeout_s)
            proc.kill()
            await asyncio.to_thread(proc.wait)

    await asyncio.gather(*(one(p) for p in procs))


class RemoteRouter:
    """A running router daemon and its workers (``--router``): nothing to start or stop."""

    def __init__(self, settings: RunSettings) -> None:
        assert settings.router is not None
        self.producer_endpoint = settings.router
        self.topology = f"router at {settings.router} with its workers"

    async def __aenter__(self) -> RemoteRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def server_stats(self) -> list[dict[str, Any]]:
        """Nothing is known about remote servers."""
        return []


class _Interrupts:
    """First SIGINT/SIGTERM stops the replay gracefully; the second cancels the run."""

    def __init__(self) -> None:
        self.replayer: Replayer | None = None
        self.count = 0
        self.main: asyncio.Task[Any] | None = None

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        self.main = asyncio.current_task()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)

    def _on_signal(self) -> None:
        self.count += 1
        if self.count == 1 and self.replayer is not None:
            print("\nstopping: in-flight credits settle (again to abandon)", file=sys.stderr)
            self.replayer.stop()
        elif self.main is not None:
            self.main.cancel()


async def _one(
    settings: RunSettings, workload: Workload, policy: Policy, interrupts: _Interrupts
) -> Report:
    """One replay on one cluster; returns its report."""
    cluster: LocalCluster | RemoteRouter = (
        RemoteRouter(settings) if settings.router else LocalCluster(settings, policy)
    )
    records: IO[bytes] | None = None
    problems: list[str] = []
    if settings.records is not None:
        path = settings.records
        if settings.compare:
            path = path.with_name(f"{path.stem}.{policy}{path.suffix or '.jsonl'}")
        records = path.open("wb")
    try:
        async with cluster:
            collector = Collector(records)
            loop = asyncio.get_running_loop()
            async with RouterClient(cluster.producer_endpoint, name=f"run-{policy}") as client:
                replayer = Replayer(workload, client, settings.replay, on_record=collector.add)
                interrupts.replayer = replayer
                progress = None
                if settings.progress:
                    label = f"{policy:<12} " if settings.compare else ""
                    progress = Progress(
                        replayer.progress, duration_s=settings.replay.duration_s, label=label
                    )
                    progress.start()
                watchdog = None
                if isinstance(cluster, LocalCluster):

                    def lost(message: str) -> None:
                        logger.error("stopping the replay: %s", message)
                        problems.append(message)
                        replayer.stop()

                    watchdog = loop.create_task(cluster.watch(lost))
                started = loop.time()
                try:
                    await replayer.run()
                finally:
                    if watchdog is not None:
                        watchdog.cancel()
                    if progress is not None:
                        await progress.stop()
                duration = loop.time() - started
            servers = await cluster.server_stats()
    finally:
        if records is not None:
            records.close()
    return Report(
        policy=policy if not settings.router else "the daemon's",
        topology=cluster.topology,
        workload=workload.description or workload.source,
        duration_s=duration,
        collector=collector,
        trees_started=replayer.trees_started,
        unfinished=replayer.unfinished,
        servers=servers,
        problems=problems,
    )


def _workload(settings: RunSettings) -> Workload:
    if settings.workload is None:
        return generate(settings.generator)
    return load_workload(settings.workload, settings.fmt, block_tokens=settings.block_tokens)


async def run(settings: RunSettings, out: IO[str] | None = None) -> int:
    """The whole command: load, replay (once or compared), print. Returns the exit status."""
    out = out if out is not None else sys.stdout
    try:
        workload = _workload(settings)
    except WorkloadError as exc:
        print(f"credit-router run: {exc}", file=sys.stderr)
        return 2
    interrupts = _Interrupts()
    interrupts.install()
    policies: list[Policy] = ["sticky", "least_loaded"] if settings.compare else [settings.policy]
    reports = []
    try:
        for policy in policies:
            reports.append(await _one(settings, workload, policy, interrupts))
            if interrupts.count:
                break
    except ClusterError as exc:
        print(f"credit-router run: {exc}", file=sys.stderr)
        return 1
    _print(settings, reports, out)
    completed = sum(r.collector.statuses.get("completed", 0) for r in reports)
    return 0 if completed and not any(r.problems for r in reports) else 1


def _print(settings: RunSettings, reports: list[Report], out: IO[str]) -> None:
    if settings.json:
        import json

        doc: Any = reports[0].as_dict() if len(reports) == 1 else [r.as_dict() for r in reports]
        print(json.dumps(doc, indent=2), file=out)
        return
    for report in reports:
        print(report.render(), file=out)
        print(file=out)
    if len(reports) > 1:
        print("sticky vs least-loaded routing, same workload, fresh servers each:", file=out)
        print(render_comparison(reports), file=out)


def main(settings: RunSettings) -> int:
    """Run ``credit-router run`` on a uvloop event loop."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            return runner.run(run(settings))
        except asyncio.CancelledError:
            print("credit-router run: abandoned", file=sys.stderr)
            return 130


def with_replay(settings: RunSettings, **changes: Any) -> RunSettings:
    """A copy of ``settings`` with some replay options changed (tests)."""
    return replace(settings, replay=replace(settings.replay, **changes))
