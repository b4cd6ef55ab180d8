"""Every message of credit-router's three conversations, as msgspec Structs.

Two ZeroMQ endpoints carry three conversations:

* producer ⇄ router (``ProducerToRouter`` / ``RouterToProducer``): a producer submits credits
  and receives exactly one ``Outcome`` per credit;
* router ⇄ worker (``RouterToWorker`` / ``WorkerToRouter``): the router dispatches credits to
  worker agents, which answer with completions, first-token events and child releases.

Rules for this module (see ``protocol/__init__.py`` for the evolution rules):

* every message is a ``Msg``: frozen, keyword-only, encoded as a msgpack *array* whose first
  element is the tag and whose other elements are the fields in the order written here;
* unknown trailing elements are ignored on decode, so an old peer reads a newer peer's
  messages; a missing trailing element takes its default, so a new peer reads an old one's;
* durations are float seconds and named ``*_s``; no field is ``Any``.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final

import msgspec

__all__ = [
    "ADOPTED_TAG",
    "AFTER_V1",
    "MAX_BATCH",
    "MAX_IDS",
    "Ack",
    "BranchMode",
    "Cancel",
    "CancelCredits",
    "ChildRelease",
    "Completion",
    "CompletionBatch",
    "Credit",
    "Dispatch",
    "DispatchBatch",
    "Drain",
    "Draining",
    "EndSession",
    "ErrorReport",
    "FirstToken",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "InFlightReport",
    "Msg",
    "Outcome",
    "OutcomeBatch",
    "ProducerAdopted",
    "ProducerFirstToken",
    "ProducerHello",
    "ProducerToRouter",
    "ProducerWelcome",
    "Recovered",
    "Refusal",
    "ReleaseReservation",
    "RouterToProducer",
    "RouterToWorker",
    "Status",
    "Submit",
    "SubmitBatch",
    "Welcome",
    "WorkerToRouter",
]


MAX_BATCH: Final = 4_096
"""Longest list of credits, completions or outcomes in one frame."""
MAX_IDS: Final = 65_536
"""Longest list of credit ids in one frame (cancels, in-flight reports)."""

Id = Annotated[str, msgspec.Meta(max_length=256)]
"""A name or id (session, producer, worker, incarnation): at most 256 characters."""
Text = Annotated[str, msgspec.Meta(max_length=4_096)]
"""Free text (reasons, error messages): at most 4096 characters."""
Blob = Annotated[bytes, msgspec.Meta(max_length=1 << 20)]
"""Opaque bytes (payloads, results): at most 1 MiB."""
IdList = Annotated[list[int], msgspec.Meta(max_length=MAX_IDS)]


class BranchMode(enum.StrEnum):
    """How a child session relates to its parent (``docs/ROUTING.md`` §1)."""

    FORK = "fork"
    """Starts from a copy of the parent's history: must run on the parent's worker."""
    SPAWN = "spawn"
    """A sub-agent with empty context: a fresh session that merely knows its parent."""


class Status(enum.StrEnum):
    """The terminal status of a credit. Every credit ends with exactly one."""

    COMPLETED = "completed"
    """The request ran to its end on a worker."""
    FAILED = "failed"
    """The worker tried and failed; ``reason`` says why, in the worker's words."""
    CANCELLED = "cancelled"
    """Cancelled on request (``CancelCredits``/``Cancel``), before or during execution."""
    LOST = "lost"
    """The router lost track of it (``worker_lost``, ``orphaned``): it may or may not have run."""
    REJECTED = "rejected"
    """The router refused it without running it (``queue_full``, ``session_lost``…)."""


class Msg(msgspec.Struct, frozen=True, kw_only=True, array_like=True, tag_field="op"):
    """Base of every wire message (tagged, array-encoded, immutable)."""


# gc=False: a credit holds no reference cycles, and decoding is ~10% faster without tracking.
class Credit(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """The right to send exactly one request: one turn of one session.

    Not a message by itself (no tag): it travels inside ``Submit``/``Dispatch`` and their batches.
    """

    id: int
    """Unique among the producer incarnation's credits in progress; the key is (producer, id)."""
    x_correlation_id: Id
    """The session instance id: the sticky key and the ``X-Correlation-ID`` header."""
    turn_index: int = 0
    """0-based index of this turn within its session."""
    num_turns: int = 1
    """Total number of turns the session will run; ``turn_index == num_turns - 1`` is final."""
    conversation_id: Id = ""
    """The dataset template the session was made from (many sessions may share it)."""
    phase: Id = "profiling"
    """Free-form phase label (``warmup``, ``profiling``…), passed through."""
    parent_correlation_id: Id | None = None
    """The immediate parent's ``x_correlation_id`` for DAG children; ``None`` for roots."""
    root_correlation_id: Id | None = None
    """The tree's root session; ``None`` when equal to ``x_correlation_id``."""
    branch_mode: BranchMode | None = None
    """``fork`` or ``spawn`` for children; ``None`` for roots and pre-session children."""
    fork_count: int = 0
    """How many FORK children this turn declares (one reservation each)."""
    agent_depth: int = 0
    """Depth in the agent tree: 0 for a root."""
    subagent_type: Id | None = None
    """Free-form sub-agent class (e.g. ``"Explore"``); SPAWN children only."""
    allow_migration: bool = False
    """If the session's worker is lost, may the next turn run elsewhere (history is rebuildable)?"""
    cancel_after_s: float | None = None
    """Simulated client disconnect: the worker aborts the request this long after it starts."""
    payload: Blob = b""
    """Opaque to the router: what the worker needs to build the request."""


# --------------------------------------------------------------------------- producer → router


class ProducerHello(Msg, frozen=True, kw_only=True, tag="phello"):
    """First message of a producer connection."""

    producer: Id
    """The producer's name; credit keys are (producer, credit id)."""
    protocol_version: int
    """The sender's ``PROTOCOL_VERSION``; the router refuses any other."""
    incarnation: Id = ""
    """Random per process start, so a restarted producer is told apart from a reconnect."""
    understands: Annotated[list[Id], msgspec.Meta(max_length=32)] = []
    """Tags of the messages added after protocol version 1 that this producer reads (§9 rule
    4: the router sends such a message only to a producer that lists its tag). Currently
    ``padopted`` (``ProducerAdopted``)."""


class Submit(Msg, frozen=True, kw_only=True, tag="submit"):
    """Submit one credit."""

    credit: Credit
    """The credit; its ``id`` must not be one of this producer incarnation's credits in progress."""
    router_incarnation: Id = ""
    """The router incarnation whose welcome this producer is answering. A router of another
    incarnation does not run the frame: it ends each credit ``rejected: stale_incarnation``
    (it never ran; submit it again), so a credit meant for a router that died is never also run
    by its successor while its producer gives up on it. Empty: any router."""


class SubmitBatch(Msg, frozen=True, kw_only=True, tag="submitb"):
    """Submit several credits in one frame (the efficient form)."""

    credits: Annotated[list[Credit], msgspec.Meta(max_length=MAX_BATCH)]
    """At most ``ProducerWelcome.max_batch`` credits, in submission order."""
    router_incarnation: Id = ""
    """As ``Submit.router_incarnation``."""


class CancelCredits(Msg, frozen=True, kw_only=True, tag="pcancel"):
    """Cancel credits: queued ones end at the router, dispatched ones at their worker."""

    credit_ids: IdList
    """Ids of this producer's credits; unknown or finished ones are ignored."""


class EndSession(Msg, frozen=True, kw_only=True, tag="endsess"):
    """The producer ends a session early (it will send no more turns of it).

    Also sent router → worker so the worker can drop the session's history.
    """

    x_correlation_id: Id
    """The session to end."""
    reason: Text = ""
    """Free-form, for logs."""
    producer: Id = ""
    """Router → worker: the ``producer`` of the session's ``Dispatch`` frames (sessions belong
    to the producer that started them). Producer → router: unused, leave empty."""


class ReleaseReservation(Msg, frozen=True, kw_only=True, tag="release"):
    """Give back FORK reservations that a declaring turn made for children never started."""

    x_correlation_id: Id
    """The session whose turn declared the children (resolved through the alias table)."""
    count: int = 1
    """How many reservations to give back."""


# ------------------------------------------------------------------------- shared (both ways)


class Heartbeat(Msg, frozen=True, kw_only=True, tag="hb"):
    """Liveness beat, sent both ways on every endpoint. Any message counts as a beat too."""

    sent_at_s: float = 0.0
    """Sender's monotonic clock, for RTT diagnostics only (clocks are not comparable)."""


class Refusal(Msg, frozen=True, kw_only=True, tag="refusal"):
    """The router refuses a hello (version mismatch, bad identity); do not retry as-is."""

    reason: Text
    """Why, in words (a version mismatch names both versions here too)."""
    router_version: int
    """The router's ``PROTOCOL_VERSION``."""
    peer_version: int
    """The ``protocol_version`` the hello carried."""
    code: Text = ""
    """Stable machine-readable reason (docs/PROTOCOL.md §7.2): ``version_mismatch``,
    ``invalid_capacity``, ``name_mismatch``, ``name_in_use``, ``superseded``,
    ``unauthorized``. Empty from a router that predates the field."""


class ErrorReport(Msg, frozen=True, kw_only=True, tag="error"):
    """The router could not process a message from this peer. Informational; the peer may go on."""

    code: Text
    """Stable machine-readable reason (docs/PROTOCOL.md §7.2), e.g. ``invalid_message``,
    ``hello_required``, ``unknown_worker``, ``invalid_status``, ``duplicate_credit``."""
    message: Text
    """Human-readable detail (for a decode error: the field path and the problem)."""


# ---------------------------------------------------------------------------- router → producer


class ProducerWelcome(Msg, frozen=True, kw_only=True, tag="pwelcome"):
    """Accepts a producer."""

    router_incarnation: Id
    """Random per router start: a different value after a reconnect means the router restarted."""
    protocol_version: int
    """The router's ``PROTOCOL_VERSION``."""
    heartbeat_interval_s: float
    """Send something (a ``Heartbeat`` if nothing else) at least this often."""
    max_batch: int
    """Longest batch the router accepts in one frame."""


class Outcome(Msg, frozen=True, kw_only=True, tag="outcome"):
    """The one terminal result of a credit."""

    credit_id: int
    """The ``Credit.id`` this outcome ends."""
    status: Status
    """How it ended."""
    reason: Text = ""
    """Why, for every status but ``completed`` (e.g. ``worker_lost``, ``queue_full``)."""
    worker: Id = ""
    """The worker that ran (or last held) the credit; empty if it never left the router."""
    submit_to_dispatch_s: float | None = None
    """Time the credit waited in the router (coordinated omission made visible)."""
    dispatch_to_outcome_s: float | None = None
    """Router-observed time from dispatch to the worker's completion."""
    ttft_s: float | None = None
    """Worker-measured time to first token."""
    subagent_type: Id | None = None
    """Passed through unchanged from the credit."""
    result: Blob = b""
    """Opaque worker result (e.g. encoded request metrics), passed through."""


class OutcomeBatch(Msg, frozen=True, kw_only=True, tag="outcomeb"):
    """Several outcomes in one frame."""

    outcomes: Annotated[list[Outcome], msgspec.Meta(max_length=MAX_BATCH)]
    """Each one an ``Outcome``, tag included."""


class ProducerFirstToken(Msg, frozen=True, kw_only=True, tag="pft"):
    """A worker saw the first token of this credit's response."""

    credit_id: int
    """The ``Credit.id``."""
    ttft_s: float
    """Worker-measured time from request start to the first token."""


ADOPTED_TAG: Final = "padopted"
"""``ProducerAdopted``'s tag, as a producer lists it in ``ProducerHello.understands``."""
AFTER_V1: Final = frozenset({ADOPTED_TAG})
"""Tags of the messages added after protocol version 1: each is sent only to a peer that
lists it (§9 rule 4), so a version-1 peer never has to read one."""


class ProducerAdopted(Msg, frozen=True, kw_only=True, tag=ADOPTED_TAG):
    """A restarted router learned from a worker's ``Hello`` that these credits of yours,
    dispatched by its predecessor, are still running there: it tracks them now, and each will
    get exactly one outcome from it (its completion, or ``lost`` if the worker goes first).
    Stop waiting for them as credits of the old router (docs/PROTOCOL.md §6.1); ignore ids you
    do not await (a worker's claim is not checked against what you sent).

    Added after version 1: sent only to a producer whose ``ProducerHello.understands`` lists
    ``padopted``."""

    credit_ids: IdList
    """``Credit.id`` values."""


# ------------------------------------------------------------------------------ worker → router


class Hello(Msg, frozen=True, kw_only=True, tag="hello"):
    """First message of a worker connection."""

    name: Id
    """Stable worker name (one per agent)."""
    incarnation: Id
    """Random per process start: the same name with a new incarnation is a new worker."""
    protocol_version: int
    """The sender's ``PROTOCOL_VERSION``; the router refuses any other."""
    capacity: int
    """How many credits it executes concurrently."""
    labels: Annotated[dict[Id, Text], msgspec.Meta(max_length=64)] = {}
    """Free-form (host, GPU, model…), shown in status and logs."""
    in_flight: Annotated[dict[Id, IdList], msgspec.Meta(max_length=1_024)] = {}
    """On a reconnect: the credits it still holds, by producer."""


class Completion(Msg, frozen=True, kw_only=True, tag="done"):
    """A credit has finished on the worker (with any status)."""

    seq: int
    """Worker-local sequence number; the router acknowledges by sequence (``Ack``)."""
    producer: Id
    """The ``producer`` of the ``Dispatch`` that carried the credit, echoed unchanged."""
    credit_id: int
    """The ``Credit.id``."""
    status: Status
    """``completed``, ``failed`` or ``cancelled`` (the router alone says ``lost``/``rejected``)."""
    reason: Text = ""
    """Why, for ``failed`` (free-form) and ``cancelled`` (``cancelled``); empty otherwise."""
    ttft_s: float | None = None
    """Worker-measured time to first token, if a token came."""
    duration_s: float | None = None
    """Worker-measured execution time."""
    session_ended: bool = False
    """The worker dropped the session (final turn, error, or cancelled)."""
    result: Blob = b""
    """Opaque result for the producer (e.g. encoded request metrics), passed through."""


class CompletionBatch(Msg, frozen=True, kw_only=True, tag="doneb"):
    """Several completions in one frame."""

    completions: Annotated[list[Completion], msgspec.Meta(max_length=MAX_BATCH)]
    """Each one a ``Completion``, tag included, in ``seq`` order."""


class Recovered(Msg, frozen=True, kw_only=True, tag="recovered"):
    """Completions of credits dispatched by an earlier router incarnation (it restarted).

    The new router has no record of these credits; it forwards each as an outcome to its
    producer (held until that producer says hello, if it has not yet), once — it drops any
    ``seq`` of the worker's incarnation it has already seen — and acknowledges them. Sent after
    a ``Welcome`` whose ``router_incarnation`` differs from the one that dispatched the
    credits: the unacknowledged ones at once, later ones as they complete.
    """

    router_incarnation: Id
    """The incarnation that dispatched these credits."""
    completions: Annotated[list[Completion], msgspec.Meta(max_length=MAX_BATCH)]


class FirstToken(Msg, frozen=True, kw_only=True, tag="ft"):
    """First streamed token of a credit's response."""

    producer: Id
    """The ``producer`` of the ``Dispatch``, echoed unchanged."""
    credit_id: int
    """The ``Credit.id``."""
    ttft_s: float
    """Worker-measured time from request start to the first token."""


class ChildRelease(Msg, frozen=True, kw_only=True, tag="childrel"):
    """A FORK child session has ended on this worker: release its reservation (idempotent)."""

    x_correlation_id: Id
    """The child session's id."""
    producer: Id = ""
    """The ``producer`` of the child's ``Dispatch`` frames (sessions are per producer)."""


class InFlightReport(Msg, frozen=True, kw_only=True, tag="inflight"):
    """The worker's true set of credits it holds, by producer (orphan detection)."""

    credits: Annotated[dict[Id, IdList], msgspec.Meta(max_length=1_024)]
    """Credit ids by ``producer``: every credit it was sent and has not yet completed."""


class Draining(Msg, frozen=True, kw_only=True, tag="draining"):
    """The worker is draining: no new sessions, turns of its live sessions still welcome."""

    deadline_s: float
    """How long it will wait for its live sessions before leaving."""


class Goodbye(Msg, frozen=True, kw_only=True, tag="bye"):
    """The worker leaves cleanly; it holds no credits (or reports them lost)."""

    reason: Text = ""
    """Free-form, for logs."""


# ------------------------------------------------------------------------------ router → worker


class Welcome(Msg, frozen=True, kw_only=True, tag="welcome"):
    """Accepts a worker."""

    router_incarnation: Id
    """Random per router start: a different value after a reconnect means the router restarted."""
    protocol_version: int
    """The router's ``PROTOCOL_VERSION``."""
    heartbeat_interval_s: float
    """Send something (a ``Heartbeat`` if nothing else) at least this often."""
    inflight_report_interval_s: float
    """Send an ``InFlightReport`` this often."""
    resumed: bool = False
    """``True``: this router still holds the worker's state (the same incarnation reconnected
    within the grace period): its sessions, credits and completions stand. ``False``: the
    router holds nothing of this worker — every session history from before is an orphan the
    router will never send a turn of again, and may be dropped."""


class Dispatch(Msg, frozen=True, kw_only=True, tag="credit"):
    """One credit to execute."""

    producer: Id
    """The producer the credit belongs to; echo it in every message about the credit."""
    credit: Credit
    """The credit to execute."""


class DispatchBatch(Msg, frozen=True, kw_only=True, tag="credits"):
    """Several credits of one producer in one frame (the efficient form)."""

    producer: Id
    """The producer all these credits belong to."""
    credits: Annotated[list[Credit], msgspec.Meta(max_length=MAX_BATCH)]
    """The credits to execute, in dispatch order."""


class Cancel(Msg, frozen=True, kw_only=True, tag="cancel"):
    """Cancel dispatched credits; the worker answers each with a completion."""

    producer: Id
    """The producer the credits belong to."""
    credit_ids: IdList
    """Credits to abort; ids the worker no longer holds are ignored."""
    revoked: bool = False
    """``True``: the router has already ended these credits (a draining router at its deadline).
    Stop them and never report them — not as a completion, not as ``Recovered``. Answer with an
    ``InFlightReport`` once they are forgotten. ``False``: an ordinary cancel, answered by the
    credits' completions (status ``cancelled`` unless they finished first)."""


class Ack(Msg, frozen=True, kw_only=True, tag="ack"):
    """Completions up to and including ``seq`` are recorded; the worker may forget them."""

    seq: int
    """The highest ``Completion.seq`` recorded (acknowledgements are cumulative)."""


class Drain(Msg, frozen=True, kw_only=True, tag="drain"):
    """An operator asks the worker to drain (no new sessions) and leave when idle."""

    deadline_s: float
    """Leave after at most this long, even if sessions are still live."""


# --------------------------------------------------------------------------------------- unions

ProducerToRouter = (
    ProducerHello
    | Submit
    | SubmitBatch
    | CancelCredits
    | EndSession
    | ReleaseReservation
    | Heartbeat
)
"""Everything a producer may send."""

RouterToProducer = (
    ProducerWelcome
    | Refusal
    | Outcome
    | OutcomeBatch
    | ProducerFirstToken
    | ProducerAdopted
    | ErrorReport
    | Heartbeat
)
"""Everything the router sends a producer."""

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
"""Everything a worker may send."""

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
"""Everything the router sends a worker."""
