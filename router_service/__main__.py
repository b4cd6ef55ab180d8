"""The ``credit-router`` command line. The only place that configures logging or exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile

__all__ = ["main"]


def _bench(args: argparse.Namespace) -> int:
    rows: list[dict[str, object]]
    if args.what == "core":
        from router_service.bench import core

        rows = core.run(credits=args.credits, repeat=args.repeat)
    else:
        from router_service.bench import e2e

        rows = e2e.run(workers=args.workers, window=args.window, duration_s=args.duration_s)
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


DEFAULT_WORKER_ENDPOINT = "tcp://127.0.0.1:5557"
DEFAULT_PRODUCER_ENDPOINT = f"ipc://{tempfile.gettempdir()}/credit-router.ipc"


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from protocol import PROTOCOL_VERSION
    from router_service.core.router import RouterCore
    from router_service.service import RouterService, new_incarnation
    from router_service.transport import TransportError

    _configure_logging(args.log_level)
    core = RouterCore(
        protocol_version=PROTOCOL_VERSION,
        router_incarnation=new_incarnation(),
        max_sessions=args.max_sessions,
        session_idle_ttl_s=args.session_idle_ttl_s,
        queue_limit=args.queue_limit,
        worker_queue_limit=args.worker_queue_limit,
        heartbeat_interval_s=args.heartbeat_interval_s,
        lost_after_s=args.lost_after_s,
        inflight_report_interval_s=args.inflight_report_interval_s,
    )
    service = RouterService(
        core,
        worker_endpoint=args.workers,
        producer_endpoint=args.producers,
        heartbeat_interval_s=args.heartbeat_interval_s,
        drain_deadline_s=args.drain_deadline_s,
        http_host=args.http_host,
        http_port=args.http_port,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, service.request_exit)
        loop.add_signal_handler(signal.SIGINT, service.request_exit)
        await service.serve()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except TransportError as exc:
        print(f"credit-router: {exc}", file=sys.stderr)
        return 2
    return 0


def _worker(argv: list[str]) -> int:
    from worker_agent.__main__ import main as worker_main

    return worker_main(argv)


def _run(args: argparse.Namespace) -> int:
    from router_service.simulate import main as simulate

    return simulate(seed=args.seed, sessions=args.sessions, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="credit-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark and print its figures")
    bench.add_argument("what", choices=["core", "e2e"], help="which benchmark")
    bench.add_argument("--json", action="store_true", help="one JSON object per scenario")
    bench.add_argument("--credits", type=int, default=400_000, help="credits per scenario run")
    bench.add_argument("--repeat", type=int, default=3, help="runs per scenario (best and median)")
    bench.add_argument("--workers", type=int, default=2, help="e2e: worker processes")
    bench.add_argument("--window", type=int, default=2048, help="e2e: credits in flight")
    bench.add_argument("--duration-s", type=float, default=3.0, help="e2e: measured seconds")
    bench.set_defaults(func=_bench)

    serve = sub.add_parser("serve", help="run the router daemon")
    serve.add_argument("--workers", default=DEFAULT_WORKER_ENDPOINT, help="worker endpoint")
    serve.add_argument("--producers", default=DEFAULT_PRODUCER_ENDPOINT, help="producer endpoint")
    serve.add_argument("--heartbeat-interval-s", type=float, default=1.0)
    serve.add_argument("--lost-after-s", type=float, default=10.0)
    serve.add_argument("--inflight-report-interval-s", type=float, default=5.0)
    serve.add_argument("--drain-deadline-s", type=float, default=30.0)
    serve.add_argument("--max-sessions", type=int, default=1_000_000)
    serve.add_argument("--session-idle-ttl-s", type=float, default=600.0)
    serve.add_argument("--queue-limit", type=int, default=100_000)
    serve.add_argument("--worker-queue-limit", type=int, default=10_000)
    serve.add_argument("--http-host", default="127.0.0.1", help="HTTP endpoints bind address")
    serve.add_argument("--http-port", type=int, default=9464, help="HTTP endpoints port")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

    sub.add_parser("worker", help="run a worker agent (see: credit-router worker --help)")

    run = sub.add_parser("run", help="route a built-in agentic workload and print a summary")
    run.add_argument("--seed", type=int, default=7)
    run.add_argument("--sessions", type=int, default=2_000, help="root agent sessions")
    run.add_argument("--workers", type=int, default=8)
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``credit-router`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
