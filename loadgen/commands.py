"""The command lines of ``credit-router run`` and ``credit-router mock-server``.

Only argparse here: building the parser must stay cheap for every sub-command, so the modules
that do the work (``run``, ``mockserver``, and through them aiohttp, ZeroMQ, the workloads) are
imported when one of these commands actually runs. ``docs/RUN.md`` describes the options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "add_mock_server_arguments",
    "add_report_arguments",
    "add_run_arguments",
    "mock_server_command",
    "report_command",
    "run_command",
]

DEFAULT_DURATION_S = 30.0
"""How long the built-in workload runs when no limit is given (``make run``)."""


def _positive(kind: type[Any]) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``credit-router run``."""
    from loadgen.workload import FORMATS

    parser.add_argument(
        "workload",
        nargs="?",
        type=Path,
        help="a workload file (or directory of coding-agent traces): credit-router JSONL, "
        "Mooncake, AIPerf dag_jsonl/single_turn/multi_turn/random_pool, coding-agent or Bailian "
        "traces (default: the built-in agentic workload)",
    )
    parser.add_argument("--format", choices=FORMATS, default="auto")
    parser.add_argument("--block-tokens", type=_positive(int), help="tokens per hash_ids block")
    load = parser.add_argument_group("load (one of)")
    how = load.add_mutually_exclusive_group()
    how.add_argument(
        "--concurrency", type=_positive(int), help="agent trees live at once (default 16)"
    )
    how.add_argument("--rate", type=_positive(float), help="agent trees started per second")
    how.add_argument(
        "--timestamps", action="store_true", help="start roots at their trace times (start_s)"
    )
    load.add_argument(
        "--arrival",
        choices=["poisson", "constant", "gamma"],
        default="poisson",
        help="--rate: spacing of tree starts (default poisson)",
    )
    load.add_argument(
        "--burstiness",
        type=_positive(float),
        default=1.0,
        help="--arrival gamma: shape of the gaps; 1 is Poisson, < 1 burstier (default 1)",
    )
    load.add_argument(
        "--speedup",
        type=_positive(float),
        default=1.0,
        help="divide every time of the workload (start times, offsets, think times) by this",
    )
    load.add_argument(
        "--think-scale",
        type=_non_negative,
        default=1.0,
        help="multiply think times (a turn's delay_s) by this (0: none)",
    )
    stop = parser.add_argument_group("stop")
    stop.add_argument(
        "--duration-s",
        type=_positive(float),
        help=f"stop issuing after this long (built-in workload: {DEFAULT_DURATION_S:g})",
    )
    stop.add_argument("--sessions", type=_positive(int), help="stop after this many trees")
    stop.add_argument(
        "--grace-s", type=float, default=5.0, help="then wait this long for in-flight credits"
    )
    where = parser.add_argument_group("cluster")
    where.add_argument("--workers", type=_positive(int), default=3, help="local worker agents")
    where.add_argument(
        "--mock-servers", type=_positive(int), default=2, help="local mock inference servers"
    )
    where.add_argument("--capacity", type=_positive(int), default=32, help="credits per worker")
    where.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="URL",
        help="real OpenAI-compatible servers for the local workers (repeatable)",
    )
    where.add_argument("--model", default="mock", help="model name the workers send")
    where.add_argument(
        "--api",
        choices=["chat", "completions", "responses"],
        default="chat",
        help="the workers' generation API: chat (/chat/completions), completions (legacy "
        "/completions) or responses (/responses); the mock serves all three",
    )
    where.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every local worker, e.g. --worker-arg=--no-stream",
    )
    where.add_argument(
        "--router", metavar="ENDPOINT", help="a running router's producer endpoint (no cluster)"
    )
    where.add_argument(
        "--curve-server-key",
        type=Path,
        metavar="FILE",
        help="--router over TCP with CURVE: the router's public key file (NAME.key)",
    )
    where.add_argument(
        "--curve-key",
        type=Path,
        metavar="FILE",
        help="this producer's key pair (NAME.key_secret; NAME must be in the router's allowlist)",
    )
    where.add_argument(
        "--connect-timeout-s",
        type=_positive(float),
        metavar="S",
        default=5.0,
        help="how long to wait for the router's answer (default 5)",
    )
    where.add_argument(
        "--no-preflight",
        action="store_true",
        help="do not ask --endpoint servers for /models before sending load",
    )
    policy = parser.add_argument_group("routing")
    policy.add_argument("--routing-policy", choices=["sticky", "least_loaded"], default="sticky")
    policy.add_argument(
        "--compare", action="store_true", help="run sticky, then least_loaded; print both"
    )
    output = parser.add_argument_group("output and verdict")
    output.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="write the run directory: summary, records (JSONL, CSV), config, plots",
    )
    output.add_argument("--records", type=Path, help="write one JSON line per credit here")
    output.add_argument(
        "--max-error-rate",
        type=_fraction,
        metavar="R",
        default=0.0,
        help="fraction of credits that may fail with exit status 0 (default 0: none)",
    )
    output.add_argument(
        "--slo",
        metavar="OBJECTIVES",
        help="e.g. ttft_ms=500,e2e_ms=5000[,itl_ms=50][,attainment=0.99]: report goodput; "
        "exit 4 if fewer credits meet them than attainment",
    )
    output.add_argument(
        "--lateness-threshold-ms",
        type=_non_negative,
        metavar="MS",
        default=50.0,
        help="warn when p99 lateness (intended → dispatched) passes this (default 50)",
    )
    output.add_argument("--json", action="store_true", help="print the report as JSON")
    output.add_argument("--no-progress", action="store_true", help="no progress line")
    output.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    output.add_argument("--log-level", default="warning", choices=["debug", "info", "warning"])
    gen = parser.add_argument_group("built-in workload")
    gen.add_argument("--seed", type=int, default=7, help="generator and arrival seed")
    gen.add_argument(
        "--gen",
        action="append",
        default=[],
        metavar="PARAM=VALUE",
        help="a generator parameter (docs/WORKLOADS.md), e.g. --gen fork_prob=0.3",
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="instead: the in-process simulation of the routing core (no sockets)",
    )


def _generator(args: argparse.Namespace) -> Any:
    from loadgen.workload import GeneratorParams

    defaults = GeneratorParams(seed=args.seed)
    changes: dict[str, Any] = {}
    names = set(GeneratorParams.names())
    for item in args.gen:
        key, sep, text = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--gen {item!r}: expected PARAM=VALUE, PARAM one of {sorted(names)}")
        current = getattr(defaults, key)
        if isinstance(current, tuple):
            changes[key] = tuple(text.split(","))
        elif current is None or isinstance(current, float):
            changes[key] = float(text)
        else:
            changes[key] = type(current)(text)
    return defaults.with_(**changes)


def _settings(args: argparse.Namespace) -> Any:
    from loadgen.replay import Mode, ReplayOptions
    from loadgen.report import Slo
    from loadgen.run import RunSettings

    mode: Mode = "timestamps" if args.timestamps else "rate" if args.rate else "concurrency"
    duration = args.duration_s
    if duration is None and args.workload is None and args.sessions is None:
        duration = DEFAULT_DURATION_S
    replay = ReplayOptions(
        mode=mode,
        concurrency=args.concurrency or 16,
        rate=args.rate or 4.0,
        arrival=args.arrival,
        burstiness=args.burstiness,
        speedup=args.speedup,
        think_scale=args.think_scale,
        duration_s=duration,
        sessions=args.sessions,
        grace_s=args.grace_s,
        seed=args.seed,
        model=args.model,
    )
    return RunSettings(
        workload=args.workload,
        fmt=args.format,
        block_tokens=args.block_tokens,
        generator=_generator(args),
        replay=replay,
        workers=args.workers,
        mock_servers=args.mock_servers,
        capacity=args.capacity,
        endpoints=tuple(args.endpoint),
        model=args.model,
        api=args.api,
        worker_args=tuple(args.worker_arg),
        router=args.router,
        policy=args.routing_policy,
        compare=args.compare,
        records=args.records,
        json=args.json,
        progress=not args.no_progress,
        keep_logs=args.keep_logs,
        output=args.output,
        max_error_rate=args.max_error_rate,
        slo=Slo.parse(args.slo) if args.slo else None,
        lateness_threshold_s=args.lateness_threshold_ms / 1e3,
        curve_server_key=args.curve_server_key,
        curve_key=args.curve_key,
        connect_timeout_s=args.connect_timeout_s,
        preflight=not args.no_preflight,
        argv=tuple(sys.argv[1:]),
    )


def run_command(args: argparse.Namespace) -> int:
    """``credit-router run``: returns the exit status (2 for bad options or workloads)."""
    if args.simulate:
        from loadgen.simulate import main as simulate

        return simulate(seed=args.seed, sessions=args.sessions or 2_000, workers=args.workers)
    from credit_common.logs import configure
    from loadgen.run import main

    configure(args.log_level, "text")
    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"credit-router run: {exc}", file=sys.stderr)
        return 2
    code: int = main(settings)
    return code


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``credit-router report``."""
    parser.add_argument(
        "directories",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="a run directory (run --output); two: compare them side by side",
    )
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")


def report_command(args: argparse.Namespace) -> int:
    """``credit-router report DIR [DIR2]``: re-render a run directory, or compare two."""
    import shutil

    from loadgen.artifacts import report_command as report

    if len(args.directories) > 2:
        print("credit-router report: give one run directory, or two to compare", file=sys.stderr)
        return 2
    width = shutil.get_terminal_size((100, 24)).columns if sys.stdout.isatty() else 100
    return report(args.directories, json_out=args.json, width=width)


def add_mock_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``credit-router mock-server`` (defaults: ``MockSettings``)."""
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument("--model", default="mock", help="the model name it reports")
    for flag, kind, text in (
        ("--base-ttft-s", float, "fixed part of the time to first token (0.02)"),
        ("--prefill-s-per-token", float, "per uncached prompt token (0.00005)"),
        ("--decode-s-per-token", float, "between generated tokens (0.008)"),
        ("--block-tokens", int, "tokens per KV block (16)"),
        ("--cache-blocks", int, "prefix-cache capacity in blocks (32768)"),
        ("--tokens-per-chunk", int, "generated tokens per SSE event (1)"),
        ("--max-concurrency", int, "requests served at once, 0 unbounded (0)"),
        ("--default-max-tokens", int, "output when a request gives no max_tokens (64)"),
        ("--fault-rate", float, "fraction of requests answered 503 (0)"),
        ("--record-sessions", int, "sessions kept for /mock/sessions (1000)"),
        ("--seed", int, "seeds the random faults (0)"),
        ("--reasoning-tokens", int, "words of reasoning streamed before each answer (0)"),
        ("--long-event-bytes", int, "size of the long_event fault's event (614400)"),
    ):
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument(
        "--reasoning-field",
        choices=["reasoning", "reasoning_content"],
        help="the delta field reasoning streams in (reasoning)",
    )
    parser.add_argument(
        "--no-tool-calls",
        dest="tool_calls",
        action="store_const",
        const=False,
        help="answer requests that offer tools in text, not with a tool call",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def mock_server_command(args: argparse.Namespace) -> int:
    """``credit-router mock-server``: serve until SIGTERM or SIGINT."""
    import asyncio
    import dataclasses
    import signal

    import uvloop

    from credit_common.logs import configure
    from loadgen.mockserver import MockSettings, serve

    configure(args.log_level, "text")
    names = {f.name for f in dataclasses.fields(MockSettings)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        settings = MockSettings(**given)
    except ValueError as exc:
        print(f"credit-router mock-server: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, args.host, args.port, stop)

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except OSError as exc:
        # Bad input, like every other one-line error of the CLI: the port is taken, or the
        # host is not this machine's.
        print(
            f"credit-router mock-server: cannot serve on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    return 0
