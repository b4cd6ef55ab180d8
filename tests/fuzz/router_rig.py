"""A RouterService on loopback whose handlers the fuzz feeds directly, and the judge of each step.

``Rig.start`` binds a real ``RouterService`` (both endpoints ``tcp://127.0.0.1:0``) inside the
running event loop and admits its workers through real ``Hello`` frames sent by real DEALER
sockets, so that every dispatch really reaches a connected peer. After that the fuzz calls the
service's own frame handlers (``_on_worker_frames``, ``_on_producer_frames``,
``_on_malformed_worker``/``_producer``) with ``(identity, payload)`` lists, as the socket layer
would on one wake-up, and never awaits in between: nothing else runs, so every change is the
step's doing.

The producers are not connected: everything the router sends them waits in the service's
per-producer backlog, which is exactly the bytes a producer would read. The rig decodes them
after every step (they must decode: the router must never write an invalid frame).

``Rig.step`` judges each wake-up (see ``_judge``):

* no exception escapes the handler, and the service counted no ``internal_error``;
* ``check_invariants(core)`` (docs/ROUTING.md §7, 1–6) holds;
* a worker's in-flight set lost a credit only for a reason the step gave: that worker's own
  completion of it, its in-flight report leaving it out, or that worker leaving (``Goodbye``, a
  new incarnation, or being cut off for invalid frames) — and each such credit got its one
  outcome, with the status the completion said or ``lost``;
* a worker gained credits only by dispatch of credits that were waiting, or by adopting credits
  its first hello to this router (a new incarnation) listed that were not open, within its
  capacity; the rig keeps its own set of adopted credits and it must equal the core's;
* an adopted credit is never judged by in-flight reports, ends like any other credit of its
  worker, or silently when its producer submits a credit with its id (its submission wins:
  the claim is displaced); a ``ProducerAdopted`` names only adopted credits;
* a worker appears only by its hello and disappears only by one of the reasons above;
* every outcome a producer receives ends a credit that was open (or submitted in this step),
  except those ``Recovered`` forwarded for credits the router never had (their producer
  de-duplicates them, docs/PROTOCOL.md); the producers receive exactly as many outcomes as the
  core counts;
* a first-token event reaches the producer only for a credit in flight on the worker that
  reported it.

The bugs this fuzz found are pinned by ``test_found_bugs.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Final

import zmq
from hypothesis import event as _event
from hypothesis.control import currently_in_test_context

from protocol import PROTOCOL_VERSION
from protocol.codec import (
    decode_producer_to_router,
    decode_router_to_producer,
    decode_router_to_worker,
    decode_worker_to_router,
    encode,
)
from protocol.errors import DecodeError
from protocol.messages import (
    ADOPTED_TAG,
    Completion,
    CompletionBatch,
    ErrorReport,
    FirstToken,
    Goodbye,
    Hello,
    InFlightReport,
    Outcome,
    OutcomeBatch,
    ProducerAdopted,
    ProducerFirstToken,
    ProducerHello,
    Recovered,
    Status,
    Submit,
    SubmitBatch,
    Welcome,
)
from router_service.core.invariants import check_invariants
from router_service.core.router import RouterCore
from router_service.core.workers import Worker, WorkerState
from router_service.service import INVALID_LIMIT, RouterService

Key = tuple[str, int]
"""A credit's key: (producer key, credit id)."""

ROUTER_INCARNATION: Final = "r-fuzz"


class _Errors(logging.Handler):
    """Keeps the exceptions the service logs with ``logger.exception``."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@dataclasses.dataclass
class Frames:
    """What one wake-up carried, decoded by the rig to know what the step may justify."""

    claims: dict[str, dict[Key, set[Status]]] = dataclasses.field(
        default_factory=lambda: defaultdict(dict)
    )
    """Worker name -> credits it reported finished (Completion, CompletionBatch, Recovered)."""
    reports: dict[str, list[set[Key]]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    """Worker name -> the in-flight sets it reported (InFlightReport, same-incarnation Hello)."""
    leaves: set[str] = dataclasses.field(default_factory=set)
    """Workers that said goodbye, came back as a new incarnation, or were cut off."""

    hellos: set[str] = dataclasses.field(default_factory=set)
    adoptable: dict[str, set[Key]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    """Worker name -> credits a hello of an incarnation new to this router listed (it may
    adopt those that are not open, up to its capacity)."""
    capacities: dict[str, int] = dataclasses.field(default_factory=dict)
    """The largest capacity each worker announced in the wake-up (it may lower it again)."""
    first_tokens: dict[str, set[Key]] = dataclasses.field(default_factory=lambda: defaultdict(set))
    submitted: list[Key] = dataclasses.field(default_factory=list)


class Rig:
    """One RouterService, its connected workers, and the producers' view (module docstring)."""

    def __init__(self, service: RouterService, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.service = service
        self.core = service.core
        self.ctx = ctx
        self.dealers: dict[str, zmq.Socket[bytes]] = {}
        self.received: dict[Key, int] = defaultdict(int)
        """Outcomes received per credit key."""
        self.refused_as_duplicate: list[Key] = []
        """Submissions answered ``duplicate_credit`` since the last step was judged."""
        self.told_allowed: set[Key] = set()
        """Credits ever adopted (a ``ProducerAdopted`` held for an absent producer comes later)."""
        self.received_claims = 0
        """Outcomes of credits adopted and ended in the step that adopted them."""
        self.forwarded: int = 0
        """Outcomes received that ``Recovered`` forwarded for credits the router never had."""
        self.recoverable: set[Key] = set()
        """Credits never submitted for which a ``Recovered`` was sent (forwarding is legal)."""
        self.ever_submitted: set[Key] = set()
        self.adopted: set[Key] = set()
        """Open credits the router adopted (the rig's model; the core's must equal it)."""
        self.adopted_total = 0
        self.adopted_ended: set[Key] = set()
        self.maybe_adopted_ended: set[Key] = set()
        """Claims that ended in the step that made them, whether adopted or forwarded (when
        the counts cannot tell): the core may adopt them again or not."""
        self.ambiguous: set[Key] = set()
        """This step's outcomes for claims that were adopted or forwarded (``_judge_outcomes``)."""
        """Adopted credits that ended: the core never adopts them again."""
        self.displaced = 0
        """Adopted credits whose producer's own submission of the id ended them silently."""
        self.invalid: dict[tuple[bool, bytes], int] = defaultdict(int)
        """(worker socket?, identity) -> invalid frames since that peer's last cut-off."""

        self.producer_identities: dict[bytes, str] = {}
        self.producer_keys: dict[bytes, str] = {}
        """Routing id -> the producer key its last accepted ``ProducerHello`` gave it."""

        self.steps = 0
        self.trace: list[tuple[str, list[tuple[bytes, bytes]]]] = []
        # The two-strike orphan rule, modelled by step number (each step has its own ``now``).
        self.dispatched_at: dict[Key, int] = {}
        """Step at which each in-flight credit was dispatched."""
        self.missed: set[Key] = set()
        """In-flight credits missing from their worker's last judging report (first strike)."""
        self.last_report: dict[str, int] = {}
        """Worker -> step of its last in-flight report (or of its joining)."""
        self._errors = _Errors()

    # ----------------------------------------------------------------- life cycle

    @classmethod
    async def start(
        cls,
        ctx: zmq.Context[zmq.Socket[bytes]],
        workers: dict[str, int],
        producers: Iterable[bytes],
        **core_kwargs: Any,
    ) -> Rig:
        """Bind a service, admit ``workers`` (name -> capacity) through real hellos."""
        core = RouterCore(
            protocol_version=PROTOCOL_VERSION, router_incarnation=ROUTER_INCARNATION, **core_kwargs
        )
        service = RouterService(
            core,
            worker_endpoint="tcp://127.0.0.1:0",
            producer_endpoint="tcp://127.0.0.1:0",
            context=ctx,
        )
        service.startup()
        rig = cls(service, ctx)
        logging.getLogger("router_service.service").addHandler(rig._errors)
        try:
            for name, capacity in workers.items():
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTING_ID, name.encode())
                sock.connect(service.worker_endpoint)
                rig.dealers[name] = sock
                sock.send(
                    encode(
                        Hello(
                            name=name,
                            incarnation=f"{name}-i0",
                            protocol_version=PROTOCOL_VERSION,
                            capacity=capacity,
                        )
                    )
                )
            for name, sock in rig.dealers.items():
                await _await_welcome(sock, name)
            for identity in producers:
                # The core knows a producer as NAME/INCARNATION from its hello: the rig's
                # identities are written that way, so its keys are its identities.
                name, _, incarnation = identity.decode().partition("/")
                hello = ProducerHello(
                    producer=name,
                    protocol_version=1,
                    incarnation=incarnation,
                    understands=[ADOPTED_TAG],
                )
                rig.producer_frames([(identity, encode(hello))])
                rig.producer_identities[identity] = identity.decode()
        except BaseException:
            await rig.close()
            raise
        check_invariants(core)
        return rig

    async def close(self) -> None:
        """Shut the service down (no drain) and close every socket."""
        logging.getLogger("router_service.service").removeHandler(self._errors)
        self._end_everything()
        for producer in self.service.producers.values():
            producer.outbox.clear()  # nobody reads them: the shutdown must not wait for it
        for link in self.service.workers.values():
            link.revoked = False  # the rig's workers never confirm: do not wait for them
        # Nor for the producers to fall quiet (they have no sockets: nothing more can come),
        # which would add a quarter of a second to every example.
        self.service._producer_rx_at = -math.inf
        await self.service.shutdown()
        for sock in self.dealers.values():
            sock.close(0)
        self.dealers.clear()

    async def finish(self) -> None:
        """Shut down, judged like a step: every credit left ends, each exactly once."""
        for sock in self.dealers.values():
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                decode_router_to_worker(frame)  # the router never writes an invalid frame
        self._judge_health("before shutdown", _Snapshot.of(self), shutdown=False)
        # What ``RouterService.shutdown`` does once its drain is over (force: no drain here),
        # judged before the sockets close: every credit left ends, rejected or lost.
        self._run_judged("shutdown", Frames(), self._end_everything, shutdown=True)
        core = self.core
        # Not check_invariants: the shutdown ends credits without refreshing the load index
        # (nothing routes afterwards), so invariant 6 no longer applies.
        assert not any(core.ledgers.values()), "credits without an outcome after shutdown"
        assert all(not w.tickets and not w.queue for w in core.workers.values())
        assert not core.queue
        received = sum(self.received.values()) + self.received_claims
        accepted = core.stats.submitted + self.adopted_total - self.displaced
        assert received == sum(core.stats.outcomes.values()) == accepted, (
            f"producers received {received} outcomes, core counted {core.stats.outcomes}, "
            f"submitted {core.stats.submitted}, adopted {self.adopted_total}, displaced "
            f"{self.displaced}"
        )

    # ---------------------------------------------------------------------- steps

    def worker_frames(self, frames: list[tuple[bytes, bytes]]) -> None:
        """One wake-up of the worker socket."""
        seen = self._decode_worker_frames(frames)
        self._run_judged(
            "workers", seen, lambda: self.service._on_worker_frames(frames), frames=frames
        )

    def producer_frames(self, frames: list[tuple[bytes, bytes]]) -> None:
        """One wake-up of the producer socket."""
        seen = Frames()
        for identity, payload in frames:
            try:
                msg = decode_producer_to_router(payload)
            except DecodeError:
                self._count_invalid(False, identity, seen)
                continue
            credits = (
                [msg.credit]
                if isinstance(msg, Submit)
                else msg.credits
                if isinstance(msg, SubmitBatch)
                else []
            )
            if isinstance(msg, ProducerHello) and msg.protocol_version == PROTOCOL_VERSION:
                # The key the core knows it by from now on (the service's rule: its name and
                # incarnation; a producer that gives none is one incarnation per routing id).
                self.producer_keys[identity] = f"{msg.producer}/{msg.incarnation or identity.hex()}"
            key = self.producer_keys.get(identity, identity.decode("utf-8", "replace"))
            seen.submitted += [(key, c.id) for c in credits]

        self._run_judged(
            "producers", seen, lambda: self.service._on_producer_frames(frames), frames=frames
        )

    def malformed(self, identity: bytes, *, worker: bool) -> None:
        """A multipart message arrived (the transport calls this and drops it)."""
        seen = Frames()
        self._count_invalid(worker, identity, seen)
        handler = (
            self.service._on_malformed_worker if worker else self.service._on_malformed_producer
        )
        # The transport's handler only counts; the effects go out with the next tick's flush.
        now = self.service.now()
        self._tick_leaves(now, seen)

        def arrive() -> None:
            handler(identity)
            self.service.on_tick(now)

        self._run_judged("multipart", seen, arrive)

    def tick(self) -> None:
        """The service's periodic duties, at the loop's current time."""
        now = self.service.now()
        seen = Frames()
        self._tick_leaves(now, seen)
        self._run_judged("tick", seen, lambda: self.service.on_tick(now))

    def _tick_leaves(self, now: float, seen: Frames) -> None:
        for name, worker in self.core.workers.items():
            if worker.draining and now > worker.drain_deadline + self.core.lost_after_s:
                seen.leaves.add(name)  # its drain deadline passed: lost, as documented

    def _count_invalid(self, worker: bool, identity: bytes, seen: Frames) -> None:
        """The cut-off rule: more than ``INVALID_LIMIT`` invalid frames from one peer."""
        name = identity.decode("utf-8", "replace")
        self.invalid[worker, identity] += 1
        if self.invalid[worker, identity] > INVALID_LIMIT:
            self.invalid[worker, identity] = 0
            if worker:
                seen.leaves.add(name)

    def _decode_worker_frames(self, frames: list[tuple[bytes, bytes]]) -> Frames:
        seen = Frames()
        # Who is known, as the wake-up goes on (a hello may admit a worker mid-batch), which
        # holders are live (active or draining: a new incarnation is refused name_in_use), and
        # which incarnations were replaced (refused superseded).
        incarnations = {n: w.incarnation for n, w in self.core.workers.items()}
        live = {n for n, w in self.core.workers.items() if w.state is not WorkerState.SUSPECT}
        superseded = {n: set(inc) for n, inc in self.core._superseded.items()}
        holders = dict(self.core._holders)  # (an incarnation new to the router may adopt)
        for identity, payload in frames:
            name = identity.decode("utf-8", "replace")
            try:
                msg = decode_worker_to_router(payload)
            except DecodeError:
                self._count_invalid(True, identity, seen)
                if name in seen.leaves:
                    incarnations.pop(name, None)
                continue
            if isinstance(msg, Hello):
                _note_hello(seen, incarnations, live, superseded, holders, name, msg)
                continue
            if name in incarnations:
                live.add(name)  # any message of a known worker: it is alive
            if isinstance(msg, Completion | CompletionBatch | Recovered):
                done = [msg] if isinstance(msg, Completion) else msg.completions
                for c in done:
                    seen.claims[name].setdefault((c.producer, c.credit_id), set()).add(c.status)
            elif isinstance(msg, InFlightReport):
                seen.reports[name].append(_held(msg.credits))
            elif isinstance(msg, Goodbye) and name in incarnations:
                seen.leaves.add(name)
                del incarnations[name]
            elif isinstance(msg, FirstToken):
                seen.first_tokens[name].add((msg.producer, msg.credit_id))
        return seen

    # -------------------------------------------------------------------- judging

    def _end_everything(self) -> None:
        service = self.service
        service.request_exit(force=True)
        now = service.now()
        service.core.shutdown(now)
        service._flush(now)

    def _run_judged(
        self,
        what: str,
        seen: Frames,
        handle: Callable[[], object],
        *,
        shutdown: bool = False,
        frames: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.trace.append((what, frames or []))
        before = _Snapshot.of(self)
        handle()
        try:
            self._judge(what, seen, before, shutdown=shutdown)
        except AssertionError as exc:
            exc.add_note(self.describe())
            raise

    def describe(self, last: int = 12) -> str:
        """The last wake-ups, decoded, for a failure report."""
        lines = [f"last {min(last, len(self.trace))} of {len(self.trace)} wake-ups:"]
        for what, frames in self.trace[-last:]:
            lines.append(f"  {what}:")
            for identity, payload in frames[:8]:
                try:
                    decode = (
                        decode_producer_to_router
                        if what == "producers"
                        else decode_worker_to_router
                    )
                    text = repr(decode(payload))
                except DecodeError as err:
                    text = f"<undecodable: {err.reason}>"
                lines.append(f"    {identity!r}: {text[:300]}")
            if len(frames) > 8:
                lines.append(f"    … {len(frames) - 8} more")
        return "\n".join(lines)

    def _judge_health(self, what: str, before: _Snapshot, *, shutdown: bool) -> None:
        """No exception was swallowed by the service, and docs/ROUTING.md §7 holds."""
        internal = self.service.invalid_messages.get("internal_error", 0)
        if internal != before.internal_errors:
            record = self._errors.records[-1]
            assert record.exc_info is not None
            raise AssertionError(f"{what}: internal error in the service") from record.exc_info[1]
        if not shutdown:
            check_invariants(self.core)

    def _judge(self, what: str, seen: Frames, before: _Snapshot, *, shutdown: bool = False) -> None:
        self.steps += 1
        self._judge_health(what, before, shutdown=shutdown)
        outcomes, first_tokens, told = self.read_producers()
        self.ever_submitted.update(seen.submitted)
        ended = self._judge_outcomes(what, seen, before, outcomes)
        self._judge_workers(what, seen, before, ended, shutdown=shutdown)
        self._judge_adoption(what, seen, before, told, ended)
        for key, outcome in ended.items():
            if outcome.worker:
                continue  # judged with its worker
            assert outcome.status in (Status.REJECTED, Status.CANCELLED), (
                f"{what}: {key} never dispatched but ended {outcome.status}"
            )
        self._judge_first_tokens(what, seen, before, first_tokens)

    def _judge_outcomes(
        self, what: str, seen: Frames, before: _Snapshot, outcomes: list[tuple[Key, Outcome]]
    ) -> dict[Key, Outcome]:
        """Every outcome ends an open credit (at most once), one adopted in this step, or is a
        ``Recovered`` completion forwarded for a credit the router never had. Returns the
        outcomes that ended credits, by key."""
        core = self.core
        adoptable = set().union(*seen.adoptable.values())
        ended: dict[Key, Outcome] = {}
        counted: dict[Key, int] = defaultdict(int)
        ambiguous = forwarded = 0
        self.ambiguous = set()
        for key, outcome in outcomes:
            forwardable = key in self.recoverable and key not in self.ever_submitted
            if (
                key in before.open
                or key in seen.submitted
                or (key in adoptable and not forwardable)
            ):
                event(f"outcome {outcome.status.value} {_short(outcome.reason)}")
                counted[key] += 1
                allowed = (key in before.open) + seen.submitted.count(key) + (key in adoptable)
                assert counted[key] <= allowed, f"{what}: {counted[key]} outcomes for {key}"
                ended[key] = outcome
                self.received[key] += 1
            elif key in adoptable:
                # Claimed by a hello in this step and named by a ``Recovered``: the outcome of
                # the adopted credit, or a forwarded completion if it was not adopted (the
                # totals below tell how many of each).
                event("outcome of a claim adopted or forwarded")
                ambiguous += 1
                ended[key] = outcome
                self.ambiguous.add(key)
            elif forwardable:
                event("outcome forwarded from Recovered")
                forwarded += 1
            else:
                raise AssertionError(f"{what}: outcome {outcome!r} for {key}, which was not open")
        emitted = sum(core.stats.outcomes.values()) - before.emitted
        sure = sum(counted.values())
        assert sure <= emitted <= sure + ambiguous, (
            f"{what}: producers got {sure} (+{ambiguous} claimed) outcomes, the core emitted "
            f"{emitted}"
        )
        recovered = core.stats.recovered - before.recovered
        assert sure + ambiguous + forwarded == emitted + recovered, (
            f"{what}: producers got {sure + ambiguous + forwarded} outcomes, the core emitted "
            f"{emitted} and forwarded {recovered}"
        )
        self.received_claims += emitted - sure
        self.forwarded += forwarded + ambiguous - (emitted - sure)
        return ended

    def _judge_first_tokens(
        self, what: str, seen: Frames, before: _Snapshot, first_tokens: list[tuple[Key, object]]
    ) -> None:
        core = self.core
        for (producer, cid), token in first_tokens:
            key = (producer, cid)
            senders = [w for w, keys in seen.first_tokens.items() if key in keys]
            assert any(
                key in before.held.get(w, ()) or key in _keys(core.workers.get(w)) for w in senders
            ), f"{what}: first token {token!r} for {key}, not in flight on a worker that said so"

    def _judge_workers(
        self,
        what: str,
        seen: Frames,
        before: _Snapshot,
        ended: dict[Key, Outcome],
        *,
        shutdown: bool,
    ) -> None:
        core = self.core
        step = len(self.trace)
        displaced = _displaced(seen, before, self._core_adopted())
        for name, worker in before.workers.items():
            gone = core.workers.get(name) is not worker
            if gone and not shutdown:
                assert name in seen.leaves, f"{what}: worker {name} vanished without a reason"
            after = set() if gone else _keys(worker)
            judged = before.held[name] - before.adopted  # (adopted: never judged by reports)
            orphans = self._orphans(name, judged, seen.reports.get(name, []), step)
            for key in before.held[name] - after:
                if key in displaced:
                    continue  # displaced by its producer's own submission (judged below)
                orphaned = key in orphans
                self._judge_removal(what, seen, name, key, ended.get(key), gone, shutdown, orphaned)
            if not gone:
                for key in orphans & after:
                    assert key in seen.claims.get(name, {}), (
                        f"{what}: {key} missing from two reports of {name}, still in flight"
                    )
        self._update_orphan_model(seen, displaced, step)
        self._judge_gained(what, seen, before, ended)
        for key, outcome in ended.items():
            if outcome.worker and not any(key in held for held in before.held.values()):
                # Dispatched and ended within this one step.
                w = outcome.worker
                claimed = key in seen.claims.get(w, {})
                assert claimed or w in seen.leaves or shutdown, (
                    f"{what}: {key} dispatched and ended {outcome!r} in one step without cause"
                )

    def _judge_gained(
        self, what: str, seen: Frames, before: _Snapshot, ended: dict[Key, Outcome]
    ) -> None:
        """A worker gains credits only by dispatch of waiting ones, or by adoption."""
        core = self.core
        held_before = set().union(*before.held.values()) if before.held else set()
        for name, worker in core.workers.items():
            if name not in before.workers:
                assert name in seen.hellos, f"{what}: worker {name} appeared without a hello"
            gained = _keys(worker) - before.held.get(name, set())
            if gained:  # (a hello later in the wake-up may have lowered the capacity since)
                capacity = max(
                    worker.capacity, before.capacities.get(name, 0), seen.capacities.get(name, 0)
                )
                assert len(worker.tickets) <= capacity, f"{what}: {worker!r} over capacity"
            for key in gained:
                displaced = key in before.adopted and key in seen.submitted
                # A credit that ended in this step may be claimed by a later hello in it: the
                # router no longer tracks it, so the claim is adopted like any unknown id
                # (its outcome is one the producer ignores: it no longer awaits that id).
                reclaimed = key in ended and key in seen.adoptable.get(name, ())
                assert key not in held_before or displaced or reclaimed, (
                    f"{what}: {key} moved to {name} while in flight"
                )
                assert (
                    key in before.queued
                    or key in seen.submitted
                    or (
                        key in seen.adoptable.get(name, ())
                        and (key not in before.open or key in ended)
                    )
                ), f"{what}: {key} dispatched to (or adopted by) {name} but was not waiting"

    @staticmethod
    def _judge_removal(
        what: str,
        seen: Frames,
        name: str,
        key: Key,
        outcome: Outcome | None,
        gone: bool,
        shutdown: bool,
        orphaned: bool,
    ) -> None:
        """``key`` is no longer in flight on ``name``: the step must say why."""
        assert outcome is not None, f"{what}: {key} left {name} without an outcome"
        assert outcome.worker == name, f"{what}: {key} ended on {outcome.worker}"
        if shutdown:
            assert (outcome.status, outcome.reason) == (Status.LOST, "router_shutdown")
        elif key in seen.claims.get(name, {}) and outcome.status in seen.claims[name][key]:
            pass  # completed by its worker (which may have left later in the same wake-up)
        elif gone:
            assert outcome.status is Status.LOST, f"{what}: {name} left, {outcome!r}"
            assert outcome.reason in ("worker_lost", "worker_left"), outcome
        elif orphaned:
            assert (outcome.status, outcome.reason) == (Status.LOST, "orphaned"), outcome
        else:
            raise AssertionError(
                f"{what}: {key} left {name} ({outcome!r}) with no completion, report "
                "or departure of that worker"
            )

    def _orphans(self, name: str, held: set[Key], reports: list[set[Key]], step: int) -> set[Key]:
        """The credits of ``name`` its ``reports`` in this step make orphans (docs/ROUTING.md §6).

        A report judges only credits dispatched before the previous report; a judged credit
        missing twice in a row ends ``lost: orphaned``. Updates the first strikes.
        """
        orphans: set[Key] = set()
        judged_before = self.last_report.get(name, 0)
        for report in reports:
            for key in held - orphans:
                if self.dispatched_at.get(key, step) >= judged_before:
                    continue
                if key in report:
                    self.missed.discard(key)
                elif key in self.missed:
                    orphans.add(key)
                else:
                    self.missed.add(key)
            judged_before = step
        if reports:
            self.last_report[name] = step
        return orphans

    def _core_adopted(self) -> set[Key]:
        return {
            (t.producer, t.credit.id)
            for ledger in self.core.ledgers.values()
            for t in ledger.values()
            if t.adopted
        }

    def _update_orphan_model(self, seen: Frames, displaced: set[Key], step: int) -> None:
        for key in displaced & set(self.dispatched_at):
            # An adopted credit displaced by a submission of its id: a new credit now.
            del self.dispatched_at[key]
            self.missed.discard(key)
        in_flight: set[Key] = set()
        for name, worker in self.core.workers.items():
            keys = _keys(worker)
            in_flight |= keys
            if name in seen.leaves or name not in self.last_report:
                self.last_report[name] = step  # a new worker (or incarnation) joined now
            for key in keys:
                self.dispatched_at.setdefault(key, step)
        for key in set(self.dispatched_at) - in_flight:
            del self.dispatched_at[key]
        self.missed &= in_flight

    def _judge_adoption(
        self, what: str, seen: Frames, before: _Snapshot, told: list[Key], ended: dict[Key, Outcome]
    ) -> None:
        """The rig's set of adopted credits, stepped by what the frames allow, equals the
        core's; each adoption is counted once; producers are told only of adopted credits."""
        core = self.core
        held_now = {name: _keys(w) for name, w in core.workers.items()}
        in_flight = set().union(*held_now.values()) if held_now else set()
        adoptable = set().union(*seen.adoptable.values())
        actual = self._core_adopted()
        displaced = _displaced(seen, before, actual)
        model = (self.adopted - displaced) & in_flight
        for name, keys in held_now.items():
            if core.workers[name] is not before.workers.get(name) or name in seen.hellos:
                # Adopted now: in flight, listed by its hello, and not open when the hello was
                # read (not open before the wake-up, or ended earlier in it). Hellos and
                # submissions never share a wake-up, so nothing else puts such a key there.
                model |= {
                    k
                    for k in keys & seen.adoptable.get(name, set())
                    if k not in self.adopted_ended
                    and (k not in self.maybe_adopted_ended or k in actual)
                    and (k not in before.open or (k in ended and k not in before.adopted))
                }
        assert actual == model, (
            f"{what}: the core holds adopted {sorted(actual)}, the model {sorted(model)}"
        )
        adopted_now = core.stats.adopted - before.adopted_count
        newly = model - self.adopted
        assert adopted_now >= len(newly), (
            f"{what}: {len(newly)} adopted, core counted {adopted_now}"
        )
        ended_in_step = adopted_now - len(newly)
        if ended_in_step:
            event("adopted and ended in one wake-up")
        displaced_now = core.stats.adoptions_displaced - before.displaced
        assert displaced_now == len(displaced), (
            f"{what}: {len(displaced)} adopted credits displaced, core counted {displaced_now}"
        )
        if newly:
            event("adopted")
        if displaced:
            event("adopted credit displaced by a submission")
        refused, self.refused_as_duplicate = self.refused_as_duplicate, []
        for key in refused:
            # A worker's claim never makes its producer's own submission of the id fail (a
            # second submission of it in the same step is a duplicate of the first).
            assert key not in before.adopted or seen.submitted.count(key) > 1, (
                f"{what}: {key} refused as adopted elsewhere"
            )
        for key in told:
            assert key in self.told_allowed or key in model or key in adoptable, (
                f"{what}: ProducerAdopted names {key}, which was never adopted"
            )
        self.told_allowed |= model
        # Adopted and ended (displaced too): never adopted again (a repeat is a duplicate).
        self.adopted_ended |= before.adopted - model
        self._claims_ended(adoptable & set(ended) - model, before, ended_in_step)
        self.maybe_adopted_ended -= model
        self.adopted_total += adopted_now
        self.displaced += displaced_now
        self.adopted = model

    def _claims_ended(self, claims: set[Key], before: _Snapshot, count: int) -> None:
        """``claims`` (listed by a hello in this step) got an outcome in it and are not in
        flight; ``count`` of them were adopted and ended (the core's count). Those whose
        outcome only an adopted credit can explain were; of the others (forwarded ``Recovered``
        outcomes look the same, and so does a credit open before that ended and was claimed
        again), the counts decide when they can."""
        sure = {k for k in claims if k not in before.open and k not in self.ambiguous}
        unsure = claims - sure
        self.adopted_ended |= sure
        if count == len(sure):
            return  # none of the others was adopted
        if count == len(sure) + len(unsure):
            self.adopted_ended |= unsure
        else:
            self.maybe_adopted_ended |= unsure

    def read_producers(
        self,
    ) -> tuple[list[tuple[Key, Outcome]], list[tuple[Key, object]], list[Key]]:
        """Take every frame waiting for a producer: (outcomes, first tokens, adopted credits),
        by credit key."""
        outcomes: list[tuple[Key, Outcome]] = []
        tokens: list[tuple[Key, object]] = []
        told: list[Key] = []
        # Frames wait in each producer link's outbox (the rig's producers have no sockets), or,
        # for a producer that was cut off, among the frames held for its key.
        queues = [(p.key, p.outbox) for p in self.service.producers.values()]
        queues += list(self.service._held.items())
        for key, queue in queues:
            while queue:
                msg = decode_router_to_producer(queue.popleft())
                if isinstance(msg, Outcome):
                    outcomes.append(((key, msg.credit_id), msg))
                elif isinstance(msg, OutcomeBatch):
                    outcomes += [((key, o.credit_id), o) for o in msg.outcomes]
                elif isinstance(msg, ProducerFirstToken):
                    tokens.append(((key, msg.credit_id), msg))
                elif isinstance(msg, ProducerAdopted):
                    told += [(key, cid) for cid in msg.credit_ids]
                elif isinstance(msg, ErrorReport) and msg.code == "duplicate_credit":
                    cid = int(msg.message.split()[1])  # "credit N is already in progress; …"
                    self.refused_as_duplicate.append((key, cid))
        return outcomes, tokens, told

    # ---------------------------------------------------------------------- views

    def held(self, name: str) -> list[Key]:
        """Credits in flight on worker ``name`` (sorted, for drawing)."""
        return sorted(_keys(self.core.workers.get(name)))

    def open_credits(self) -> list[Key]:
        return sorted((p, cid) for p, ledger in self.core.ledgers.items() for cid in ledger)

    def queued_on(self, name: str) -> list[Key]:
        worker = self.core.workers.get(name)
        return sorted((t.producer, t.credit.id) for t in worker.queue) if worker else []


@dataclasses.dataclass
class _Snapshot:
    workers: dict[str, Worker]
    capacities: dict[str, int]
    held: dict[str, set[Key]]
    open: set[Key]
    queued: set[Key]
    adopted: set[Key]
    adopted_count: int
    displaced: int
    emitted: int
    recovered: int
    forwarded: int
    internal_errors: int

    @classmethod
    def of(cls, rig: Rig) -> _Snapshot:
        core = rig.core
        tickets = [t for ledger in core.ledgers.values() for t in ledger.values()]
        return cls(
            workers=dict(core.workers),
            capacities={n: w.capacity for n, w in core.workers.items()},
            held={n: _keys(w) for n, w in core.workers.items()},
            open={(t.producer, t.credit.id) for t in tickets},
            queued={(t.producer, t.credit.id) for t in tickets if t.dispatched_at < 0},
            adopted=set(rig.adopted),  # (the rig's model, checked against the core each step)
            adopted_count=core.stats.adopted,
            displaced=core.stats.adoptions_displaced,
            emitted=sum(core.stats.outcomes.values()),
            recovered=core.stats.recovered,
            forwarded=rig.forwarded,
            internal_errors=rig.service.invalid_messages.get("internal_error", 0),
        )


def event(label: str) -> None:
    """Count ``label`` in ``--hypothesis-show-statistics`` (outside a Hypothesis test: no-op)."""
    if currently_in_test_context():
        _event(label)


def _displaced(seen: Frames, before: _Snapshot, adopted_now: set[Key]) -> set[Key]:
    """Adopted credits a submission of their id displaced in this step: submitted, and no
    longer adopted (a submission the service refused before the core, e.g. one addressed
    to another router incarnation, displaces nothing)."""
    return {k for k in before.adopted if k in seen.submitted and k not in adopted_now}


def _short(reason: str) -> str:
    """A reason as a low-cardinality label (workers' own reasons are free text)."""
    head = reason.split(":")[0]
    return head if len(head) < 40 else "(long)"


def _keys(worker: Worker | None) -> set[Key]:
    if worker is None:
        return set()
    return {(t.producer, t.credit.id) for t in worker.tickets}


def _note_hello(
    seen: Frames,
    incarnations: dict[str, str],
    live: set[str],
    superseded: dict[str, set[str]],
    holders: dict[str, str],
    name: str,
    msg: Hello,
) -> None:
    """What a hello does (docs/ROUTING.md §6): admit, re-admit (with an in-flight report),
    replace a holder that is not live, or nothing (refused: a superseded incarnation, or a new
    one while the holder is live)."""
    seen.hellos.add(name)
    seen.capacities[name] = max(seen.capacities.get(name, 0), msg.capacity)
    if msg.name == name and msg.protocol_version == PROTOCOL_VERSION and msg.capacity >= 1:
        if msg.incarnation in superseded.get(name, ()):
            return  # refused: superseded
        known = incarnations.get(name)
        if known is not None and msg.incarnation != known:
            if name in live:
                return  # refused: name_in_use; the holder keeps everything
            seen.leaves.add(name)  # a new incarnation replaces a suspect holder: it is lost
            superseded.setdefault(name, set()).add(known)
        elif known is not None:
            seen.reports[name].append(_held(msg.in_flight))
        if holders.get(name) != msg.incarnation:
            # Its first hello to this router: what it lists ran for a predecessor (adoptable).
            seen.adoptable[name] |= _held(msg.in_flight)
        holders[name] = msg.incarnation
        incarnations[name] = msg.incarnation
        live.add(name)


def _held(report: dict[str, list[int]]) -> set[Key]:
    return {(p, cid) for p, ids in report.items() for cid in ids}


async def _await_welcome(sock: zmq.Socket[bytes], name: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while loop.time() < deadline:
        try:
            msg = decode_router_to_worker(sock.recv(zmq.NOBLOCK))
        except zmq.Again:
            await asyncio.sleep(0.001)
            continue
        if isinstance(msg, Welcome):
            return
    raise TimeoutError(f"{name} was not welcomed")
