"""``credit-router workload`` (or ``python -m loadgen.workload``): generate, convert, check.

* ``generate [--sessions N --seed S --PARAM VALUE…] [-o FILE]`` writes a synthetic agentic
  workload in the credit-router format (every ``GeneratorParams`` field is a flag);
* ``convert FILE [--format F] [-o FILE]`` writes a file of any format ``load_workload`` reads
  (Mooncake, AIPerf dag_jsonl / single_turn / multi_turn / random_pool, coding-agent, Bailian)
  in the credit-router format;
* ``check FILE [--format F] [--block-tokens N]`` reads a file and prints what it holds as one
  JSON object (counts, the format and why, the prefix structure of its ``hash_ids``: distinct
  blocks and shared-prefix ratio), then each warning on its own line on stderr; or the first
  error (naming the file, line and field) and exit status 1.
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
    FORMATS,
    GeneratorParams,
    Workload,
    WorkloadError,
    detect,
    dump_workload,
    generate,
    load_workload,
)

__all__ = ["main"]


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


def _block_tokens(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _write(workload: Workload, output: Path | None) -> None:
    if output is None:
        dump_workload(workload, sys.stdout.buffer)
        return
    with output.open("wb") as f:
        dump_workload(workload, f)


def _print_summary(workload: Workload, out: IO[str], fmt: str = "") -> None:
    doc: dict[str, Any] = {"source": workload.source}
    if fmt:
        doc["format"] = fmt
    doc.update(workload.summary())
    doc["block_tokens"] = workload.block_tokens
    if workload.prefix is not None:
        doc["prefix"] = workload.prefix.as_dict()
    doc["warnings"] = len(workload.warnings)
    print(json.dumps(doc), file=out, flush=True)
    for warning in workload.warnings:
        print(f"warning: {warning}", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-commands and their options (also under ``credit-router workload``)."""
    sub = parser.add_subparsers(dest="workload_command", required=True)
    gen = sub.add_parser("generate", help="write a synthetic agentic workload")
    _add_generator_flags(gen)
    gen.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    for name, text in (("convert", "rewrite a file in our format"), ("check", "read a file")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("file", type=Path)
        cmd.add_argument("--format", choices=FORMATS, default="auto")
        cmd.add_argument("--block-tokens", type=_block_tokens, help="tokens per hash_ids block")
        if name == "convert":
            cmd.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")


def main(argv: list[str] | None = None, prog: str = "python -m loadgen.workload") -> int:
    """Run one sub-command; returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the sub-command ``args`` name (parsed by ``add_arguments``'s parser)."""
    fmt = ""
    try:
        if args.workload_command == "generate":
            changes: dict[str, Any] = {
                k: v for k in GeneratorParams.names() if (v := getattr(args, k)) is not None
            }
            workload = generate(GeneratorParams().with_(**changes))
            _write(workload, args.output)
            _print_summary(workload, sys.stderr)
            return 0
        fmt = args.format
        if fmt == "auto":
            found, why = detect(args.file)
            fmt = f"{found} ({why})"
        workload = load_workload(
            args.file, args.format, block_tokens=args.block_tokens, log_warnings=False
        )
    except WorkloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workload_command == "convert":
        _write(workload, args.output)
        _print_summary(workload, sys.stderr)
    else:
        _print_summary(workload, sys.stdout, fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
