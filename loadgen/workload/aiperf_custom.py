"""AIPerf's custom dataset files ``single_turn``, ``multi_turn`` and ``random_pool``.

The spec: AIPerf's ``SingleTurn``, ``MultiTurn`` and ``RandomPool`` models
(https://github.com/ai-dynamo/aiperf, ``src/aiperf/dataset/loader/models.py``) and their
loaders (``single_turn.py``, ``multi_turn.py``, ``random_pool.py``). One JSON object per line;
unknown keys are errors naming the line and the field, as in AIPerf.

* A turn's content is ``text`` or ``texts`` (a list of strings, or of ``{"name", "contents"}``
  objects) and ``image`` / ``images`` (URLs or data URLs, sent as ``image_url`` parts); it is
  one message of ``role`` (default ``user``). ``audio``/``audios``/``video``/``videos`` are not
  supported (an error naming the field). ``output_length`` is ``max_tokens``, ``extra`` is
  merged into the request body, ``delay`` (ms) is the think time before the turn, and
  ``timestamp`` (ms) the trace time of the turn.
* ``single_turn``: each line is one self-contained request. Lines with the same ``session_id``
  are sent one after the other, **without** history (each is its own session, started by the
  previous one's end: ``traces.chain_sessions``); a line's ``timestamp`` starts its session
  (relative to the earliest), or for a later line of a ``session_id``, is the wait after the
  previous line's ``timestamp``.
* ``multi_turn``: each line is a conversation (``session_id``, ``turns``) whose turns build a
  history with the live answers (AIPerf's default ``deltas_without_responses``); the first
  turn's ``timestamp`` starts it, a later one is the turn's offset from the first.
* ``random_pool``: each line is a single-turn request (no sessions, no timing). AIPerf draws
  them at random; here they are replayed in file order, cycling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from loadgen.workload.model import (
    SessionSpec,
    TurnSpec,
    Workload,
    WorkloadError,
    compile_workload,
    decode_line,
    read_jsonl,
)
from loadgen.workload.traces import chain_sessions

__all__ = ["CustomKind", "read_aiperf_custom"]

CustomKind = Literal["single_turn", "multi_turn", "random_pool"]
_Ms = Annotated[float, msgspec.Meta(ge=0.0)]


class NamedText(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A named list of texts (AIPerf's ``Text``)."""

    name: str = "text"
    contents: list[str] = []


class NamedMedia(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A named list of media (AIPerf's ``Image``, ``Audio``, ``Video``)."""

    name: str = ""
    contents: list[str] = []
    uuids: list[str] | None = None


class _Content(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    text: str | None = None
    texts: list[str | NamedText] | None = None
    image: str | None = None
    images: list[str | NamedMedia] | None = None
    image_uuids: list[str] | None = None
    audio: str | None = None
    audios: list[str | NamedMedia] | None = None
    video: str | None = None
    videos: list[str | NamedMedia] | None = None


class SingleTurn(_Content, forbid_unknown_fields=True, kw_only=True):
    """A line of ``single_turn``, and a turn of ``multi_turn``."""

    type: Literal["single_turn"] | None = None
    timestamp: _Ms | None = None
    delay: _Ms | None = None
    role: str | None = None
    session_id: str | None = None
    output_length: Annotated[int, msgspec.Meta(ge=1)] | None = None
    extra: dict[str, Any] | None = None


class MultiTurn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A line of ``multi_turn``."""

    type: Literal["multi_turn"] | None = None
    session_id: str | None = None
    turns: Annotated[list[SingleTurn], msgspec.Meta(min_length=1)]


class RandomPool(_Content, forbid_unknown_fields=True, kw_only=True):
    """A line of ``random_pool``."""

    type: Literal["random_pool"] | None = None


_decoders: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "single_turn": msgspec.json.Decoder(SingleTurn),
    "multi_turn": msgspec.json.Decoder(MultiTurn),
    "random_pool": msgspec.json.Decoder(RandomPool),
}


def _message(content: _Content, role: str | None, fail: Any, where: str) -> dict[str, Any]:
    """One message of the turn's text and images (AIPerf's rules on what goes together)."""
    for single, many in (("text", "texts"), ("image", "images"), ("audio", "audios")):
        if getattr(content, single) and getattr(content, many):
            fail(f"{where}{many}", f"{single} and {many} cannot be set together")
    for name in ("audio", "audios", "video", "videos"):
        if getattr(content, name):
            fail(f"{where}{name}", "only text and images are supported")
    texts: list[str] = [content.text] if content.text else []
    for item in content.texts or ():
        texts.extend([item] if isinstance(item, str) else item.contents)
    images: list[str] = [content.image] if content.image else []
    for image in content.images or ():
        images.extend([image] if isinstance(image, str) else image.contents)
    if not texts and not images:
        fail(where.rstrip(".") or None, "at least one of text, texts, image, images is needed")
    parts: list[dict[str, Any]] = [{"type": "text", "text": t} for t in texts]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in images]
    body: str | list[dict[str, Any]] = texts[0] if len(parts) == 1 and texts else parts
    return {"role": role or "user", "content": body}


def _turn(row: SingleTurn, fail: Any, where: str = "") -> TurnSpec:
    if row.timestamp and row.delay:
        fail(f"{where}delay", "timestamp and delay cannot be set together")
    return TurnSpec(
        messages=[_message(row, row.role, fail, where)],
        output_tokens=row.output_length,
        extra=row.extra,
        delay_s=(row.delay or 0.0) / 1_000,
    )


class _Builder:
    """The sessions of one file, as its lines come."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.roots: list[tuple[int, SessionSpec]] = []
        self.chains: dict[str, list[tuple[int, SessionSpec, float | None]]] = {}
        self.stamps: list[tuple[SessionSpec, float]] = []

    def add(self, number: int, row: Any) -> None:
        def fail(field: str | None, problem: str) -> None:
            raise WorkloadError(problem, path=self.name, line=number, field=field)

        if isinstance(row, MultiTurn):
            turns = [_turn(t, fail, f"turns[{i}].") for i, t in enumerate(row.turns)]
            first = row.turns[0].timestamp
            for turn, t in zip(turns[1:], row.turns[1:], strict=True):
                if first is not None and t.timestamp is not None:
                    turn.offset_s = max(0.0, t.timestamp - first) / 1_000
            spec = SessionSpec(id=row.session_id or f"line-{number}", turns=turns)
            self.root(number, spec, first)
        elif isinstance(row, SingleTurn):
            spec = SessionSpec(id=f"line-{number}", turns=[_turn(row, fail)])
            if row.session_id is None:
                self.root(number, spec, row.timestamp)
            else:
                self.chains.setdefault(row.session_id, []).append((number, spec, row.timestamp))
        else:
            turn = TurnSpec(messages=[_message(row, None, fail, "")])
            self.root(number, SessionSpec(id=f"line-{number}", turns=[turn]), None)

    def root(self, number: int, spec: SessionSpec, stamp: float | None) -> None:
        self.roots.append((number, spec))
        if stamp is not None:
            self.stamps.append((spec, stamp))

    def sessions(self) -> list[tuple[int, SessionSpec]]:
        """Every session: single_turn lines of one ``session_id`` chained, start times set."""
        for sid, chain in self.chains.items():
            parts = [spec for _, spec, _ in chain]
            parts[0].id = sid
            for k, (_, spec, stamp) in enumerate(chain[1:], start=1):
                spec.id = f"{sid}#{k}"
                before = chain[k - 1][2]
                if stamp is not None and before is not None:
                    spec.turns[0].delay_s = max(0.0, stamp - before) / 1_000
            chain_sessions(parts)
            self.roots.extend((number, spec) for number, spec, _ in chain)
            if chain[0][2] is not None:
                self.stamps.append((parts[0], chain[0][2]))
        origin = min((t for _, t in self.stamps), default=0.0)
        for spec, stamp in self.stamps:
            spec.start_s = (stamp - origin) / 1_000
        return sorted(self.roots, key=lambda pair: pair[0])


def read_aiperf_custom(path: Path, kind: CustomKind) -> Workload:
    """Read an AIPerf ``single_turn``, ``multi_turn`` or ``random_pool`` file.

    Raises:
        WorkloadError: naming the line and the field of the first problem.
    """
    name = str(path)
    decoder = _decoders[kind]
    builder = _Builder(name)
    for number, line in read_jsonl(path):
        builder.add(number, decode_line(decoder, line, path=name, number=number))
    return compile_workload(
        builder.sessions(), source=name, description=f"AIPerf {kind} {path.name}"
    )
