"""The workload format: conversations and agent trees, one session per JSONL line.

A workload is a set of session *templates*. Each line is a ``SessionSpec``: an id and its turns.
A turn gives its new input (``messages``, or ``input_tokens`` for a synthetic prompt, optionally
built from Mooncake-style ``hash_ids`` blocks), its output length, a think time before it, and the
children it declares: ``forks`` (FORK children, which start from a copy of this session's history)
and ``spawns`` (SPAWN sub-agents, which start empty). Children are sessions of their own, on their
own lines, referenced by id. Children start when the declaring turn completes. A branch may be
joined: the parent's turn ``join_at`` waits until every child of the branch has finished (by
default the next turn); a ``background`` branch is never waited for. Sessions nobody references
are the roots, which the replayer starts.

An optional first line ``{"format": "credit-router-workload/1", …}`` is a header (``Header``);
without one the file is recognised by its first session. Every line is decoded into msgspec
Structs that forbid unknown fields, so a typo is an error naming the line and the field
(``WorkloadError``), and ``compile_workload`` checks the tree: children exist, a FORK child has
exactly one parent, no cycles, joins point at later turns.

``docs/WORKLOADS.md`` is the reference of this format, with examples.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, Final

import msgspec

from protocol.messages import BranchMode

__all__ = [
    "FORMAT",
    "Branch",
    "BranchPlan",
    "Header",
    "PrefixStats",
    "Recorded",
    "SessionSpec",
    "TurnSpec",
    "Workload",
    "WorkloadError",
    "compile_workload",
    "dump_workload",
    "hash_ids_problem",
    "prefix_stats",
    "read_jsonl",
    "read_workload",
]

FORMAT: Final = "credit-router-workload/1"

_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
_Seconds = Annotated[float, msgspec.Meta(ge=0.0)]
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class WorkloadError(ValueError):
    """A workload that cannot be replayed; the message names the file, line and field.

    Attributes:
        path: the file, if known.
        line: the 1-based line number, if known.
        field: the offending field (``turns[2].input_tokens``), if known.
        problem: what is wrong with it.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.problem = problem
        where = ":".join(str(p) for p in (path, line) if p is not None)
        parts = [p for p in (where and f"{where}:", field and f"{field}:", problem) if p]
        super().__init__(" ".join(parts))


class Branch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Children declared by one turn, started together when the turn completes."""

    children: Annotated[list[_Id], msgspec.Meta(min_length=1)]
    """Ids of the child sessions (each on its own line)."""
    join_at: _NonNeg | None = None
    """The parent's turn that waits for all of them (default: the next turn, if any)."""
    background: bool = False
    """Never waited for (the parent goes on; ``join_at`` must not be given)."""


class Recorded(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """What a trace recorded about a request, kept for comparison (copied into its record).

    Not used to pace the replay: the turn's ``delay_s``/``offset_s`` do that.
    """

    t_s: float | None = None
    """When the request started, in seconds from its trace's start."""
    think_time_s: float | None = None
    """The client's idle time before it, as recorded."""
    api_time_s: float | None = None
    """The server's time for it, as recorded (request start to last byte)."""
    ttft_s: float | None = None
    """Its time to first token, as recorded (streaming requests)."""


class TurnSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One turn: what it sends, when, and the children it declares."""

    messages: list[dict[str, Any]] | None = None
    """The turn's new messages, OpenAI chat format (the history is implied)."""
    input_tokens: _NonNeg | None = None
    """Or: a synthetic user message of this many tokens."""
    hash_ids: list[int] | None = None
    """With ``input_tokens``: the prompt is made of these shared blocks (Mooncake)."""
    output_tokens: _NonNeg | None = None
    """Tokens to generate (``max_tokens``)."""
    model: str | None = None
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] | None = None
    """Merged into the request body (``temperature``, ``ignore_eos``…)."""
    delay_s: _Seconds = 0.0
    """Think time before this turn: after the previous turn (and the joins) completed."""
    delay_sigma: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] | None = None
    """If set, the think time is drawn per session from a lognormal with median ``delay_s``."""
    delay_min_s: _Seconds | None = None
    delay_max_s: _Seconds | None = None
    offset_s: _Seconds | None = None
    """Not before this long after the session's first turn was issued (trace timing)."""
    cancel_after_s: _Seconds | None = None
    """The worker aborts the request this long after it starts (a client disconnect)."""
    forks: list[_Id | Branch] = []
    """FORK children: a bare id, or a ``Branch``."""
    spawns: list[_Id | Branch] = []
    """SPAWN children: a bare id, or a ``Branch``."""
    recorded: Recorded | None = None
    """A trace's own measurements of this request (for comparison in the records)."""

    def think_time(self, rng: random.Random) -> float:
        """This turn's think time for one session instance."""
        if self.delay_sigma is None or self.delay_s <= 0:
            return self.delay_s
        value = self.delay_s * math.exp(rng.gauss(0.0, self.delay_sigma))
        if self.delay_min_s is not None:
            value = max(value, self.delay_min_s)
        if self.delay_max_s is not None:
            value = min(value, self.delay_max_s)
        return value


class SessionSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One session template (a line of the file)."""

    id: _Id
    turns: list[TurnSpec]
    start_s: _Seconds | None = None
    """Roots only: when to start it, in seconds from the run's start (timestamp replay)."""
    subagent_type: str | None = None
    """SPAWN children only: the sub-agent's class (e.g. ``Explore``)."""
    pre_spawns: list[_Id] = []
    """SPAWN children started with this session, before its first turn (background)."""
    orchestrator: bool = False
    """Sends no requests: its turns only pace its SPAWN branches (think times and joins)."""
    allow_migration: bool = False
    """If its worker is lost, may its next turn run elsewhere (``Credit.allow_migration``)."""


class Header(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """The optional first line."""

    format: str
    """``credit-router-workload/1``."""
    description: str = ""
    block_tokens: Annotated[int, msgspec.Meta(ge=1)] = 512
    """Tokens per ``hash_ids`` block."""


@dataclass(frozen=True)
class BranchPlan:
    """A branch as the replayer runs it."""

    mode: BranchMode
    children: tuple[str, ...]
    join_at: int | None
    """The declaring session's turn that waits for these children (``None``: nobody waits)."""


@dataclass(frozen=True)
class PrefixStats:
    """The prefix structure of a file's ``hash_ids`` (what ``check`` prints).

    Attributes:
        requests: prompts that have ``hash_ids``.
        blocks: block references over all of them.
        distinct_blocks: distinct block ids.
        shared_blocks: references whose block *and every block before it in the prompt* an
            earlier prompt already had: what an unbounded prefix cache would serve.
    """

    requests: int
    blocks: int
    distinct_blocks: int
    shared_blocks: int

    @property
    def shared_prefix_ratio(self) -> float:
        """``shared_blocks / blocks`` (0 when there are none)."""
        return self.shared_blocks / self.blocks if self.blocks else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """For JSON output."""
        return {
            "requests": self.requests,
            "blocks": self.blocks,
            "distinct_blocks": self.distinct_blocks,
            "shared_prefix_blocks": self.shared_blocks,
            "shared_prefix_ratio": round(self.shared_prefix_ratio, 4),
        }


def prefix_stats(prompts: Iterable[list[int]]) -> PrefixStats | None:
    """The prefix structure of these prompts' ``hash_ids``, in order (``None`` if none has any).

    A block counts as shared when an earlier prompt began with the same ids up to and including
    it (a prefix cache matches whole prefixes, not loose blocks).
    """
    seen: set[tuple[int, ...]] = set()
    distinct: set[int] = set()
    requests = blocks = shared = 0
    for ids in prompts:
        if not ids:
            continue
        requests += 1
        blocks += len(ids)
        distinct.update(ids)
        matching = True
        for n in range(1, len(ids) + 1):
            key = tuple(ids[:n])
            if matching and key in seen:
                shared += 1
            else:
                matching = False
                seen.add(key)
    if not requests:
        return None
    return PrefixStats(requests, blocks, len(distinct), shared)


def hash_ids_problem(tokens: int, ids: int, block_tokens: int) -> tuple[bool, str] | None:
    """Whether ``ids`` blocks of ``block_tokens`` fit a prompt of ``tokens``, as AIPerf checks.

    Every block but the last is whole, the last holds the rest: ``tokens - (ids - 1) *
    block_tokens`` must be in ``(0, block_tokens]``. Too many ids (the last block would be
    empty) is an error in AIPerf's prompt synthesis, and so here. Too few ids (the blocks cover
    only a prefix) is what AIPerf accepts as a prefix-only prompt, the rest unshared: a warning.

    Returns:
        ``None`` if they fit, else ``(is_error, problem)``.
    """
    if not ids:
        return None
    last = tokens - (ids - 1) * block_tokens
    if last <= 0:
        return True, (
            f"{ids} hash_ids of {block_tokens} tokens need more than "
            f"{(ids - 1) * block_tokens} tokens, the prompt has {tokens} "
            "(wrong block size? give --block-tokens)"
        )
    if last > block_tokens:
        return False, (
            f"{ids} hash_ids of {block_tokens} tokens cover {ids * block_tokens} of the prompt's "
            f"{tokens} tokens; the rest is not shared (wrong block size? give --block-tokens)"
        )
    return None


@dataclass
class Workload:
    """A checked workload, ready to replay (``compile_workload``)."""

    sessions: dict[str, SessionSpec]
    roots: list[str]
    """Sessions no one references, in file order."""
    branches: dict[tuple[str, int], list[BranchPlan]]
    """``(session, turn) -> branches`` the turn starts when it completes."""
    block_tokens: int = 512
    description: str = ""
    source: str = ""
    fork_children: frozenset[str] = field(default_factory=frozenset)
    warnings: list[str] = field(default_factory=list)
    """Problems that do not stop a replay, each naming the file, line and field."""
    prefix: PrefixStats | None = None
    """The prefix structure of the file's ``hash_ids`` (``None``: it has none)."""
    _credits: dict[str, int] = field(default_factory=dict, repr=False)

    def fork_count(self, session: str, turn: int) -> int:
        """How many FORK children ``session``'s turn ``turn`` declares (``Credit.fork_count``)."""
        return sum(
            len(b.children)
            for b in self.branches.get((session, turn), ())
            if b.mode is BranchMode.FORK
        )

    def request_turns(self, session: str) -> int:
        """Turns of ``session`` that send a request (none for an orchestrator)."""
        spec = self.sessions[session]
        return 0 if spec.orchestrator else len(spec.turns)

    def credits_in_tree(self, root: str) -> int:
        """Requests one instance of ``root``'s whole tree sends."""
        cached = self._credits.get(root)
        if cached is None:
            spec = self.sessions[root]
            cached = self.request_turns(root)
            for child in spec.pre_spawns:
                cached += self.credits_in_tree(child)
            for t in range(len(spec.turns)):
                for branch in self.branches.get((root, t), ()):
                    cached += sum(self.credits_in_tree(c) for c in branch.children)
            self._credits[root] = cached
        return cached

    def summary(self) -> dict[str, int]:
        """Counts for reports: sessions, roots, children by mode, turns."""
        forks = sum(
            len(b.children)
            for bs in self.branches.values()
            for b in bs
            if b.mode is BranchMode.FORK
        )
        spawns = sum(
            len(b.children)
            for bs in self.branches.values()
            for b in bs
            if b.mode is BranchMode.SPAWN
        )
        spawns += sum(len(s.pre_spawns) for s in self.sessions.values())
        return {
            "sessions": len(self.sessions),
            "roots": len(self.roots),
            "fork_references": forks,
            "spawn_references": spawns,
            "turns": sum(len(s.turns) for s in self.sessions.values()),
            "credits_per_pass": sum(self.credits_in_tree(r) for r in self.roots),
        }


# ---------------------------------------------------------------------- reading lines

_AT: Final = re.compile(r"^(?P<problem>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN: Final = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`")


def describe(exc: msgspec.MsgspecError) -> tuple[str | None, str]:
    """msgspec's error as ``(field, problem)``: ``("turns[0].input_tokens", "Expected …")``."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    problem = match.group("problem")
    path = (match.group("path") or "").lstrip(".")
    unknown = _UNKNOWN.match(problem)
    if unknown is not None:
        name = unknown.group("name")
        path = f"{path}.{name}" if path else name
        problem = "unknown field (not part of the format)"
    return (path or None), problem


def read_jsonl(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` for every non-blank line (a UTF-8 BOM on line 1 is dropped)."""
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                line = raw.strip()
                if line:
                    yield number, line
    except OSError as exc:
        raise WorkloadError(f"cannot read: {exc.strerror}", path=str(path)) from None


_session_decoder: Final = msgspec.json.Decoder(SessionSpec)
_header_decoder: Final = msgspec.json.Decoder(Header)


def decode_line(decoder: msgspec.json.Decoder[Any], line: bytes, *, path: str, number: int) -> Any:
    """One line through ``decoder``; errors become ``WorkloadError`` naming line and field."""
    try:
        return decoder.decode(line)
    except msgspec.ValidationError as exc:
        name, problem = describe(exc)
        raise WorkloadError(problem, path=path, line=number, field=name) from None
    except msgspec.DecodeError as exc:
        raise WorkloadError(f"not a JSON object: {exc}", path=path, line=number) from None


def read_workload(path: Path, *, block_tokens: int | None = None) -> Workload:
    """Read and check a file in this format (``block_tokens`` overrides the header's)."""
    name = str(path)
    header = Header(format=FORMAT)
    specs: list[tuple[int, SessionSpec]] = []
    first = True
    for number, line in read_jsonl(path):
        is_header = first and b'"format"' in line
        first = False
        if is_header:
            header = decode_line(_header_decoder, line, path=name, number=number)
            if header.format != FORMAT:
                raise WorkloadError(
                    f"unsupported format {header.format!r} (expected {FORMAT!r})",
                    path=name,
                    line=number,
                    field="format",
                )
            continue
        specs.append((number, decode_line(_session_decoder, line, path=name, number=number)))
    return compile_workload(
        specs,
        source=name,
        block_tokens=block_tokens or header.block_tokens,
        description=header.description,
    )


# ---------------------------------------------------------------------- checking


class _Checker:
    """The semantic checks of ``compile_workload``, with line numbers for the errors."""

    def __init__(
        self,
        specs: Iterable[tuple[int, SessionSpec]],
        source: str,
        *,
        block_tokens: int | None,
        names: Mapping[str, str],
    ) -> None:
        self.source = source
        self.block_tokens = block_tokens
        self.names = names
        self.id_name = names.get("id", "id")
        self.lines: dict[str, int] = {}
        self.sessions: dict[str, SessionSpec] = {}
        for number, spec in specs:
            if spec.id in self.sessions:
                self.fail(number, "id", f"duplicate {self.id_name} {spec.id!r}")
            self.lines[spec.id] = number
            self.sessions[spec.id] = spec
        if not self.sessions:
            raise WorkloadError("no sessions", path=source)
        self.branches: dict[tuple[str, int], list[BranchPlan]] = {}
        self.fork_parent: dict[str, str] = {}
        self.referenced: set[str] = set()

    def _field(self, name: str | None) -> str | None:
        """The field as the file's own format names it (dag_jsonl: ``session_id``…)."""
        if name is None:
            return None
        head, sep, rest = name.partition(".")
        base, bracket, index = head.partition("[")
        return self.names.get(base, base) + bracket + index + sep + rest

    def fail(self, line: int | None, name: str | None, problem: str) -> None:
        raise WorkloadError(problem, path=self.source, line=line, field=self._field(name))

    def check(self) -> None:
        for sid, spec in self.sessions.items():
            line = self.lines[sid]
            if not spec.turns:
                self.fail(line, "turns", "a session needs at least one turn")
            for i, turn in enumerate(spec.turns):
                self._turn(sid, spec, i, turn)
            for j, child in enumerate(spec.pre_spawns):
                self._child(sid, f"pre_spawns[{j}]", child, BranchMode.SPAWN)
        for sid, spec in self.sessions.items():
            line = self.lines[sid]
            if spec.subagent_type is not None and sid in self.fork_parent:
                self.fail(line, "subagent_type", "only SPAWN children have a subagent_type")
            if spec.start_s is not None and sid in self.referenced:
                self.fail(line, "start_s", "only roots have a start time")
        self._acyclic()

    def _turn(self, sid: str, spec: SessionSpec, i: int, turn: TurnSpec) -> None:
        self._content(sid, spec, i, turn)
        where = f"turns[{i}]"
        plans = []
        for key, mode in (("forks", BranchMode.FORK), ("spawns", BranchMode.SPAWN)):
            entries = getattr(turn, key)
            bare = [e for e in entries if isinstance(e, str)]
            groups = [e for e in entries if isinstance(e, Branch)]
            if bare:
                groups.insert(0, Branch(children=bare))
            for g, branch in enumerate(groups):
                plans.append(self._branch(sid, spec, i, f"{where}.{key}[{g}]", branch, mode))
        if plans:
            self.branches[(sid, i)] = plans

    def _content(self, sid: str, spec: SessionSpec, i: int, turn: TurnSpec) -> None:
        """What a turn sends: exactly one kind of input (none for an orchestrator)."""
        line = self.lines[sid]
        where = f"turns[{i}]"
        if spec.orchestrator:
            if turn.messages is not None or turn.input_tokens is not None or turn.forks:
                self.fail(line, where, "an orchestrator sends nothing and forks nothing")
        elif (turn.messages is None) == (turn.input_tokens is None):
            self.fail(line, where, "give exactly one of messages and input_tokens")
        if turn.hash_ids is not None and turn.input_tokens is None:
            self.fail(line, f"{where}.hash_ids", "hash_ids need input_tokens")
        if turn.hash_ids and turn.input_tokens is not None and self.block_tokens is not None:
            # Too few ids is this format's documented prefix-only prompt (the generator's shared
            # system prompt): only too many is a problem here. Trace readers, whose ids should
            # cover the whole prompt, warn about too few on their own rows.
            found = hash_ids_problem(turn.input_tokens, len(turn.hash_ids), self.block_tokens)
            if found is not None and found[0]:
                self.fail(line, f"{where}.hash_ids", found[1])
        for k, message in enumerate(turn.messages or ()):
            if not isinstance(message.get("role"), str):
                self.fail(line, f"{where}.messages[{k}]", "a message needs a role")
        low, high = turn.delay_min_s, turn.delay_max_s
        if low is not None and high is not None and low > high:
            self.fail(line, f"{where}.delay_min_s", "delay_min_s exceeds delay_max_s")

    def _branch(
        self, sid: str, spec: SessionSpec, i: int, where: str, branch: Branch, mode: BranchMode
    ) -> BranchPlan:
        line = self.lines[sid]
        if branch.background and branch.join_at is not None:
            self.fail(line, f"{where}.join_at", "a background branch is never joined")
        join = branch.join_at
        if join is not None and not i < join < len(spec.turns):
            self.fail(line, f"{where}.join_at", f"must be a later turn (< {len(spec.turns)})")
        if join is None and not branch.background and i + 1 < len(spec.turns):
            join = i + 1
        if len(set(branch.children)) != len(branch.children):
            self.fail(line, where, "a child is listed twice")
        for child in branch.children:
            self._child(sid, where, child, mode)
        return BranchPlan(mode, tuple(branch.children), join)

    def _child(self, sid: str, where: str, child: str, mode: BranchMode) -> None:
        line = self.lines[sid]
        if child not in self.sessions:
            self.fail(line, where, f"no session with {self.id_name} {child!r}")
        if child == sid:
            self.fail(line, where, "a session cannot be its own child")
        if mode is BranchMode.FORK:
            if self.sessions[sid].orchestrator:
                self.fail(line, where, "an orchestrator has no history to fork")
            if child in self.fork_parent:
                self.fail(line, where, f"FORK child {child!r} already has a parent")
            self.fork_parent[child] = sid
            if self.sessions[child].orchestrator:
                self.fail(line, where, "an orchestrator cannot be a FORK child")
        self.referenced.add(child)

    def _acyclic(self) -> None:
        """No session may (transitively) start itself: the tree would never end."""
        edges: dict[str, set[str]] = {sid: set(s.pre_spawns) for sid, s in self.sessions.items()}
        for (sid, _), plans in self.branches.items():
            for plan in plans:
                edges[sid].update(plan.children)
        state: dict[str, int] = {}
        for start in self.sessions:
            if start in state:
                continue
            stack = [(start, iter(sorted(edges[start])))]
            state[start] = 1
            while stack:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    state[node] = 2
                    stack.pop()
                elif state.get(child) == 1:
                    self.fail(self.lines[child], "id", f"session {child!r} starts itself (a cycle)")
                elif child not in state:
                    state[child] = 1
                    stack.append((child, iter(sorted(edges[child]))))


def compile_workload(
    specs: Iterable[tuple[int, SessionSpec]],
    *,
    source: str = "",
    block_tokens: int = 512,
    description: str = "",
    names: Mapping[str, str] | None = None,
    check_hash_ids: bool = True,
    warnings: Iterable[str] = (),
    prefix: PrefixStats | None = None,
) -> Workload:
    """Check session templates and index them for replay.

    Args:
        specs: ``(line number, session)`` pairs (the number is for error messages; use 0 when
            the sessions did not come from a file).
        source: the file name, for error messages.
        block_tokens: tokens per ``hash_ids`` block.
        description: free text for reports.
        names: field names of the source format, for error messages (``{"id": "session_id"}``).
        check_hash_ids: check every turn's ``hash_ids`` against its ``input_tokens`` and
            ``block_tokens`` (``hash_ids_problem``); a reader that checked its own rows (and
            named them) turns it off.
        warnings: the reader's own warnings, reported first.
        prefix: the source's prefix structure, if the reader measured it on its own rows
            (else it is measured on the turns' ``hash_ids``).

    Raises:
        WorkloadError: the first problem found, naming the line and field.
    """
    checker = _Checker(
        specs,
        source,
        block_tokens=block_tokens if check_hash_ids else None,
        names=names or {},
    )
    checker.check()
    roots = [sid for sid in checker.sessions if sid not in checker.referenced]
    if not roots:
        raise WorkloadError("every session is someone's child: there is no root", path=source)
    return Workload(
        sessions=checker.sessions,
        roots=roots,
        branches=checker.branches,
        block_tokens=block_tokens,
        description=description,
        source=source,
        fork_children=frozenset(checker.fork_parent),
        warnings=list(warnings),
        prefix=prefix
        or prefix_stats(t.hash_ids or [] for s in checker.sessions.values() for t in s.turns),
    )


_encoder: Final = msgspec.json.Encoder()


def dump_workload(workload: Workload, out: IO[bytes]) -> None:
    """Write ``workload`` in this format (a header line, then one session per line)."""
    header = Header(
        format=FORMAT, description=workload.description, block_tokens=workload.block_tokens
    )
    out.write(_encoder.encode(header) + b"\n")
    for spec in workload.sessions.values():
        out.write(_encoder.encode(spec) + b"\n")
