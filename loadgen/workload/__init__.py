"""Workloads: what the replayer sends. One format of our own, two importers, one generator.

* ``model`` — the credit-router workload format (JSONL, one session template per line: turns
  with messages or token counts, think times, FORK and SPAWN children with joins) and the
  checked, indexed ``Workload`` the replayer runs;
* ``mooncake`` — Mooncake-style traces (``session_id``, ``hash_ids``, ``timestamp``);
* ``aiperf`` — AIPerf's ``dag_jsonl`` conversation files;
* ``generator`` — seeded synthetic agentic workloads (``credit-router run``'s built-in one).

``load_workload`` reads any of the three file formats, recognising it from its first line.
Every reader reports a bad file as a ``WorkloadError`` naming the line and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final, Literal

from loadgen.workload.aiperf import read_aiperf_dag
from loadgen.workload.generator import GeneratorParams, generate
from loadgen.workload.model import (
    FORMAT,
    Branch,
    BranchPlan,
    SessionSpec,
    TurnSpec,
    Workload,
    WorkloadError,
    compile_workload,
    dump_workload,
    read_jsonl,
    read_workload,
)
from loadgen.workload.mooncake import read_mooncake

__all__ = [
    "FORMAT",
    "Branch",
    "BranchPlan",
    "FileFormat",
    "GeneratorParams",
    "SessionSpec",
    "TurnSpec",
    "Workload",
    "WorkloadError",
    "compile_workload",
    "detect_format",
    "dump_workload",
    "generate",
    "load_workload",
]

FileFormat = Literal["auto", "credit-router", "aiperf", "mooncake"]
_MOONCAKE_KEYS: Final = frozenset(
    {"input_length", "output_length", "hash_ids", "timestamp", "text_input"}
)


def detect_format(path: Path) -> FileFormat:
    """The format of a workload file, from its first non-blank line.

    Raises:
        WorkloadError: the line is not a JSON object of any known format.
    """
    for number, line in read_jsonl(path):
        try:
            first = json.loads(line)
        except ValueError as exc:
            raise WorkloadError(f"not JSON: {exc}", path=str(path), line=number) from None
        if not isinstance(first, dict):
            raise WorkloadError("not a JSON object", path=str(path), line=number)
        if "format" in first or ("id" in first and "turns" in first):
            return "credit-router"
        if "session_id" in first and ("turns" in first or "orchestrator" in first):
            return "aiperf"
        if _MOONCAKE_KEYS & first.keys():
            return "mooncake"
        raise WorkloadError(
            "cannot tell the format from this line (keys: "
            f"{', '.join(sorted(first)) or 'none'}); give it explicitly",
            path=str(path),
            line=number,
        )
    raise WorkloadError("the file is empty", path=str(path))


def load_workload(
    path: Path, fmt: FileFormat = "auto", *, block_tokens: int | None = None
) -> Workload:
    """Read a workload file of any supported format.

    Args:
        path: the file.
        fmt: its format, or ``auto`` to recognise it.
        block_tokens: tokens per ``hash_ids`` block, overriding the file's (Mooncake: 512).

    Raises:
        WorkloadError: naming the file, line and field of the first problem.
    """
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "mooncake":
        return read_mooncake(path, block_tokens=block_tokens or 512)
    workload = read_aiperf_dag(path) if fmt == "aiperf" else read_workload(path)
    if block_tokens is not None:
        workload.block_tokens = block_tokens
    return workload
