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

Before any load: ``--endpoint`` servers are asked for ``/models`` (a dead server, a URL without
its ``/v1`` or a model the server does not serve is one line and exit 2), and ``--router`` must
answer the producer handshake (``ipc://`` paths must exist). ``--output DIR`` is created and
checked writable before the load, and leaves a run directory (``loadgen.artifacts``). The exit
status (``EXIT_*``, docs/RUN.md) says whether the run is to be trusted.
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import aiohttp
import uvloop

from credit_common.keys import KeyError_, load_public, load_secret
from credit_common.settings import endpoint_problem
from loadgen.replay import Replayer, ReplayOptions
from loadgen.report import (
    DEFAULT_LATENESS_THRESHOLD_S,
    Collector,
    Progress,
    Report,
    Slo,
    render_comparison,
)
from loadgen.workload import (
    FileFormat,
    GeneratorParams,
    Workload,
    WorkloadError,
    generate,
    load_workload,
)
from router_service.client import ProducerRefusedError, RouterClient

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ERRORS",
    "EXIT_INCOMPLETE",
    "EXIT_OK",
    "EXIT_SLO",
    "ClusterError",
    "LocalCluster",
    "RunError",
    "RunSettings",
    "check_output",
    "exit_status",
    "main",
    "preflight",
    "run",
]

EXIT_OK = 0
"""Every credit ended, errors within ``--max-error-rate``, SLOs (if any) met."""
EXIT_ERRORS = 1
"""More credits failed than ``--max-error-rate`` allows."""
EXIT_BAD_INPUT = 2
"""Bad options, workload, key file, endpoint or router address: nothing (more) was sent."""
EXIT_INCOMPLETE = 3
"""The run did not finish: credits without an outcome, a cluster process died, the cluster
did not start, the run was interrupted, or no credit completed (it measured nothing)."""
EXIT_SLO = 4
"""Fewer credits met the ``--slo`` objectives than its ``attainment``."""

logger = logging.getLogger(__name__)

Policy = Literal["sticky", "least_loaded"]


class ClusterError(Exception):
    """The local cluster could not start (the message includes the failing process's log)."""


class RunError(Exception):
    """A user's mistake found before the load (one line naming it and its fix): exit 2."""


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
    output: Path | None = None
    """The run directory to write (``loadgen.artifacts``)."""
    max_error_rate: float = 0.0
    """Errors (not the stop's cancellations) over credits above which the exit status is 1."""
    slo: Slo | None = None
    lateness_threshold_s: float = DEFAULT_LATENESS_THRESHOLD_S
    curve_server_key: Path | None = None
    """The router's public key file (``--router`` over TCP with CURVE)."""
    curve_key: Path | None = None
    """This producer's key pair (``NAME.key_secret``; ``NAME`` is its allowlist name)."""
    connect_timeout_s: float = 5.0
    preflight: bool = True
    argv: tuple[str, ...] = ()
    """The command line, for the run directory's ``config.json``."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.capacity < 1:
            raise ValueError("--workers and --capacity must be >= 1")
        if self.router is None and not self.endpoints and self.mock_servers < 1:
            raise ValueError("--mock-servers must be >= 1 (or give --endpoint)")
        if self.compare and self.router is not None:
            raise ValueError("--compare starts its own clusters: it cannot use --router")
        if not 0 <= self.max_error_rate <= 1:
            raise ValueError("--max-error-rate must be between 0 and 1")
        if (self.curve_server_key is None) != (self.curve_key is None):
            raise ValueError("--curve-server-key and --curve-key go together")
        if self.curve_server_key is not None and self.router is None:
            raise ValueError("--curve-server-key is for --router (a local cluster needs none)")


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
        scheme, _, rest = settings.router.partition("://")
        problem = endpoint_problem(settings.router)
        if problem is not None:
            raise RunError(
                f"--router {settings.router!r}: {problem} (the router's --producers endpoint: "
                "tcp://HOST:PORT or ipc:///PATH)"
            )
        if scheme == "ipc" and not Path(rest).is_socket():
            raise RunError(
                f"--router {settings.router}: no socket at {rest} (is the router running, "
                "with --producers at that path?)"
            )

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
        try:
            records = path.open("wb")
        except OSError as exc:
            raise RunError(f"--records {path}: {exc.strerror}") from None
    try:
        async with cluster:
            collector = Collector(records)
            loop = asyncio.get_running_loop()
            async with _connected(settings, cluster.producer_endpoint, policy) as client:
                replayer = Replayer(workload, client, settings.replay, on_record=collector.add)
                client.on_first_token = replayer.first_token
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
        not_sent={cause: tally.as_dict() for cause, tally in replayer.not_sent.items()},
        servers=servers,
        problems=problems,
        lateness_threshold_s=settings.lateness_threshold_s,
        slo=settings.slo,
    )


@contextlib.asynccontextmanager
async def _connected(
    settings: RunSettings, endpoint: str, policy: str
) -> AsyncIterator[RouterClient]:
    """A connected producer; a router that does not answer or refuses is a ``RunError``."""
    name = f"run-{policy}"
    curve = None
    if settings.curve_server_key is not None and settings.curve_key is not None:
        public, secret = load_secret(settings.curve_key)
        curve = (load_public(settings.curve_server_key), public, secret)
        # The router's allowlist names a producer by its key file's name.
        name = settings.curve_key.name.removesuffix(".key_secret")
    client = RouterClient(endpoint, name=name, curve=curve)
    try:
        await client.connect(timeout_s=settings.connect_timeout_s)
    except TimeoutError:
        if client.handshake_failure is not None:
            raise RunError(
                f"the router at {endpoint} did not accept the connection: "
                f"{client.handshake_failure}"
            ) from None
        hint = (
            " (is a router listening there? with CURVE, are the keys the router's?)"
            if settings.router
            else ""
        )
        raise RunError(
            f"no router answered at {endpoint} within {settings.connect_timeout_s:g} s{hint}"
        ) from None
    except ProducerRefusedError as exc:
        raise RunError(f"the router at {endpoint} refused this producer: {exc}") from None
    try:
        yield client
    finally:
        await client.close()


def _workload(settings: RunSettings) -> Workload:
    if settings.workload is None:
        return generate(settings.generator)
    return load_workload(settings.workload, settings.fmt, block_tokens=settings.block_tokens)


async def preflight(endpoints: tuple[str, ...], model: str, timeout_s: float = 5.0) -> None:
    """Ask every server for ``/models`` before sending load.

    Raises:
        RunError: a server that does not answer, a URL whose ``/models`` is not there (with
            the ``/v1`` it lacks, when that is the fix), or a model the server does not list.
    """
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        for endpoint in endpoints:
            base = endpoint.removesuffix("/chat/completions").rstrip("/")
            try:
                status, doc = await _get_json(http, f"{base}/models")
                if status == 404 and not base.endswith("/v1"):
                    fixed, _ = await _get_json(http, f"{base}/v1/models")
                    if fixed == 200:
                        raise RunError(
                            f"--endpoint {endpoint}: the OpenAI API is under /v1 there: "
                            f"give --endpoint {base}/v1"
                        )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RunError(
                    f"--endpoint {endpoint}: cannot reach the server "
                    f"({exc.__class__.__name__}: {exc or 'timed out'}); is it running?"
                ) from None
            if status == 404:
                raise RunError(
                    f"--endpoint {endpoint}: {base}/models answered 404: give the base URL of "
                    "an OpenAI-compatible API (usually http://HOST:PORT/v1)"
                )
            if status != 200:
                logger.warning("%s/models answered HTTP %d; sending load anyway", base, status)
                continue
            served = [str(m.get("id")) for m in (doc or {}).get("data", []) if isinstance(m, dict)]
            if served and model not in served:
                raise RunError(
                    f"--endpoint {endpoint} does not serve model {model!r} (it serves: "
                    f"{', '.join(served[:5])}); give --model"
                )


async def _get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as r:
        try:
            return r.status, await r.json(content_type=None)
        except ValueError:
            return r.status, None


def check_output(directory: Path) -> None:
    """Make sure the run directory can be written, before any load (it is created now).

    Raises:
        RunError: it, or a parent of it, is a file, or it cannot be created or written.
    """
    if directory.exists() and not directory.is_dir():
        raise RunError(f"--output {directory}: is a file, not a directory")
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"--output {directory}: {parent} is a file, not a directory")
            break
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"--output {directory}: cannot create it ({exc.strerror})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RunError(f"--output {directory}: cannot write there (permission denied)")


def exit_status(
    reports: list[Report], max_error_rate: float = 0.0, interrupted: bool = False
) -> int:
    """The run's exit status (``EXIT_*``): incomplete before errors before SLO breaches.

    A run in which no credit completed measured nothing: it is incomplete too, whatever its
    error rate (all its credits may have been stopped, which are not errors).
    """
    if interrupted or not reports:
        return EXIT_INCOMPLETE
    for r in reports:
        if r.unfinished or r.problems or r.collector.completed == 0:
            return EXIT_INCOMPLETE
    if any(r.error_rate() > max_error_rate for r in reports):
        return EXIT_ERRORS
    if any((r.goodput() or {}).get("breached") for r in reports):
        return EXIT_SLO
    return EXIT_OK


async def run(settings: RunSettings, out: IO[str] | None = None) -> int:
    """The whole command: load, replay (once or compared), print. Returns the exit status."""
    out = out if out is not None else sys.stdout
    try:
        workload = _workload(settings)
        if settings.output is not None:
            check_output(settings.output)
        if settings.preflight and settings.endpoints:
            await preflight(settings.endpoints, settings.model)
    except (WorkloadError, RunError) as exc:
        print(f"credit-router run: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    interrupts = _Interrupts()
    interrupts.install()
    policies: list[Policy] = ["sticky", "least_loaded"] if settings.compare else [settings.policy]
    reports = []
    try:
        for policy in policies:
            reports.append(await _one(settings, workload, policy, interrupts))
            if interrupts.count:
                break
    except (RunError, KeyError_) as exc:
        print(f"credit-router run: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ClusterError as exc:
        print(f"credit-router run: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE
    _print(settings, reports, out)
    code = exit_status(reports, settings.max_error_rate, interrupted=bool(interrupts.count))
    if settings.output is not None:
        from loadgen.artifacts import write_run

        try:
            write_run(settings.output, reports, settings, workload, exit_status=code)
        except OSError as exc:
            print(f"credit-router run: cannot write {settings.output}: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"run directory: {settings.output}", file=sys.stderr)
    if code != EXIT_OK:
        print(f"credit-router run: {_verdict(code, reports, settings)}", file=sys.stderr)
    return code


def _verdict(code: int, reports: list[Report], settings: RunSettings) -> str:
    """One line saying why the exit status is not 0."""
    if code == EXIT_INCOMPLETE and not any(r.unfinished or r.problems for r in reports):
        idle = [r for r in reports if r.collector.completed == 0]
        if idle:
            c = idle[0].collector
            hint = (
                "is any worker connected to the router?"
                if settings.router
                else "see the report's outcomes"
            )
            return (
                f"exit {code}: no credit completed ({c.credits:,} with an outcome: "
                f"{c.stopped:,} stopped by the run's end, {c.errors:,} errors): {hint}"
            )
    if code == EXIT_INCOMPLETE:
        unfinished = sum(r.unfinished for r in reports)
        return f"exit {code}: the run is incomplete ({unfinished} credits without an outcome, " + (
            "a cluster process failed)" if any(r.problems for r in reports) else "or interrupted)"
        )
    if code == EXIT_ERRORS:
        rate = max(r.error_rate() for r in reports)
        return (
            f"exit {code}: {rate:.2%} of credits failed, above --max-error-rate "
            f"{settings.max_error_rate:g}"
        )
    return f"exit {code}: the SLOs were not met (see goodput)"


def _width(out: IO[str]) -> int:
    return shutil.get_terminal_size((100, 24)).columns if out.isatty() else 100


def _print(settings: RunSettings, reports: list[Report], out: IO[str]) -> None:
    if settings.json:
        import json

        doc: Any = reports[0].as_dict() if len(reports) == 1 else [r.as_dict() for r in reports]
        print(json.dumps(doc, indent=2), file=out)
        return
    width = _width(out)
    for report in reports:
        print(report.render(width), file=out)
        print(file=out)
    if len(reports) > 1:
        print("sticky vs least-loaded routing, same workload, fresh servers each:", file=out)
        print(render_comparison(reports, width), file=out)


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
