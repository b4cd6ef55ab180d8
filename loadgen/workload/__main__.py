"""``python -m loadgen.workload``: generate, convert and check workload files.

* ``generate [--sessions N --seed S --PARAM VALUE…] [-o FILE]`` writes a synthetic agentic
  workload in the credit-router format (every ``GeneratorParams`` field is a flag);
* ``convert FILE [--format F] [-o FILE]`` writes a Mooncake trace or an AIPerf ``dag_jsonl``
  file in the credit-router format;
* ``check FILE [--format F]`` reads a file and prints what it holds, or the first error (with
  its line and field) and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import IO, Any

from loadgen.workload import (
    GeneratorParams,
    Workload,
    WorkloadError,
    dump_workload,
    generate,
    load_workload,
)

__all__ = ["main"]

_FORMATS = ["auto", "credit-router", "aiperf", "mooncake"]


def _add_generator_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(GeneratorParams)
    for f in dataclasses.fields(GeneratorParams):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if f.name == "subagent_types":
            parser.add_argument(flag, type=lambda s: tuple(s.split(",")), help="comma-separated")
        elif f.name == "arrival_rate":
            parser.add_argument(flag, type=float, help="roots per second (sets start_s)")
        else:
            parser.add_argument(flag, type=kind, help=f"default {f.default}")


def _write(workload: Workload, output: Path | None) -> None:
    if output is None:
        dump_workload(workload, sys.stdout.buffer)
        return
    with output.open("wb") as f:
        dump_workload(workload, f)


def _print_summary(workload: Workload, out: IO[str]) -> None:
    print(json.dumps({"source": workload.source, **workload.summary()}), file=out)


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m loadgen.workload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic agentic workload")
    _add_generator_flags(gen)
    gen.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    for name, text in (("convert", "rewrite a file in our format"), ("check", "read a file")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("file", type=Path)
        cmd.add_argument("--format", choices=_FORMATS, default="auto")
        cmd.add_argument("--block-tokens", type=int, help="tokens per hash_ids block")
        if name == "convert":
            cmd.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            changes: dict[str, Any] = {
                k: v for k in GeneratorParams.names() if (v := getattr(args, k)) is not None
            }
            workload = generate(GeneratorParams().with_(**changes))
            _write(workload, args.output)
            _print_summary(workload, sys.stderr)
            return 0
        workload = load_workload(args.file, args.format, block_tokens=args.block_tokens)
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "convert":
        _write(workload, args.output)
        _print_summary(workload, sys.stderr)
    else:
        _print_summary(workload, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
