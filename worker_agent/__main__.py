"""The worker agent's command line: ``python -m worker_agent`` (and ``credit-router worker``).

The only place that configures logging, installs signal handlers and maps outcomes to exit codes:
0 when the agent drained (by itself or at its deadline), 1 after a forced exit or a failed
socket, 2 when the router refused it or the command line is wrong. The event loop is uvloop's,
chosen by ``asyncio.Runner``'s loop factory (no global policy).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import socket
import sys
import typing
from pathlib import Path
from typing import Final

import uvloop

from worker_agent.agent import StopReason, TransportFactory, WorkerAgent
from worker_agent.errors import RefusedError, TransportError
from worker_agent.executor import SimExecutor
from worker_agent.settings import SettingsError, WorkerSettings
from worker_agent.transport import DealerTransport, ErrorHandler, FrameHandler, Transport
from worker_agent.web import WorkerHttp

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

_ENDPOINT: Final = re.compile(r"^(tcp://(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]*]+):\d{1,5}|ipc://\S+)$")

EXIT_OK = 0
EXIT_FORCED = 1
EXIT_REFUSED = 2
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: the problem, then where the help is (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        """Print ``PROG: MESSAGE (see PROG --help)`` and exit with status 2."""
        self.exit(2, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def build_parser(prog: str = "credit-router worker") -> argparse.ArgumentParser:
    """The argument parser of the worker agent."""
    parser = _Parser(
        prog=prog,
        description=(
            "Join a credit router and execute its credits: against an OpenAI-compatible "
            "inference server (--executor openai --endpoint URL --model NAME), or the built-in "
            "simulator (--executor sim, for tests and router benchmarks)."
        ),
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    parser.add_argument("--config", type=Path, help="TOML file of settings")
    parser.add_argument("--router", help="the router's worker endpoint, e.g. tcp://HOST:PORT")
    parser.add_argument("--name", help="the worker's name (default: hostname)")
    parser.add_argument("--capacity", type=int, help="credits executed at once (default 64)")
    parser.add_argument(
        "--executor",
        choices=["sim", "openai"],
        default="sim",
        help="what runs credits: openai (a real server) or sim (the simulator; default)",
    )
    from worker_agent.openai import add_arguments as add_openai_arguments  # --endpoint …

    add_openai_arguments(parser)
    parser.add_argument(
        "--sim-zero-latency",
        action="store_true",
        help="the simulator finishes every credit at once (router benchmarks)",
    )
    parser.add_argument(
        "--no-first-token-events",
        dest="first_token_events",
        action="store_false",
        help="do not send FirstToken events",
    )
    parser.add_argument(
        "--drain-deadline-s",
        type=float,
        help="on SIGTERM, leave after at most this long (default 30)",
    )
    parser.add_argument(
        "--latency-buckets-s",
        type=_buckets,
        metavar="S,S,...",
        help="upper bounds of the TTFT and duration histograms, seconds (default 10us..120s)",
    )
    parser.add_argument("--http-host", help="HTTP endpoints bind address (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, help="serve /metrics, /livez, /readyz here")
    parser.add_argument(
        "--log-format", type=str.lower, choices=["text", "json"], help="log lines (default text)"
    )
    parser.add_argument(
        "--curve-server-key",
        type=Path,
        help="CurveZMQ: the router's public key file (router.key)",
    )
    parser.add_argument(
        "--curve-key",
        type=Path,
        help="CurveZMQ: this worker's key pair (NAME.key_secret; NAME must be --name)",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="logging level (default info)",
    )
    parser.set_defaults(first_token_events=None)
    return parser


def _buckets(text: str) -> tuple[float, ...]:
    from credit_common.histogram import parse_buckets

    try:
        return parse_buckets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _settle(args: argparse.Namespace) -> WorkerSettings:
    """Merge flags over environment over the TOML file, and write the result back into args."""
    fields = WorkerSettings.model_fields
    settings = WorkerSettings.load(
        args.config, **{k: getattr(args, k, None) for k in fields if hasattr(args, k)}
    )
    for key in fields:
        setattr(args, key, getattr(settings, key))
    return settings


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the settings model cannot say: a connectable endpoint, a valid ZeroMQ routing id.

    (Capacity and the drain deadline are bounded by ``WorkerSettings`` already.)
    """
    if not _ENDPOINT.match(args.router):
        parser.error(f"--router must be tcp://HOST:PORT or ipc://PATH, got {args.router!r}")
    name = args.name.encode("utf-8")
    if not 0 < len(name) <= 255 or name[0] == 0:
        parser.error("--name must be 1-255 bytes of UTF-8")
    if "/" in args.name:
        parser.error(
            f"--name {args.name!r} must not contain '/': the routing id is NAME/INCARNATION"
        )
    if args.executor == "openai" and not str(args.model).strip():
        parser.error("--model is empty: give the model the server serves (its /v1/models id)")


def _configure_logging(level: str, fmt: str = "text") -> None:
    from credit_common.logs import configure

    configure(level, fmt)


def _install_signals(agent: WorkerAgent, deadline_s: float) -> None:
    """First SIGTERM/SIGINT drains; the second (of either) forces the exit."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            logger.info("%s received: draining (deadline %.1fs)", name, deadline_s)
            agent.drain(deadline_s)
        else:
            logger.warning("%s received again: forcing the exit", name)
            agent.force_exit()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def _transport_factory(args: argparse.Namespace) -> TransportFactory | None:
    """CurveZMQ when both key options are given (the router's public key, our key pair)."""
    if args.curve_server_key is None and args.curve_key is None:
        return None
    if args.curve_server_key is None or args.curve_key is None:
        raise SettingsError(
            "invalid settings: --curve-server-key and --curve-key go together; give both "
            "(the router's router.key and this worker's NAME.key_secret) or neither"
        )
    from credit_common.keys import load_public, load_secret

    keys = (load_public(args.curve_server_key), *load_secret(args.curve_key))

    def factory(
        endpoint: str, routing_id: str, on_frames: FrameHandler, on_error: ErrorHandler
    ) -> Transport:
        return DealerTransport(endpoint, routing_id, on_frames, on_error=on_error, curve=keys)

    return factory


def identity_labels(args: argparse.Namespace) -> dict[str, str]:
    """What the router's ``/status`` shows of this worker: host, and what answers its credits.

    ``executor`` itself is added by the agent; ``endpoint`` and ``model`` say which server an
    ``openai`` worker drives (``-`` for the simulator), so an operator sees at a glance whether
    figures come from a real server.
    """
    labels = {"host": socket.gethostname()}
    if args.executor == "openai":
        labels["endpoint"] = ",".join(args.endpoint)[:256]
        labels["model"] = str(args.model)[:256]
    else:
        labels["endpoint"] = "-"
    return labels


async def _run(args: argparse.Namespace, transport_factory: TransportFactory | None) -> int:
    from worker_agent.openai import executor_from_args  # None unless --executor openai

    executor = executor_from_args(args) or SimExecutor(zero_latency=args.sim_zero_latency)
    agent = WorkerAgent(
        router=args.router,
        name=args.name,
        executor=executor,
        capacity=args.capacity,
        labels={**args.labels, **identity_labels(args)},
        first_token_events=args.first_token_events,
        drain_deadline_s=args.drain_deadline_s,
        transport_factory=transport_factory,
    )
    if args.latency_buckets_s is not None:
        from credit_common.histogram import Histogram

        agent.stats.ttft_s = Histogram(tuple(args.latency_buckets_s))
        agent.stats.duration_s = Histogram(tuple(args.latency_buckets_s))
    _install_signals(agent, args.drain_deadline_s)
    http = WorkerHttp(agent, args.http_host, args.http_port) if args.http_port is not None else None
    try:
        if http is not None:
            await http.start()
        reason = await agent.serve()
    except RefusedError as exc:
        logger.error("%s", exc)
        return EXIT_REFUSED
    except TransportError as exc:
        logger.error("%s", exc)
        return EXIT_FORCED
    finally:
        if http is not None:
            await http.stop()
    return EXIT_FORCED if reason is StopReason.FORCED else EXIT_OK


def main(argv: list[str] | None = None, prog: str = "credit-router worker") -> int:
    """Run the worker agent until it leaves.

    Args:
        argv: the arguments (without the program name); ``sys.argv[1:]`` when ``None``.
        prog: the command's name in usage lines and errors.

    Returns:
        The exit code: 0 drained, 1 forced exit or socket failure, 2 refused or bad usage
        (one line on stderr naming the problem; ``--debug`` adds the traceback).
    """
    from credit_common.keys import KeyError_

    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
        _settle(args)
        _check(parser, args)
        transport_factory = _transport_factory(args)
        if args.http_port:
            from credit_common.web import port_problem

            problem = port_problem(args.http_host, args.http_port)
            if problem is not None:
                raise SettingsError(
                    f"cannot serve HTTP on {args.http_host}:{args.http_port}: {problem}; stop "
                    "the process using it, or pick another --http-port"
                )
    except (SettingsError, KeyError_) as exc:
        if debug:
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse exits on --help and on usage errors; we return
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.log_level, args.log_format)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(args, transport_factory))


if __name__ == "__main__":
    sys.exit(main(prog="python -m worker_agent"))
