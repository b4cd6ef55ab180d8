"""The ``credit-router`` command line; the only place that configures logging or exits.

Sub-commands: ``serve`` (the router daemon), ``worker`` (a worker agent), ``run`` (the main job),
``status``/``top`` (the router's state as a table), ``config show``, ``bench``.

One error path (``main``): a mistake of the user (a bad setting, a missing key file, a port in
use, malformed TOML) is one line on stderr naming the problem and its fix, exit status 2; any
other exception is a bug, reported in one line with exit status 1. ``--debug`` shows the
traceback in both cases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
import types
import typing
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from credit_common.logs import configure as configure_logging
from router_service.settings import RouterSettings, SettingsError

__all__ = ["UserError", "build_parser", "main"]

DESCRIPTION = (
    "Route LLM load-generation credits over ZeroMQ: run the router daemon (serve), worker "
    "agents in front of inference servers (worker), and load runs that print a report (run)."
)
EXIT_USAGE = 2
EXIT_INTERNAL = 1
LOG_LEVELS = ("debug", "info", "warning", "error")


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix, on one line."""


# Short names kept for the endpoints (they read better on a command line).
_ALIASES = {"worker_endpoint": "--workers", "producer_endpoint": "--producers"}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per router setting, generated from the model so the two never drift."""
    parser.add_argument("--config", type=Path, help="TOML file of settings")
    for name, field in RouterSettings.model_fields.items():
        if name == "curve":
            continue
        flag = f"--{name.replace('_', '-')}"
        flags = [flag, _ALIASES[name]] if name in _ALIASES else [flag]
        help_text = _help(field.description, field.default)
        kind = _scalar(field.annotation)
        choices = _choices(field.annotation)
        if name == "latency_buckets_s":
            parser.add_argument(*flags, dest=name, type=_buckets, metavar="S,S,...", help=help_text)
        elif kind is bool:
            parser.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif choices is not None:
            # Case-insensitive, like the worker's: --log-level INFO and --log-level info agree.
            parser.add_argument(*flags, dest=name, type=str.lower, choices=choices, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=kind, help=help_text)
    parser.add_argument("--curve-secret-key-file", type=Path, help="router secret key file")
    parser.add_argument("--curve-allowed-keys", type=Path, help="allowed worker public keys")


def _scalar(annotation: Any) -> Any:
    """The command-line type of a settings field (``X | None`` -> X; Literal -> str)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _scalar(next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        return str
    if origin is typing.Annotated:
        return _scalar(args[0])
    return annotation if annotation in (int, float, bool, str) else str


def _help(description: str | None, default: object) -> str:
    """A flag's help: the setting's first sentence, plain text, and its default."""
    first = (description or "").split(". ")[0].split("\n\n")[0].rstrip(".")
    first = " ".join(first.replace("``", "").split())
    shown = (
        "none"
        if default is None
        else str(default).lower()
        if isinstance(default, bool)
        else default
    )
    return f"{first} (default: {shown})" if first else f"default: {shown}"


def _buckets(text: str) -> tuple[float, ...]:
    """``--latency-buckets-s 0,0.001,0.1`` as bounds (argparse reports a ``ValueError``)."""
    from credit_common.histogram import parse_buckets

    try:
        return parse_buckets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal`` setting (through ``X | None``), else ``None``."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _choices(next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        return tuple(str(a) for a in args)
    return None


def _settings(args: argparse.Namespace) -> RouterSettings:
    flags = {name: getattr(args, name, None) for name in RouterSettings.model_fields}
    flags.pop("curve")
    curve = {
        "secret_key_file": args.curve_secret_key_file,
        "allowed_keys": args.curve_allowed_keys,
    }
    if any(v is not None for v in curve.values()):
        flags["curve"] = {k: v for k, v in curve.items() if v is not None}
    return RouterSettings.load(args.config, **flags)


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from protocol import PROTOCOL_VERSION
    from router_service.core.router import RouterCore
    from router_service.service import RouterService, new_incarnation
    from router_service.transport import TransportError

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    core = RouterCore(
        protocol_version=PROTOCOL_VERSION,
        router_incarnation=new_incarnation(),
        max_sessions=settings.max_sessions,
        session_idle_ttl_s=settings.session_idle_ttl_s,
        queue_limit=settings.queue_limit,
        worker_queue_limit=settings.worker_queue_limit,
        queue_timeout_s=settings.queue_timeout_s,
        observe_latency=settings.latency_histograms,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        suspect_after_missed=settings.suspect_after_missed,
        lost_after_s=settings.lost_after_s,
        closed_grace_s=min(settings.closed_grace_s, settings.lost_after_s),
        inflight_report_interval_s=settings.inflight_report_interval_s,
        soft_affinity_gap=settings.soft_affinity_gap,
        spawn_affinity_slack=settings.spawn_affinity_slack,
        sticky=settings.routing_policy == "sticky",
    )
    if settings.latency_buckets_s is not None:
        from credit_common.histogram import Histogram

        bounds = tuple(settings.latency_buckets_s)
        core.stats.submit_to_dispatch_s = Histogram(bounds)
        core.stats.dispatch_to_outcome_s = Histogram(bounds)
    curve, allowlist = _curve(settings)
    service = RouterService(
        core,
        worker_endpoint=settings.worker_endpoint,
        producer_endpoint=settings.producer_endpoint,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        drain_deadline_s=settings.drain_deadline_s,
        producer_timeout_s=settings.producer_timeout_s,
        http_host=settings.http_host,
        http_port=settings.http_port,
        curve=curve,
        allowlist=allowlist,
    )

    # The HTTP port is checked before anything binds or logs "router started": taken, it is one
    # line and nothing left behind (no IPC socket file, no half-started router).
    if settings.http_port:
        _check_port_free(settings.http_host, settings.http_port)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, service.reload_keys)
        loop.add_signal_handler(signal.SIGTERM, service.request_exit)
        # First SIGINT drains like SIGTERM; a second one forces (request_exit escalates).
        loop.add_signal_handler(signal.SIGINT, service.request_exit)
        try:
            await service.serve()
        except OSError as exc:
            # The port was taken between the check and the bind: close what did bind (the
            # ZeroMQ sockets, their IPC files) before saying so.
            if service.ready.is_set():
                raise
            await service.shutdown()
            raise UserError(
                f"cannot serve HTTP on {settings.http_host}:{settings.http_port}: "
                f"{exc.strerror or exc}; stop the process using it or pick another --http-port"
            ) from exc

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except TransportError as exc:
        raise UserError(str(exc)) from exc
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Raise ``UserError`` when ``host:port`` cannot be bound for listening."""
    from credit_common.web import port_problem

    problem = port_problem(host, port)
    if problem is not None:
        raise UserError(
            f"cannot serve HTTP on {host}:{port}: {problem}; stop the process using it, or "
            "pick another port (--http-port, CREDIT_ROUTER_HTTP_PORT)"
        )


def _curve(settings: RouterSettings) -> tuple[tuple[bytes, bytes] | None, Any]:
    """Server keys and allowlist from the settings; refuses plaintext off loopback."""
    from router_service.security import Allowlist, load_secret

    c = settings.curve
    keys: tuple[bytes, bytes] | None = None
    if c.secret_key is not None:
        secret = c.secret_key.get_secret_value().encode()
        keys = (zmq_curve_public(secret), secret)
    elif c.secret_key_file is not None:
        keys = load_secret(c.secret_key_file)
    if keys is not None:
        if c.allowed_keys is None:
            raise SettingsError("invalid setting curve.allowed_keys: required with a secret key")
        return keys, Allowlist(c.allowed_keys)
    for name in ("worker_endpoint", "producer_endpoint"):
        endpoint = getattr(settings, name)
        if _exposed(endpoint):
            if not settings.insecure:
                raise SettingsError(
                    f"invalid setting {name}: plaintext on non-loopback {endpoint} needs "
                    "CURVE keys (curve.secret_key_file, curve.allowed_keys) or --insecure"
                )
            logging.getLogger("router_service").warning(
                "INSECURE: %s %s is plaintext and unauthenticated", name, endpoint
            )
    return None, None


def zmq_curve_public(secret: bytes) -> bytes:
    """The Z85 public key of a Z85 secret key."""
    import zmq

    return zmq.curve_public(secret)


def _exposed(endpoint: str) -> bool:
    """A TCP endpoint bound beyond loopback."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    return not (host.startswith("127.") or host in ("localhost", "::1"))


def _keys(args: argparse.Namespace) -> int:
    from credit_common.keys import generate

    if not args.force:
        # A key pair overwritten by accident locks out every peer that trusts the old one.
        existing = [
            path
            for name in args.names
            for path in (args.directory / f"{name}.key", args.directory / f"{name}.key_secret")
            if path.exists()
        ]
        if existing:
            raise UserError(
                f"{existing[0]} exists; pass --force to overwrite it (peers holding the old "
                "public key will be refused)"
            )
    try:
        written = generate(args.directory, args.names)
    except OSError as exc:
        raise UserError(
            f"cannot write keys into {args.directory}: {exc.strerror or exc}; "
            "pick a directory you can write"
        ) from None
    for path in written:
        print(path)
    return 0


def _config_show(args: argparse.Namespace) -> int:
    print(json.dumps(_settings(args).redacted(), indent=2))
    return 0


def _fetch_status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url.rstrip('/')}/status", timeout=5) as response:
        doc: dict[str, Any] = json.load(response)
    return doc


def _render_status(doc: dict[str, Any]) -> str:
    router, totals = doc["router"], doc["totals"]
    lines = [
        f"router {router['incarnation']}  v{router['version']}  up {router['uptime_s']:.0f}s  "
        f"{'draining' if router['draining'] else 'ready' if router['ready'] else 'starting'}",
        f"workers {totals['workers']}  producers {totals['producers']}  "
        f"in flight {totals['in_flight']}  queued {totals['queued']}  "
        f"sessions {totals['sessions']}  fork aliases {totals['fork_aliases']}",
        "outcomes " + "  ".join(f"{k} {v}" for k, v in totals["outcomes"].items()),
        "",
    ]
    header = (
        "WORKER", "STATE", "EXECUTOR", "ENDPOINT", "LOAD", "CAP", "SESSIONS", "QUEUED",
        "DISPATCHED", "SILENT",
    )  # fmt: skip
    rows = [header] + [
        (
            w["name"],
            w["state"],
            # What answers this worker's credits: a simulator's figures are not a server's.
            w.get("executor") or w.get("labels", {}).get("executor", "?"),
            w.get("endpoint") or w.get("labels", {}).get("endpoint", "-") or "-",
            str(w["in_flight"]),
            str(w["capacity"]),
            str(w["sessions"]),
            str(w["queued"]),
            # Credits dispatched to it since it joined (not ``sent``: that is the routing
            # tie-break, which starts a late joiner at the fleet mean).
            str(w["dispatched"]),
            f"{w['silent_s']:.1f}s",
        )
        for w in doc["workers"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    try:
        doc = _fetch_status(args.url)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"cannot reach the router at {args.url} ({reason}); is `credit-router serve` "
            "running, and is --url its HTTP address (default port 9464)?"
        ) from None
    print(_render_status(doc))
    return 0


TOP_KEYS = "q quit · r refresh now · +/- slower/faster"


def _top(args: argparse.Namespace) -> int:
    """Redraw the status every ``--interval-s``; keys: ``q`` quits, ``r`` refreshes, ``+``/``-``.

    Keys are read unbuffered (cbreak mode) when stdin is a terminal; otherwise only Ctrl-C
    stops it.
    """
    import contextlib
    import select

    interval = args.interval_s
    with contextlib.ExitStack() as stack:
        interactive = sys.stdin.isatty()
        if interactive:
            import termios
            import tty

            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            stack.callback(termios.tcsetattr, fd, termios.TCSADRAIN, saved)
            tty.setcbreak(fd)
        try:
            while True:
                try:
                    screen = _render_status(_fetch_status(args.url))
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    screen = f"cannot reach {args.url}: {getattr(exc, 'reason', exc)}"
                footer = f"\n\n{TOP_KEYS}   (every {interval:g}s)" if interactive else ""
                sys.stdout.write("\x1b[H\x1b[2J" + screen + footer + "\n")
                sys.stdout.flush()
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    if not interactive:
                        time.sleep(left)
                        break
                    ready, _, _ = select.select([sys.stdin], [], [], left)
                    if not ready:
                        break
                    key = sys.stdin.read(1)
                    if key in ("q", "Q", ""):  # "" is end of input
                        return 0
                    if key == "r":
                        break
                    if key in "+-":
                        interval = max(0.2, interval * (2.0 if key == "+" else 0.5))
                        break
        except KeyboardInterrupt:
            return 0
    return 0


def _bench(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]]
    if args.what == "core":
        from loadgen.bench import core

        rows = core.run(credits=args.credits, repeat=args.repeat)
    else:
        from loadgen.bench import e2e

        rows = e2e.run(workers=args.workers, window=args.window, duration_s=args.duration_s)
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    from loadgen.commands import run_command

    return run_command(args)


def _worker(argv: list[str]) -> int:
    from worker_agent.__main__ import main as worker_main

    code: int = worker_main(argv, prog="credit-router worker")
    return code


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("credit-router")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: the problem, then where the help is (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        """Print ``PROG: MESSAGE (see PROG --help)`` and exit with status 2."""
        self.exit(2, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = _Parser(prog="credit-router", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # main() takes --debug anywhere on the line (before or after the sub-command).
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the router daemon")
    _add_settings_flags(serve)
    serve.set_defaults(func=_serve)

    sub.add_parser(
        "worker", help="run a worker agent in front of an inference server (worker --help)"
    )

    keys = sub.add_parser("keys", help="CurveZMQ key pairs")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    gen = keys_sub.add_parser(
        "generate", help="write NAME.key (public) and NAME.key_secret for each name"
    )
    gen.add_argument("directory", type=Path)
    gen.add_argument("names", nargs="*", default=["router"], help="key names (default: router)")
    gen.add_argument(
        "--force", action="store_true", help="overwrite key files that exist (default: refuse)"
    )
    gen.set_defaults(func=_keys)

    config = sub.add_parser("config", help="show the effective configuration")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="print the effective settings (secrets redacted)")
    _add_settings_flags(show)
    show.set_defaults(func=_config_show)

    for name, func, text in (
        ("status", _status, "print the router's state as a table"),
        ("top", _top, "refresh the router's state in the terminal"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--url", default="http://127.0.0.1:9464", help="the router's HTTP base")
        if name == "top":
            cmd.add_argument(
                "--interval-s", type=float, default=1.0, help="refresh period (default 1)"
            )
        cmd.set_defaults(func=func)

    bench = sub.add_parser("bench", help="run a benchmark and print its figures")
    bench.add_argument("what", choices=["core", "e2e"], help="which benchmark")
    bench.add_argument("--json", action="store_true", help="one JSON object per scenario")
    bench.add_argument("--credits", type=int, default=400_000, help="core: credits per run")
    bench.add_argument("--repeat", type=int, default=3, help="core: runs per scenario")
    bench.add_argument("--workers", type=int, default=2, help="e2e: worker processes")
    bench.add_argument("--window", type=int, default=2048, help="e2e: credits in flight")
    bench.add_argument("--duration-s", type=float, default=3.0, help="e2e: measured seconds")
    bench.set_defaults(func=_bench)

    from loadgen import commands  # argparse only: the work is imported when it runs

    run = sub.add_parser(
        "run", help="replay a workload through a router, workers and servers; print a report"
    )
    commands.add_run_arguments(run)
    run.set_defaults(func=_run)
    from loadgen.workload import __main__ as workload_cli

    workload = sub.add_parser("workload", help="check, convert or generate workload files")
    workload_cli.add_arguments(workload)
    workload.set_defaults(func=workload_cli.run)
    report = sub.add_parser("report", help="re-render a run directory (run --output); compare two")
    commands.add_report_arguments(report)
    report.set_defaults(func=commands.report_command)
    mock = sub.add_parser(
        "mock-server", help="serve a mock OpenAI-compatible endpoint with a prefix cache"
    )
    commands.add_mock_server_arguments(mock)
    mock.set_defaults(func=commands.mock_server_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``credit-router`` console script; returns the exit status.

    0 success; 2 a user error (one line naming the problem and its fix); 1 an internal error
    (one line; ``--debug`` shows the traceback). Sub-commands may return their own codes.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    if [a for a in argv if a != "--debug"][:1] == ["worker"]:
        # The worker has its own parser (python -m worker_agent is the same command).
        rest = argv[argv.index("worker") + 1 :]
        return _worker(rest + (["--debug"] if debug and "--debug" not in rest else []))
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    from credit_common.keys import KeyError_

    try:
        code: int = args.func(args)
    except (UserError, SettingsError, KeyError_) as exc:
        if debug:
            raise
        print(f"credit-router: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        print(
            f"credit-router: internal error: {type(exc).__name__}: {exc} "
            "(a bug: run again with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return code


if __name__ == "__main__":
    sys.exit(main())
