"""Frozen copy of the wire messages of protocol version 1 (as of the first release).

Never edit this file: it is what a version-1 peer has compiled in. ``test_compat.py`` checks that
the current ``protocol.messages`` can still talk to it (old reads new, new reads old) and that
every message of it still exists with the same tag, field names, order, types and defaults.
Docstrings are left out; ``protocol/messages.py`` and ``docs/PROTOCOL.md`` explain the fields.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

MAX_BATCH = 4_096
Id = Annotated[str, msgspec.Meta(max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4_096)]
Blob = Annotated[bytes, msgspec.Meta(max_length=1 << 20)]
IdList = Annotated[list[int], msgspec.Meta(max_length=65_536)]


class BranchMode(enum.StrEnum):
    FORK = "fork"
    SPAWN = "spawn"


class Status(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"
    REJECTED = "rejected"


class Msg(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag_field="op"):
    pass


class Credit(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    id: int
    x_correlation_id: Id
    turn_index: int = 0
    num_turns: int = 1
    conversation_id: Id = ""
    phase: Id = "profiling"
    parent_correlation_id: Id | None = None
    root_correlation_id: Id | None = None
    branch_mode: BranchMode | None = None
    fork_count: int = 0
    agent_depth: int = 0
    subagent_type: Id | None = None
    allow_migration: bool = False
    cancel_after_s: float | None = None
    payload: Blob = b""


class ProducerHello(Msg, frozen=True, kw_only=True, tag="phello"):
    producer: Id
    protocol_version: int
    incarnation: Id = ""


class Submit(Msg, frozen=True, kw_only=True, tag="submit"):
    credit: Credit


class SubmitBatch(Msg, frozen=True, kw_only=True, tag="submitb"):
    credits: Annotated[list[Credit], msgspec.Meta(max_length=MAX_BATCH)]


class CancelCredits(Msg, frozen=True, kw_only=True, tag="pcancel"):
    credit_ids: IdList


class EndSession(Msg, frozen=True, kw_only=True, tag="endsess"):
    x_correlation_id: Id
    reason: Text = ""


class ReleaseReservation(Msg, frozen=True, kw_only=True, tag="release"):
    x_correlation_id: Id
    count: int = 1


class Heartbeat(Msg, frozen=True, kw_only=True, tag="hb"):
    sent_at_s: float = 0.0


class Refusal(Msg, frozen=True, kw_only=True, tag="refusal"):
    reason: Text
    router_version: int
    peer_version: int


class ErrorReport(Msg, frozen=True, kw_only=True, tag="error"):
    code: Text
    message: Text


class ProducerWelcome(Msg, frozen=True, kw_only=True, tag="pwelcome"):
    router_incarnation: Id
    protocol_version: int
    heartbeat_interval_s: float
    max_batch: int


class Outcome(Msg, frozen=True, kw_only=True, tag="outcome"):
    credit_id: int
    status: Status
    reason: Text = ""
    worker: Id = ""
    submit_to_dispatch_s: float | None = None
    dispatch_to_outcome_s: float | None = None
    ttft_s: float | None = None
    subagent_type: Id | None = None
    result: Blob = b""


class OutcomeBatch(Msg, frozen=True, kw_only=True, tag="outcomeb"):
    outcomes: Annotated[list[Outcome], msgspec.Meta(max_length=MAX_BATCH)]


class ProducerFirstToken(Msg, frozen=True, kw_only=True, tag="pft"):
    credit_id: int
    ttft_s: float


class Hello(Msg, frozen=True, kw_only=True, tag="hello"):
    name: Id
    incarnation: Id
    protocol_version: int
    capacity: int
    labels: Annotated[dict[Id, Text], msgspec.Meta(max_length=64)] = {}
    in_flight: Annotated[dict[Id, IdList], msgspec.Meta(max_length=1_024)] = {}


class Completion(Msg, frozen=True, kw_only=True, tag="done"):
    seq: int
    producer: Id
    credit_id: int
    status: Status
    reason: Text = ""
    ttft_s: float | None = None
    duration_s: float | None = None
    session_ended: bool = False
    result: Blob = b""


class CompletionBatch(Msg, frozen=True, kw_only=True, tag="doneb"):
    completions: Annotated[list[Completion], msgspec.Meta(max_length=MAX_BATCH)]


class Recovered(Msg, frozen=True, kw_only=True, tag="recovered"):
    router_incarnation: Id
    completions: Annotated[list[Completion], msgspec.Meta(max_length=MAX_BATCH)]


class FirstToken(Msg, frozen=True, kw_only=True, tag="ft"):
    producer: Id
    credit_id: int
    ttft_s: float


class ChildRelease(Msg, frozen=True, kw_only=True, tag="childrel"):
    x_correlation_id: Id


class InFlightReport(Msg, frozen=True, kw_only=True, tag="inflight"):
    credits: Annotated[dict[Id, IdList], msgspec.Meta(max_length=1_024)]


class Draining(Msg, frozen=True, kw_only=True, tag="draining"):
    deadline_s: float


class Goodbye(Msg, frozen=True, kw_only=True, tag="bye"):
    reason: Text = ""


class Welcome(Msg, frozen=True, kw_only=True, tag="welcome"):
    router_incarnation: Id
    protocol_version: int
    heartbeat_interval_s: float
    inflight_report_interval_s: float


class Dispatch(Msg, frozen=True, kw_only=True, tag="credit"):
    producer: Id
    credit: Credit


class DispatchBatch(Msg, frozen=True, kw_only=True, tag="credits"):
    producer: Id
    credits: Annotated[list[Credit], msgspec.Meta(max_length=MAX_BATCH)]


class Cancel(Msg, frozen=True, kw_only=True, tag="cancel"):
    producer: Id
    credit_ids: IdList


class Ack(Msg, frozen=True, kw_only=True, tag="ack"):
    seq: int


class Drain(Msg, frozen=True, kw_only=True, tag="drain"):
    deadline_s: float


ProducerToRouter = (
    ProducerHello
    | Submit
    | SubmitBatch
    | CancelCredits
    | EndSession
    | ReleaseReservation
    | Heartbeat
)
RouterToProducer = (
    ProducerWelcome
    | Refusal
    | Outcome
    | OutcomeBatch
    | ProducerFirstToken
    | ErrorReport
    | Heartbeat
)
WorkerToRouter = (
    Hello
    | Heartbeat
    | Completion
    | CompletionBatch
    | Recovered
    | FirstToken
    | ChildRelease
    | InFlightReport
    | Draining
    | Goodbye
)
RouterToWorker = (
    Welcome
    | Refusal
    | Dispatch
    | DispatchBatch
    | Cancel
    | EndSession
    | Ack
    | Drain
    | Heartbeat
    | ErrorReport
)

PROTOCOL_VERSION = 1

UNIONS: dict[str, object] = {
    "producer->router": ProducerToRouter,
    "router->producer": RouterToProducer,
    "worker->router": WorkerToRouter,
    "router->worker": RouterToWorker,
}
"""Each direction's union, keyed like ``protocol.errors.DecodeError.direction``."""
