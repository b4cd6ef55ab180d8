"""Coverage-guided fuzzing of the four decoders with atheris (libFuzzer), outside pytest.

Run it with ``make fuzz-atheris`` (installs atheris into ``.venv`` on demand; it is not a
project dependency), or by hand::

    .tools/bin/uv pip install --python .venv/bin/python atheris==3.0.0
    .venv/bin/python tests/fuzz/atheris_decoders.py -max_total_time=300 [CORPUS_DIR …]

Any libFuzzer flag works (``-runs=N``, ``-jobs=N``, ``-max_len=N``). Without a corpus
directory, one is made (``$TMPDIR/credit-router-atheris``) and seeded with a valid frame of
every message of every direction, and a dictionary of the tags and of msgpack's headers is
passed to libFuzzer.

The first input byte picks the direction; the rest is the frame. A frame must decode to a
message of that direction, which re-encodes and decodes to the same message, or raise
``DecodeError`` and nothing else. Coverage comes from the Python code (``protocol.codec``'s
error path: the tag lookup and the field naming of ``DecodeError.path``); msgspec itself is C
and not instrumented, so libFuzzer sees its branches only through those. That makes this a
complement to the Hypothesis fuzz (``test_decoders.py``, which knows the message structure),
not a replacement.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]
import msgspec
import msgspec.inspect as mi

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from protocol import codec
    from protocol.errors import DecodeError

from tests.fuzz import wire

DIRECTIONS = list(wire.DIRECTIONS.items())
REASONS = {"malformed", "invalid", "unknown_tag", "too_deep", "too_large"}


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def test_one_input(data: bytes) -> None:
    """The property, for one input (libFuzzer calls this)."""
    if not data:
        return
    name, (_, decode) = DIRECTIONS[data[0] % len(DIRECTIONS)]
    frame = data[1:]
    try:
        msg = decode(frame)
    except DecodeError as err:
        if err.direction != name or err.reason not in REASONS or not err.path.startswith("$"):
            raise AssertionError(f"bad DecodeError: {err!r} {vars(err)}") from None
        return
    if not isinstance(msg, tuple(wire.members(name))):
        raise AssertionError(f"{name} decoded a {type(msg).__name__}")
    again = decode(codec.encode(msg))
    first = msgspec.to_builtins(msg, builtin_types=(bytes,))
    second = msgspec.to_builtins(again, builtin_types=(bytes,))
    if not _same(first, second):
        raise AssertionError(f"re-encoding changed {first!r} into {second!r}")


def _seed(corpus: Path) -> Path:
    """Write one valid frame per message and direction, and a libFuzzer dictionary."""
    corpus.mkdir(parents=True, exist_ok=True)
    tags: set[str] = set()
    for i, (name, _) in enumerate(DIRECTIONS):
        for cls in wire.members(name):
            tags.add(wire.tag_of(cls))
            frame = codec.encode(_example(cls))
            (corpus / f"seed-{name.replace('->', '-')}-{cls.__name__}").write_bytes(
                bytes([i]) + frame
            )
    tokens = [wire.pack(t) for t in sorted(tags)]
    tokens += [bytes([b]) for b in (0x90, 0x91, 0x9A, 0x9F, 0xC0, 0xC2, 0xC3, 0xCB, 0xCF, 0xD3)]
    tokens += [b"\xdc\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xa1\xff"]
    dictionary = corpus.parent / (corpus.name + ".dict")
    dictionary.write_text("".join(f'"{_escape(t)}"\n' for t in tokens))
    return dictionary


def _escape(token: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in token)


def _example(cls: type[msgspec.Struct]) -> msgspec.Struct:
    info = wire.struct_info(cls)
    return cls(**{f.name: _value(f.type) for f in info.fields})


def _value(t: mi.Type) -> object:
    if isinstance(t, mi.UnionType):
        return _value(wire._unwrap(t))
    if isinstance(t, mi.ListType):
        return [_value(t.item_type)]
    if isinstance(t, mi.DictType):
        return {"k": _value(t.value_type)}
    if isinstance(t, mi.StructType):
        return _example(t.cls)
    if isinstance(t, mi.EnumType):
        return next(iter(t.cls))
    simple: dict[type[mi.Type], object] = {
        mi.IntType: 7,
        mi.FloatType: 0.5,
        mi.StrType: "s",
        mi.BytesType: b"b",
    }
    return simple.get(type(t), True)


def main() -> None:
    args = sys.argv[1:]
    if not any(not a.startswith("-") for a in args):
        corpus = Path(tempfile.gettempdir()) / "credit-router-atheris"
        dictionary = _seed(corpus)
        args = [*args, f"-dict={dictionary}", str(corpus)]
    atheris.Setup([sys.argv[0], *args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
