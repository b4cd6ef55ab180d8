"""Workloads: what the replayer sends. One format of our own, readers of the field's, a generator.

* ``model`` — the credit-router workload format (JSONL, one session template per line: turns
  with messages or token counts, think times, FORK and SPAWN children with joins) and the
  checked, indexed ``Workload`` the replayer runs;
* ``mooncake`` — Mooncake traces as AIPerf's ``mooncake_trace`` reads them;
* ``aiperf`` — AIPerf's ``dag_jsonl`` conversation files; ``aiperf_custom`` — its
  ``single_turn``, ``multi_turn`` and ``random_pool`` files;
* ``coding_agent`` — coding-agent traces (kv-cache-tester) with their sub-agents;
* ``bailian`` — Alibaba Bailian usage traces;
* ``traces`` — what the trace readers share (whole prompts turned into new input per turn);
* ``generator`` — seeded synthetic agentic workloads (``credit-router run``'s built-in one).

``load_workload`` reads any of them, recognising the format from the first JSON object
(``detect``). Every reader reports a bad file as a ``WorkloadError`` naming the file, the line
and the field, and lesser problems as ``Workload.warnings``.
"""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path
from typing import Any, Final, Literal

from loadgen.workload.aiperf import read_aiperf_dag
from loadgen.workload.aiperf_custom import CustomKind, read_aiperf_custom
from loadgen.workload.bailian import read_bailian
from loadgen.workload.coding_agent import read_coding_agent, sniff_coding_agent
from loadgen.workload.generator import GeneratorParams, generate
from loadgen.workload.model import (
    FORMAT,
    Branch,
    BranchPlan,
    PrefixStats,
    Recorded,
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

logger = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "FORMAT",
    "FORMATS",
    "Branch",
    "BranchPlan",
    "FileFormat",
    "GeneratorParams",
    "PrefixStats",
    "Recorded",
    "SessionSpec",
    "TurnSpec",
    "Workload",
    "WorkloadError",
    "compile_workload",
    "detect",
    "detect_format",
    "dump_workload",
    "generate",
    "load_workload",
]

FileFormat = Literal[
    "auto",
    "credit-router",
    "aiperf",
    "mooncake",
    "coding-agent",
    "bailian",
    "single_turn",
    "multi_turn",
    "random_pool",
]
ALIASES: Final[dict[str, FileFormat]] = {
    "dag_jsonl": "aiperf",
    "mooncake_trace": "mooncake",
    "weka_trace": "coding-agent",
    "kv-cache-tester": "coding-agent",
    "bailian_trace": "bailian",
}
"""AIPerf's ``--custom-dataset-type`` names (and the trace's tool's) for our formats."""
FORMATS: Final = (*typing.get_args(FileFormat), *ALIASES)
"""Every name ``--format`` accepts."""

_AIPERF_TYPES: Final[dict[str, FileFormat]] = {
    "mooncake_trace": "mooncake",
    "single_turn": "single_turn",
    "multi_turn": "multi_turn",
    "random_pool": "random_pool",
}
_MOONCAKE_KEYS: Final = frozenset(
    {"input_length", "output_length", "hash_ids", "timestamp", "text_input", "messages", "payload"}
)
_MOONCAKE_INPUTS: Final = frozenset(
    {"input_length", "text_input", "messages", "payload", "hash_ids"}
)
_CONTENT_KEYS: Final = frozenset(
    {"text", "texts", "image", "images", "audio", "audios", "video", "videos"}
)
_TRIED: Final = (
    "tried: credit-router (a `format` header, or `id` with `turns`), an AIPerf `type`, "
    "coding-agent (`requests` with `block_size`), bailian (`chat_id`), AIPerf dag_jsonl "
    "(`session_id` with `turns` of `messages`, or `orchestrator`), AIPerf multi_turn (`turns` "
    "of `text`…), AIPerf single_turn (`text`, `texts`, `image`…), mooncake (`input_length`, "
    "`text_input`, `messages`, `hash_ids`, `timestamp`)"
)


def _detect(first: dict[str, Any]) -> tuple[FileFormat, str] | None:
    """The format a first object belongs to, and the keys that said so."""
    kind = first.get("type")
    if isinstance(kind, str) and kind in _AIPERF_TYPES:
        return _AIPERF_TYPES[kind], f"`type: {kind}`"
    if "format" in first:
        return "credit-router", "a `format` header"
    if "id" in first and "turns" in first:
        return "credit-router", "`id` and `turns`"
    if sniff_coding_agent(first):
        return "coding-agent", "`requests` and `block_size`"
    if "chat_id" in first:
        return "bailian", "`chat_id`"
    if "orchestrator" in first and "session_id" in first:
        return "aiperf", "`session_id` and `orchestrator`"
    turns = first.get("turns")
    if isinstance(turns, list):
        dag = any(isinstance(t, dict) and "messages" in t for t in turns)
        if dag and "session_id" in first:
            return "aiperf", "`session_id` and `turns` with `messages`"
        if not dag:
            return "multi_turn", "`turns` without `messages`"
    if _CONTENT_KEYS & first.keys() and not _MOONCAKE_INPUTS & first.keys():
        return "single_turn", ", ".join(f"`{k}`" for k in sorted(_CONTENT_KEYS & first.keys()))
    if _MOONCAKE_KEYS & first.keys():
        return "mooncake", ", ".join(f"`{k}`" for k in sorted(_MOONCAKE_KEYS & first.keys()))
    return None


def detect(path: Path) -> tuple[FileFormat, str]:
    """The format of a workload file and why: from its first JSON object.

    A directory is a set of coding-agent traces; a file whose first line is not a JSON object
    may be one pretty-printed trace.

    Raises:
        WorkloadError: no known format matches; the message lists what was tried.
    """
    if path.is_dir():
        return "coding-agent", "a directory"
    for number, line in read_jsonl(path):
        try:
            first = json.loads(line)
        except ValueError as exc:
            whole = _whole_object(path)
            if whole is not None and sniff_coding_agent(whole):
                return "coding-agent", "`requests` and `block_size`"
            raise WorkloadError(f"not JSON: {exc}", path=str(path), line=number) from None
        if not isinstance(first, dict):
            raise WorkloadError("not a JSON object", path=str(path), line=number)
        found = _detect(first)
        if found is None:
            raise WorkloadError(
                f"cannot tell the format from this line (keys: "
                f"{', '.join(sorted(first)) or 'none'}); {_TRIED}; give --format",
                path=str(path),
                line=number,
            )
        return found[0], f"{found[1]} on line {number}"
    raise WorkloadError("the file is empty", path=str(path))


def _whole_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def detect_format(path: Path) -> FileFormat:
    """The format of a workload file (``detect`` without the reason)."""
    return detect(path)[0]


def load_workload(
    path: Path, fmt: str = "auto", *, block_tokens: int | None = None, log_warnings: bool = True
) -> Workload:
    """Read a workload file of any supported format.

    Args:
        path: the file (a directory: coding-agent traces).
        fmt: its format (one of ``FORMATS``), or ``auto`` to recognise it (``detect``).
        block_tokens: tokens per ``hash_ids`` block, overriding the file's (Mooncake: 512,
            Bailian: 16, coding-agent: the trace's ``block_size``).
        log_warnings: log how many warnings the file has, and the first (``Workload.warnings``
            has them all).

    Raises:
        WorkloadError: naming the file, line and field of the first problem; when the format
            was recognised, it says which and why.
    """
    name: str = ALIASES.get(fmt, fmt)
    why = ""
    if name == "auto":
        name, why = detect(path)
    elif name not in typing.get_args(FileFormat):
        raise WorkloadError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    try:
        workload = _read(path, name, block_tokens)
    except WorkloadError as exc:
        if not why:
            raise
        raise WorkloadError(
            f"{exc.problem} (read as {name}, from {why}; give --format if that is wrong)",
            path=exc.path,
            line=exc.line,
            field=exc.field,
        ) from None
    if workload.warnings and log_warnings:
        logger.warning(
            "%s: %d warnings, the first: %s", path, len(workload.warnings), workload.warnings[0]
        )
    return workload


def _read(path: Path, fmt: str, block_tokens: int | None) -> Workload:
    if fmt == "mooncake":
        return read_mooncake(path, block_tokens=block_tokens)
    if fmt == "aiperf":
        return read_aiperf_dag(path, block_tokens=block_tokens)
    if fmt == "coding-agent":
        return read_coding_agent(path, block_tokens=block_tokens)
    if fmt == "bailian":
        return read_bailian(path, block_tokens=block_tokens)
    if fmt in ("single_turn", "multi_turn", "random_pool"):
        workload = read_aiperf_custom(path, typing.cast(CustomKind, fmt))
        if block_tokens is not None:
            workload.block_tokens = block_tokens
        return workload
    return read_workload(path, block_tokens=block_tokens)
