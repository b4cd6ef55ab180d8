"""Golden bytes: the exact encoding of every message, pinned, and the doc's examples checked.

A failure here means the bytes on the wire changed. That is allowed only by the evolution rules
(docs/PROTOCOL.md §9: a defaulted field appended at the end, checked by test_compat.py too) or
with a new PROTOCOL_VERSION; update the hex by hand only after deciding which it is.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from wire_strategies import DIRECTIONS, directions_of, every_message_class

from protocol import (
    Ack,
    BranchMode,
    Cancel,
    CancelCredits,
    ChildRelease,
    Completion,
    CompletionBatch,
    Credit,
    Dispatch,
    DispatchBatch,
    Drain,
    Draining,
    EndSession,
    ErrorReport,
    FirstToken,
    Goodbye,
    Heartbeat,
    Hello,
    InFlightReport,
    Msg,
    Outcome,
    OutcomeBatch,
    ProducerAdopted,
    ProducerFirstToken,
    ProducerHello,
    ProducerWelcome,
    Recovered,
    Refusal,
    ReleaseReservation,
    Status,
    Submit,
    SubmitBatch,
    Welcome,
)
from protocol.codec import encode
from protocol.errors import DecodeError

_CREDIT_FULL = Credit(
    id=2**40 + 7,
    x_correlation_id="sess-ü-01",
    turn_index=3,
    num_turns=4,
    conversation_id="conv-9",
    phase="warmup",
    parent_correlation_id="sess-root",
    root_correlation_id="sess-root",
    branch_mode=BranchMode.FORK,
    fork_count=2,
    agent_depth=2,
    subagent_type=None,
    allow_migration=True,
    cancel_after_s=0.75,
    payload=b"\x00\xffprompt",
)
_CREDIT_MIN = Credit(id=1, x_correlation_id="s1")
_CREDIT_SPAWN = Credit(
    id=300,
    x_correlation_id="sess-sub",
    parent_correlation_id="sess-root",
    branch_mode=BranchMode.SPAWN,
    agent_depth=1,
    subagent_type="Explore",
)

GOLDEN: list[tuple[Msg, str]] = [
    (
        ProducerHello(producer="bench", protocol_version=1, incarnation="i-1"),
        "95a67068656c6c6fa562656e636801a3692d3190",
    ),
    (
        Submit(credit=_CREDIT_FULL),
        (
            "93a67375626d69749fcf0000010000000007aa736573732dc3bc2d30310304a6"
            "636f6e762d39a67761726d7570a9736573732d726f6f74a9736573732d726f6f"
            "74a4666f726b0202c0c3cb3fe8000000000000c40800ff70726f6d7074a0"
        ),
    ),
    (
        SubmitBatch(credits=[_CREDIT_MIN, _CREDIT_SPAWN]),
        (
            "93a77375626d697462929f01a273310001a0a970726f66696c696e67c0c0c000"
            "00c0c2c0c4009fcd012ca8736573732d7375620001a0a970726f66696c696e67"
            "a9736573732d726f6f74c0a5737061776e0001a74578706c6f7265c2c0c400a0"
        ),
    ),
    (CancelCredits(credit_ids=[1, 300, 70000]), "92a77063616e63656c9301cd012cce00011170"),
    (
        EndSession(x_correlation_id="s1", reason="done early"),
        "94a7656e6473657373a27331aa646f6e65206561726c79a0",
    ),
    (
        ReleaseReservation(x_correlation_id="sess-root", count=2),
        "93a772656c65617365a9736573732d726f6f7402",
    ),
    (Heartbeat(sent_at_s=1234.5), "92a26862cb40934a0000000000"),
    (
        Refusal(reason="version", router_version=1, peer_version=7),
        "95a77265667573616ca776657273696f6e0107a0",
    ),
    (
        ErrorReport(code="invalid_message", message="at $.op"),
        "93a56572726f72af696e76616c69645f6d657373616765a7617420242e6f70",
    ),
    (
        ProducerWelcome(
            router_incarnation="r1", protocol_version=1, heartbeat_interval_s=1.0, max_batch=512
        ),
        "95a87077656c636f6d65a2723101cb3ff0000000000000cd0200",
    ),
    (
        Outcome(
            credit_id=300,
            status=Status.COMPLETED,
            worker="w1",
            submit_to_dispatch_s=0.001,
            dispatch_to_outcome_s=2.0,
            ttft_s=0.5,
            subagent_type="Explore",
            result=b"\x81\xa3osl\x10",
        ),
        (
            "9aa76f7574636f6d65cd012ca9636f6d706c65746564a0a27731cb3f50624dd2"
            "f1a9fccb4000000000000000cb3fe0000000000000a74578706c6f7265c40681"
            "a36f736c10"
        ),
    ),
    (
        OutcomeBatch(
            outcomes=[
                Outcome(credit_id=1, status=Status.REJECTED, reason="queue_full"),
                Outcome(credit_id=2, status=Status.LOST, reason="orphaned", worker="w2"),
            ]
        ),
        (
            "92a86f7574636f6d6562929aa76f7574636f6d6501a872656a6563746564aa71"
            "756575655f66756c6ca0c0c0c0c0c4009aa76f7574636f6d6502a46c6f7374a8"
            "6f727068616e6564a27732c0c0c0c0c400"
        ),
    ),
    (ProducerFirstToken(credit_id=300, ttft_s=0.5), "93a3706674cd012ccb3fe0000000000000"),
    (ProducerAdopted(credit_ids=[300, 301]), "92a87061646f7074656492cd012ccd012d"),
    (
        Hello(
            name="w1",
            incarnation="inc-1",
            protocol_version=1,
            capacity=256,
            labels={"host": "h1", "model": "llama"},
            in_flight={"bench": [1, 2]},
        ),
        (
            "97a568656c6c6fa27731a5696e632d3101cd010082a4686f7374a26831a56d6f"
            "64656ca56c6c616d6181a562656e6368920102"
        ),
    ),
    (
        Completion(
            seq=1,
            producer="bench",
            credit_id=300,
            status=Status.FAILED,
            reason="http_500",
            ttft_s=None,
            duration_s=0.125,
            session_ended=True,
            result=b"",
        ),
        (
            "9aa4646f6e6501a562656e6368cd012ca66661696c6564a8687474705f353030"
            "c0cb3fc0000000000000c3c400"
        ),
    ),
    (
        CompletionBatch(
            completions=[
                Completion(
                    seq=2, producer="bench", credit_id=1, status=Status.COMPLETED, ttft_s=0.25
                ),
                Completion(
                    seq=3,
                    producer="bench",
                    credit_id=2,
                    status=Status.CANCELLED,
                    reason="cancelled",
                ),
            ]
        ),
        (
            "92a5646f6e6562929aa4646f6e6502a562656e636801a9636f6d706c65746564"
            "a0cb3fd0000000000000c0c2c4009aa4646f6e6503a562656e636802a963616e"
            "63656c6c6564a963616e63656c6c6564c0c0c2c400"
        ),
    ),
    (
        Recovered(
            router_incarnation="r1",
            completions=[Completion(seq=1, producer="bench", credit_id=7, status=Status.COMPLETED)],
        ),
        "93a97265636f7665726564a27231919aa4646f6e6501a562656e636807a9636f6d706c65746564a0c0c0c2c400",
    ),
    (
        FirstToken(producer="bench", credit_id=1, ttft_s=0.25),
        "94a26674a562656e636801cb3fd0000000000000",
    ),
    (ChildRelease(x_correlation_id="sess-child"), "93a86368696c6472656caa736573732d6368696c64a0"),
    (
        InFlightReport(credits={"bench": [1, 2], "other": []}),
        "92a8696e666c6967687482a562656e6368920102a56f7468657290",
    ),
    (Draining(deadline_s=10.0), "92a8647261696e696e67cb4024000000000000"),
    (Goodbye(reason=""), "92a3627965a0"),
    (
        Welcome(
            router_incarnation="r1",
            protocol_version=1,
            heartbeat_interval_s=0.5,
            inflight_report_interval_s=5.0,
        ),
        "96a777656c636f6d65a2723101cb3fe0000000000000cb4014000000000000c2",
    ),
    (
        Dispatch(producer="bench", credit=_CREDIT_FULL),
        (
            "93a6637265646974a562656e63689fcf0000010000000007aa736573732dc3bc"
            "2d30310304a6636f6e762d39a67761726d7570a9736573732d726f6f74a97365"
            "73732d726f6f74a4666f726b0202c0c3cb3fe8000000000000c40800ff70726f"
            "6d7074"
        ),
    ),
    (
        DispatchBatch(producer="bench", credits=[_CREDIT_MIN]),
        (
            "93a763726564697473a562656e6368919f01a273310001a0a970726f66696c69"
            "6e67c0c0c00000c0c2c0c400"
        ),
    ),
    (Cancel(producer="bench", credit_ids=[300]), "94a663616e63656ca562656e636891cd012cc2"),
    (Ack(seq=2**32), "92a361636bcf0000000100000000"),
    (Drain(deadline_s=60.0), "92a5647261696ecb404e000000000000"),
]


def _id(msg: Msg) -> str:
    return type(msg).__name__


CASES = [(msg, golden, d) for msg, golden in GOLDEN for d in directions_of(type(msg))]
"""Every golden message with every direction that carries it (``Heartbeat`` has four)."""


def test_every_message_has_a_golden() -> None:
    names = sorted(type(msg).__name__ for msg, _ in GOLDEN)
    assert names == sorted(cls.__name__ for cls in every_message_class())


@pytest.mark.parametrize(("msg", "golden"), GOLDEN, ids=[_id(msg) for msg, _ in GOLDEN])
def test_encode_gives_the_golden_bytes(msg: Msg, golden: str) -> None:
    assert encode(msg).hex() == golden


@pytest.mark.parametrize(
    ("msg", "golden", "direction"), CASES, ids=[f"{_id(msg)}-{d}" for msg, _, d in CASES]
)
def test_golden_bytes_decode_to_the_instance(msg: Msg, golden: str, direction: str) -> None:
    decode = DIRECTIONS[direction][1]
    assert decode(bytes.fromhex(golden)) == msg


# ------------------------------------------------------------------------- docs/PROTOCOL.md

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "PROTOCOL.md"
_HEX_BLOCK = re.compile(r"^```hex ([^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _doc_examples() -> list[tuple[list[str], bytes]]:
    """(directions named in the info string, payload) for every ```` ```hex ```` block."""
    text = DOC.read_text(encoding="utf-8")
    return [
        (info.split(), bytes.fromhex("".join(body.split())))
        for info, body in _HEX_BLOCK.findall(text)
    ]


DOC_EXAMPLES = _doc_examples()


def test_doc_has_a_hex_example_of_every_message() -> None:
    documented = set()
    for directions, payload in DOC_EXAMPLES:
        documented.add(type(DIRECTIONS[directions[0]][1](payload)))
    missing = {c.__name__ for c in every_message_class()} - {c.__name__ for c in documented}
    assert not missing, f"docs/PROTOCOL.md has no hex example of {sorted(missing)}"


@pytest.mark.parametrize(("directions", "payload"), DOC_EXAMPLES)
def test_doc_hex_example_decodes_in_exactly_its_documented_directions(
    directions: list[str], payload: bytes
) -> None:
    assert directions, "a ```hex block must name its directions"
    decoded = [DIRECTIONS[d][1](payload) for d in directions]
    assert all(msg == decoded[0] for msg in decoded)
    assert encode(decoded[0]) == payload  # the example is canonical: what the router writes
    assert sorted(directions) == sorted(directions_of(type(decoded[0])))
    for other in set(DIRECTIONS) - set(directions):
        with pytest.raises(DecodeError) as info:
            DIRECTIONS[other][1](payload)
        assert info.value.reason == "unknown_tag"


def _generator() -> ModuleType:
    path = ROOT / "scripts" / "gen_protocol_tables.py"
    spec = importlib.util.spec_from_file_location("gen_protocol_tables", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_doc_reference_and_examples_are_up_to_date() -> None:
    doc = DOC.read_text(encoding="utf-8")
    assert _generator().updated(doc) == doc, (
        "docs/PROTOCOL.md is stale: run `.venv/bin/python scripts/gen_protocol_tables.py`"
    )
