"""The ``credit-router`` command line. The only place that configures logging or exits."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _bench(args: argparse.Namespace) -> int:
    if args.what == "core":
        from router_service.bench import core

        rows = core.run(credits=args.credits, repeat=args.repeat)
    else:  # pragma: no cover - argparse restricts the choices
        raise AssertionError(args.what)
    for row in rows:
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    from router_service.simulate import main as simulate

    return simulate(seed=args.seed, sessions=args.sessions, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="credit-router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="run a benchmark and print its figures")
    bench.add_argument("what", choices=["core"], help="which benchmark")
    bench.add_argument("--json", action="store_true", help="one JSON object per scenario")
    bench.add_argument("--credits", type=int, default=400_000, help="credits per scenario run")
    bench.add_argument("--repeat", type=int, default=3, help="runs per scenario (best and median)")
    bench.set_defaults(func=_bench)

    run = sub.add_parser("run", help="route a built-in agentic workload and print a summary")
    run.add_argument("--seed", type=int, default=7)
    run.add_argument("--sessions", type=int, default=2_000, help="root agent sessions")
    run.add_argument("--workers", type=int, default=8)
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``credit-router`` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
