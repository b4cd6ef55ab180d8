"""Hostile frames against a real RouterService: it never crashes, never changes a load wrongly.

Each example starts a ``RouterService`` on loopback (``router_rig.Rig``: real sockets, workers
admitted by real ``Hello`` frames over real DEALERs, two producers), then feeds its frame
handlers a random sequence of wake-ups mixing legitimate traffic (submissions, completions of
credits really in flight) with everything a hostile or broken peer can send:

* arbitrary bytes, mutated valid frames, messages of the wrong direction, multipart messages,
  floods past the cut-off limit;
* completions (single, batched, ``Recovered``) for credits never sent, of another producer, of
  another worker, still queued, already finished, with ids and sequence numbers at the int64 and
  uint64 limits, and duplicated within a batch;
* child releases of unknown or foreign children, first tokens for unknown credits, in-flight
  reports with bogus ids, producers and omissions;
* second hellos with another capacity, incarnation, version or name, hellos from identities
  that have no connection, drains with NaN, infinite or negative deadlines, goodbyes at any time;
* producers submitting duplicate ids, self-contradicting credits, FORK children of unknown or
  of themselves, huge ``fork_count``s; cancelling unknown ids; ending and releasing sessions
  that are not theirs; saying hello again with another version; strangers that never did.

The rig judges every step (see its docstring): no exception, no ``internal_error``, docs/ROUTING.md
§7, every change of a worker's in-flight set justified by that worker's own messages, every
outcome for an open credit, and at the end (after a shutdown) exactly one outcome per credit.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec
import pytest
import zmq
from hypothesis import given, strategies as st

from protocol import PROTOCOL_VERSION
from protocol.codec import encode
from protocol.messages import (
    BranchMode,
    CancelCredits,
    ChildRelease,
    Completion,
    CompletionBatch,
    Credit,
    Dispatch,
    Draining,
    EndSession,
    FirstToken,
    Goodbye,
    Heartbeat,
    Hello,
    InFlightReport,
    ProducerHello,
    Recovered,
    ReleaseReservation,
    Status,
    Submit,
    SubmitBatch,
)
from tests.fuzz.profiles import budget
from tests.fuzz.router_rig import ROUTER_INCARNATION, Key, Rig

pytestmark = pytest.mark.integration

T = TypeVar("T")
U = TypeVar("U")

WORKERS = ("w0", "w1")
PRODUCERS = (b"p/1", b"q/1")
STRANGE_WORKERS = (b"ghost", b"w9", b"\xff\xfe", b"\x00k\x8bEg", b"p/1", b"w0 ")
"""Worker-socket identities with no connection behind them (one is a producer's identity)."""
STRANGE_PRODUCERS = (b"nobody/0", b"w0", b"\xff")
ROOTS = ("s0", "s1", "s2")
KIDS = ("k0", "k1", "k2")
SPAWNS = ("a0", "a1")
SESSIONS = (*ROOTS, *KIDS, *SPAWNS, "", "z" * 256)
NEVER = 10**15
"""Credit ids from here on are never submitted: only ``Recovered`` names them."""
EDGE_INTS = (0, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63))
ODD_FLOATS = (0.0, -1.0, 1e300, math.inf, -math.inf, math.nan)
STATUSES = tuple(Status)


class Fuzzer:
    """Draws one wake-up at a time from the rig's current state."""

    def __init__(self, rig: Rig, data: st.DataObject) -> None:
        self.rig = rig
        self.data = data
        self.ids = {p.decode(): itertools.count(1) for p in PRODUCERS}
        self.issued: dict[str, int] = {}
        """Producer -> the last fresh id it was given (claims of the next ones are drawn)."""
        self.never = itertools.count(NEVER)
        self.seq = dict.fromkeys(WORKERS, 0)
        self.incarnations = itertools.count(1)

    # ------------------------------------------------------------------- drawing

    def draw(self, strategy: st.SearchStrategy[T], label: str | None = None) -> T:
        return self.data.draw(strategy, label=label)

    def pick(self, options: Sequence[T], label: str | None = None) -> T:
        return self.draw(st.sampled_from(options), label)

    def chance(self, percent: int = 50) -> bool:
        return self.draw(st.integers(0, 99)) < percent

    def choose(self, options: Sequence[T], default: U, label: str | None = None) -> T | U:
        """One of ``options`` (which depend on the router's state), or ``default`` if none.

        Always one integer draw, whatever the state: the core iterates some sets of objects in
        address order, so a replayed example may see a slightly different state, and the
        *shape* of its draws must not depend on it (Hypothesis would call that flaky).
        """
        i = self.draw(st.integers(0, 2**16 - 1), label)
        return options[i % len(options)] if options else default

    def some(self, options: Sequence[T], most: int) -> list[T]:
        """Up to ``most`` of ``options`` (repeats allowed), in a state-independent shape."""
        n = self.draw(st.integers(1, most))
        picked = [self.choose(options, None) for _ in range(n)]
        return [x for x in picked if x is not None]

    def completions(self, name: str, keys: Sequence[Key | None]) -> list[Completion]:
        """Completions of ``keys`` (``None``: skipped), each drawn whether skipped or not."""
        drawn = [self.completion(name, key or ("", 0)) for key in keys]
        return [c for c, key in zip(drawn, keys, strict=True) if key is not None]

    # -------------------------------------------------------------------- a step

    def step(self) -> None:
        kind = self.pick(
            [
                "submit",
                "submit",
                "complete",
                "complete",
                "workers",
                "workers",
                "producers",
                "recovered",
                "multipart",
                "flood",
                "reports",
                "misdirected",
                "adoption",
                "tick",
            ],
            "step",
        )
        rig = self.rig
        if kind == "submit":
            rig.producer_frames([self.submit(self.pick(PRODUCERS))])
        elif kind == "complete":
            rig.worker_frames([self.complete_legit()])
        elif kind == "workers":
            n = self.draw(st.integers(1, 4))
            rig.worker_frames([self.worker_frame() for _ in range(n)])
        elif kind == "producers":
            n = self.draw(st.integers(1, 4))
            rig.producer_frames([self.producer_frame() for _ in range(n)])
        elif kind == "recovered":
            rig.worker_frames([self.recovered()])  # alone: see ``recovered``
        elif kind == "multipart":
            worker = self.chance()
            pool: tuple[str | bytes, ...] = (
                (*WORKERS, *STRANGE_WORKERS) if worker else (*PRODUCERS, *STRANGE_PRODUCERS)
            )
            identity = self._identity(self.pick(pool))
            for _ in range(self.draw(st.integers(1, 3))):
                rig.malformed(identity, worker=worker)
        elif kind == "flood":
            self.flood()
        elif kind == "misdirected":
            rig.worker_frames(self.misdirected())
        elif kind == "adoption":
            rig.worker_frames(self.adoption())
        elif kind == "reports":
            # Two in-flight reports that leave the same credits out: they end lost: orphaned.
            name = self.pick(WORKERS)
            frame = (name.encode(), self.inflight(name, "subset"))
            rig.worker_frames([frame])
            rig.worker_frames([frame])
        else:
            rig.tick()

    def flood(self) -> None:
        """Invalid frames past (or nearly at) the cut-off limit, from one identity."""
        worker = self.chance()
        pool: tuple[str | bytes, ...] = (
            (*WORKERS, *STRANGE_WORKERS) if worker else (*PRODUCERS, *STRANGE_PRODUCERS)
        )
        identity = self._identity(self.pick(pool))
        count = self.pick([40, 60, 99, 100, 101, 150])
        frames = [(identity, b"\xc1")] * count
        if worker:
            self.rig.worker_frames(frames)
        else:
            self.rig.producer_frames(frames)

    @staticmethod
    def _identity(name: str | bytes) -> bytes:
        return name.encode() if isinstance(name, str) else name

    # ---------------------------------------------------------------- producers

    def new_id(self, producer: str) -> int:
        counter = self.ids.setdefault(producer, itertools.count(1))
        style = self.pick(["fresh"] * 8 + ["open", "ended", "huge"], "id")
        open_ids = [cid for p, cid in self.rig.open_credits() if p == producer]
        ended = sorted(cid for p, cid in self.rig.ever_submitted if p == producer and cid < NEVER)
        old = self.choose(open_ids if style == "open" else ended, None)
        huge = self.pick([2**63 - 1, -(2**63), -1])
        if style in ("open", "ended") and old is not None:
            return old
        n = next(counter)
        self.issued[producer] = n
        if style == "huge":
            return huge - n if huge > 0 else huge + n
        return n

    def credit(self, producer: str) -> Credit:
        cid = self.new_id(producer)
        shape = self.pick(["root", "root", "fork", "spawn", "odd"], "shape")
        common: dict[str, Any] = {
            "id": cid,
            "allow_migration": self.chance(),
            "cancel_after_s": self.pick([None, None, 1.0, math.nan, -1.0]),
            "payload": self.pick([b"", b"x", bytes(range(256))]),
        }
        if shape == "root":
            num_turns = self.draw(st.integers(1, 3))
            return Credit(
                x_correlation_id=self.pick(ROOTS),
                turn_index=self.draw(st.integers(0, num_turns - 1)),
                num_turns=num_turns,
                fork_count=self.pick([0, 0, 1, 2]),
                **common,
            )
        if shape == "fork":
            return Credit(
                x_correlation_id=self.pick(KIDS + ROOTS[:1]),
                parent_correlation_id=self.pick(ROOTS + KIDS),
                branch_mode=BranchMode.FORK,
                turn_index=self.pick([0, 0, 1]),
                num_turns=self.pick([1, 2]),
                fork_count=self.pick([0, 0, 1]),
                agent_depth=1,
                **common,
            )
        if shape == "spawn":
            return Credit(
                x_correlation_id=self.pick(SPAWNS),
                parent_correlation_id=self.pick((*ROOTS, *SPAWNS, None)),
                branch_mode=BranchMode.SPAWN,
                subagent_type=self.pick([None, "Explore"]),
                num_turns=self.pick([1, 2]),
                **common,
            )
        return Credit(  # self-contradicting or extreme, on purpose
            x_correlation_id=self.pick(SESSIONS),
            turn_index=self.pick([0, 3, -1, 2**63 - 1]),
            num_turns=self.pick([1, 0, -5, 2**63 - 1]),
            fork_count=self.pick([0, -1, 2**63 - 1]),
            branch_mode=self.pick([None, BranchMode.FORK, BranchMode.SPAWN]),
            parent_correlation_id=self.pick([None, "", "s0", "k0"]),
            subagent_type=self.pick([None, "Explore"]),
            **common,
        )

    def submit(self, identity: bytes) -> tuple[bytes, bytes]:
        producer = identity.decode("utf-8", "replace")
        credits = [self.credit(producer) for _ in range(self.draw(st.integers(1, 4)))]
        if len(credits) == 1 and self.chance():
            return identity, encode(Submit(credit=credits[0]))
        return identity, encode(SubmitBatch(credits=credits))

    def producer_frame(self) -> tuple[bytes, bytes]:
        identity = self.pick(PRODUCERS * 4 + STRANGE_PRODUCERS, "producer")
        producer = identity.decode("utf-8", "replace")
        kind = self.pick(
            ["submit", "cancel", "cancel_all", "end", "release", "hello", "beat", "garbage"],
            "producer message",
        )
        if kind == "submit":
            return self.submit(identity)
        if kind in ("cancel", "cancel_all"):
            mine = [cid for p, cid in self.rig.open_credits() if p == producer]
            pool = mine + sorted(cid for _, cid in self.rig.ever_submitted) + [*EDGE_INTS, 10**9]
            some = self.some(pool, 6)
            ids = mine if kind == "cancel_all" else some
            return identity, encode(CancelCredits(credit_ids=ids))
        if kind == "end":
            reason = self.pick(["", "done", "r" * 4096])
            return identity, encode(EndSession(x_correlation_id=self.pick(SESSIONS), reason=reason))
        if kind == "release":
            count = self.pick([1, 1, 2, 0, *EDGE_INTS])
            msg = ReleaseReservation(x_correlation_id=self.pick(SESSIONS), count=count)
            return identity, encode(msg)
        if kind == "hello":
            version = self.pick([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, 2**64 - 1])
            # The same producer saying hello again (the rig's model keys a producer by its
            # identity, NAME/INCARNATION); a new incarnation is a new producer, which the
            # pair tier and the core's state machine cover.
            name, _, incarnation = identity.decode("utf-8", "replace").partition("/")
            hello = ProducerHello(producer=name, protocol_version=version, incarnation=incarnation)
            return identity, encode(hello)
        if kind == "beat":
            return identity, encode(Heartbeat(sent_at_s=self.pick(ODD_FLOATS)))
        return identity, self.garbage(worker=False)

    # ------------------------------------------------------------------ workers

    def complete_legit(self) -> tuple[bytes, bytes]:
        """Completions of credits really in flight on the worker that sends them."""
        busy = [w for w in WORKERS if self.rig.held(w)]
        name = self.choose(busy, WORKERS[0], "worker")
        held = self.rig.held(name)
        n = self.draw(st.integers(1, 3))
        done = self.completions(name, [self.choose(held, None) for _ in range(n)])
        single = self.chance()
        if not done:
            return name.encode(), encode(Heartbeat())
        if len(done) == 1 and single:
            return name.encode(), encode(done[0])
        return name.encode(), encode(CompletionBatch(completions=done))

    def completion(self, name: str | None, key: Key) -> Completion:
        """A completion of ``key``: in ``seq`` order for a real worker, now and then not."""
        edge = self.pick(EDGE_INTS)
        odd = self.chance(10)  # a sequence number at the int64/uint64 edge, or going back
        if name in self.seq and not odd:
            self.seq[name] += 1
            seq = self.seq[name]
        else:
            seq = edge
        status = self.pick([Status.COMPLETED] * 3 + list(STATUSES), "status")
        return Completion(
            seq=seq,
            producer=key[0],
            credit_id=key[1],
            status=status,
            reason="" if status is Status.COMPLETED else self.pick(["x", "r" * 4096]),
            ttft_s=self.pick([None, 0.1, math.nan]),
            duration_s=self.pick([None, 1.0, -math.inf]),
            session_ended=self.chance(),
            result=self.pick([b"", b"{}"]),
        )

    def hostile_key(self, *, ended: bool = True) -> Key:
        """A credit key a worker should not complete: someone else's, queued, unknown, odd."""
        rig = self.rig
        held = [k for w in WORKERS for k in rig.held(w)]
        queued = [k for w in WORKERS for k in rig.queued_on(w)]
        queued += [k for k in rig.open_credits() if k not in held]
        finished = sorted(k for k in rig.ever_submitted if k not in set(rig.open_credits()))
        pools: list[list[Key]] = [held, queued, finished if ended else []]
        kind = self.pick(["known", "never", "odd"], "key")
        known = self.choose(self.pick(pools), None)
        swap = self.chance(20)  # the right id of another producer
        never = (self.pick(PRODUCERS).decode(), next(self.never))
        odd = (self.pick(["nobody/0", "", "p/1", "z" * 256]), self.pick([*EDGE_INTS, NEVER - 1]))
        if kind == "known" and known is not None:
            producer, cid = known
            if swap:
                producer = "q/1" if producer == "p/1" else "p/1"
            return producer, cid
        if kind == "odd":
            return odd
        rig.recoverable.add(never)
        return never

    def worker_frame(self) -> tuple[bytes, bytes]:
        legit = self.chance(75)
        identity = self.pick(WORKERS).encode() if legit else self.pick(STRANGE_WORKERS)
        name = identity.decode("utf-8", "replace")
        kind = self.pick(
            [
                "complete",
                "hostile",
                "first_token",
                "child_release",
                "inflight",
                "hello",
                "draining",
                "goodbye",
                "beat",
                "garbage",
            ],
            "worker message",
        )
        makers: dict[str, Callable[[str], bytes]] = {
            "hostile": self.hostile_completions,
            "first_token": self.first_token,
            "child_release": lambda _: encode(ChildRelease(x_correlation_id=self.pick(SESSIONS))),
            "inflight": self.inflight,
            "hello": self.hello,
            "draining": lambda _: encode(Draining(deadline_s=self.pick((30.0, *ODD_FLOATS)))),
            "goodbye": lambda _: encode(Goodbye(reason=self.pick(["", "drained"]))),
            "beat": lambda _: encode(Heartbeat(sent_at_s=self.pick(ODD_FLOATS))),
            "garbage": lambda _: self.garbage(worker=True),
        }
        if kind == "complete":
            return self.complete_legit()
        if kind == "goodbye" and self.chance(70):
            kind = "beat"  # keep workers around long enough to matter
        return identity, makers[kind](name)

    def misdirected(self) -> list[tuple[bytes, bytes]]:
        """A worker reports credits another worker holds, or that still wait in a queue."""
        name = self.pick(WORKERS, "liar")
        others = [k for w in WORKERS if w != name for k in self.rig.held(w)]
        waiting = [k for w in WORKERS for k in self.rig.queued_on(w)]
        waiting += [k for k in self.rig.open_credits() if k not in others and k not in waiting]
        keys = [self.choose(self.pick([others, waiting, others + waiting]), None) for _ in range(2)]
        own = self.choose(self.rig.held(name), None) if self.chance(30) else None
        done = self.completions(name, [keys[0], own, keys[1]])
        if self.chance(30):
            done += [msgspec.structs.replace(c, producer=_other(c.producer)) for c in done]
        frames = [(name.encode(), encode(CompletionBatch(completions=done)))]
        tokens = [FirstToken(producer=k[0], credit_id=k[1], ttft_s=0.5) for k in keys if k]
        at = self.draw(st.integers(0, 1))
        if self.chance() and tokens:  # a first token for one of them, before or after
            frames.insert(at, (name.encode(), encode(tokens[0])))
        return frames

    def hostile_completions(self, name: str) -> bytes:
        n = self.draw(st.integers(1, 3))
        done = [self.completion(name, self.hostile_key()) for _ in range(n)]
        real, twice = self.chance(30), self.chance(30)
        key = self.choose(self.rig.held(name), None)
        pair = self.completions(name, [key, key])
        if real and pair:  # a real one in the middle, and maybe twice
            done.insert(1, pair[0])
            if twice:
                done.append(pair[1])
        if len(done) == 1:
            return encode(done[0])
        return encode(CompletionBatch(completions=done))

    def recovered(self) -> tuple[bytes, bytes]:
        """``Recovered``, alone in its wake-up (so no other frame finishes a credit it names).

        From an earlier router incarnation, it names credits this router never had (forwarded
        to their producer, which de-duplicates: docs/PROTOCOL.md), or credits it has (ordinary
        completions, or misdirected ones) — never one it already finished: that would be
        forwarded as a second outcome, which only the producer can recognise. Naming this
        router's own incarnation (a confused worker), anything goes: it is a plain batch of
        completions, and nothing may be forwarded.
        """
        name = self.pick(WORKERS)
        rig = self.rig
        ours = self.chance(25)
        n = self.draw(st.integers(1, 3))
        drawn: list[Key | None] = [self.hostile_key(ended=ours) for _ in range(n)]
        real = self.chance()
        drawn.append(self.choose(self.rig.held(name), None) if real else None)
        incarnation = ROUTER_INCARNATION if ours else self.pick(["r-old", "", "z" * 256])
        open_now = set(rig.open_credits())
        if ours:
            rig.recoverable.difference_update(drawn)  # nothing of this frame may be forwarded
            keys = drawn
        else:
            keys = [k if k in open_now or k not in rig.ever_submitted else None for k in drawn]
            rig.recoverable.update(k for k in keys if k is not None and k not in open_now)
        done = self.completions(name, keys)
        return name.encode(), encode(Recovered(router_incarnation=incarnation, completions=done))

    def first_token(self, name: str) -> bytes:
        producer, cid = self.hostile_key()
        real = self.chance(30)
        key = self.choose(self.rig.held(name), None)
        if real and key is not None:
            producer, cid = key
        ttft = self.pick([0.25, *ODD_FLOATS])
        return encode(FirstToken(producer=producer, credit_id=cid, ttft_s=ttft))

    def inflight(self, name: str, mode: str | None = None) -> bytes:
        held = self.rig.held(name)
        if mode is None:
            mode = self.pick(["truth", "truth+bogus", "subset", "bogus"], "report")
        mask = self.draw(st.integers(0, 2**16 - 1), "kept")
        bogus = [self.hostile_key() for _ in range(self.draw(st.integers(1, 3)))]
        keys = list(held)
        if mode == "subset":
            keys = [k for i, k in enumerate(held) if mask >> (i % 16) & 1]
        elif mode == "truth+bogus":
            keys += bogus
        elif mode == "bogus":
            keys = bogus
        report: dict[str, list[int]] = {}
        for producer, cid in keys:
            report.setdefault(producer, []).append(cid)
        return encode(InFlightReport(credits=report))

    def hello(self, name: str) -> bytes:
        worker = self.rig.core.workers.get(name)
        incarnation = worker.incarnation if worker is not None else f"{name}-i0"
        variant = self.pick(
            ["same", "same", "capacity", "incarnation", "version", "name", "report", "claims"],
            "hello",
        )
        fields: dict[str, Any] = {
            "name": name,
            "incarnation": incarnation,
            "protocol_version": PROTOCOL_VERSION,
            "capacity": worker.capacity if worker is not None else 2,
            "labels": self.pick([{}, {"gpu": "H100"}, {f"k{i}": "v" * 4096 for i in range(64)}]),
        }
        if variant == "capacity":
            fields["capacity"] = self.pick([1, 2, 4, 0, -1, 2**63 - 1, 2**64 - 1])
        elif variant in ("incarnation", "claims"):
            # A new incarnation (or a first hello of a name): what it lists is adopted if the
            # router has no record of it, whatever it is.
            fields["incarnation"] = self.pick(["new", "", "z" * 256, "newer"])
            if variant == "claims":
                fields["in_flight"] = self.claims()
        elif variant == "version":
            fields["protocol_version"] = self.pick([0, 2, 2**64 - 1, -(2**63)])
        elif variant == "name":
            fields["name"] = self.pick(["w1", "ghost", "", name.upper()])
        elif variant == "report":
            report: dict[str, list[int]] = {}
            for producer, cid in [self.hostile_key() for _ in range(2)] + self.rig.held(name):
                report.setdefault(producer, []).append(cid)
            fields["in_flight"] = report
        return encode(Hello(**fields))

    def adoption(self) -> list[tuple[bytes, bytes]]:
        """A worker comes back as if the router had restarted: maybe a goodbye first, then a
        first hello of a new incarnation listing claims (adopted if the router has no record
        of them), maybe followed in the same wake-up by a completion of a claim (as
        ``Recovered`` or plain), a repeat of it, or a goodbye."""
        name = self.pick([*WORKERS, "ghost"], "adopter")
        identity = name.encode()
        frames: list[tuple[bytes, bytes]] = []
        if self.chance(60):
            frames.append((identity, encode(Goodbye(reason="drained"))))
        worker = self.rig.core.workers.get(name)
        capacity = self.pick([1, 2, 3])  # (drawn whatever the state: see ``choose``)
        claims = self.claims()
        hello = Hello(
            name=name,
            incarnation=f"{name}-a{next(self.incarnations)}",
            protocol_version=PROTOCOL_VERSION,
            capacity=worker.capacity if worker is not None else capacity,
            in_flight=claims,
        )
        frames.append((identity, encode(hello)))
        # A completion of a claim that is not adopted (the hello refused, the worker full) is
        # forwarded as an earlier router's (see ``recovered``): never one of a credit that
        # already ended here, which only its producer could tell from a second outcome — nor
        # one this worker holds, which its goodbye or new incarnation ends before that.
        open_now = set(self.rig.open_credits())
        ever = self.rig.ever_submitted
        mine = set(self.rig.held(name))
        keys = [(p, c) for p, ids in claims.items() for c in ids]
        keys = [k for k in keys if (k in open_now and k not in mine) or k not in ever]
        after = self.pick(["none", "recovered", "completion", "twice", "goodbye"], "then")
        if after != "none" and after != "goodbye":
            key = self.choose(keys, None)
            if key is not None and key not in open_now and after != "completion":
                self.rig.recoverable.add(key)
            done = self.completions(name, [key])
            if after == "completion":
                frames += [(identity, encode(c)) for c in done]
            else:
                frame = encode(Recovered(router_incarnation="r-old", completions=done))
                frames += [(identity, frame)] * (2 if after == "twice" else 1)
        elif after == "goodbye":
            frames.append((identity, encode(Goodbye(reason=""))))
        return frames

    def claims(self) -> dict[str, list[int]]:
        """A first hello's in-flight map: credits a predecessor router may have dispatched, as
        a confused or hostile worker lists them — ids its producers will submit next, credits
        in flight elsewhere or queued, ended ones, never-submitted ones, odd ones, repeats."""
        keys: list[Key] = []
        for _ in range(self.draw(st.integers(1, 4))):
            producer = self.pick(PRODUCERS).decode()
            if self.chance(40):
                keys.append((producer, self.issued.get(producer, 0) + self.draw(st.integers(1, 3))))
            else:
                keys.append(self.hostile_key())
        if keys and self.chance(20):
            keys.append(keys[0])
        report: dict[str, list[int]] = {}
        for producer, cid in keys:
            report.setdefault(producer, []).append(cid)
        return report

    def garbage(self, *, worker: bool) -> bytes:
        kind = self.pick(["bytes", "flip", "wrong_direction", "truncated"], "garbage")
        if kind == "bytes":
            return self.draw(st.binary(max_size=40))
        example = encode(
            CompletionBatch(
                completions=[
                    Completion(seq=1, producer="p/1", credit_id=1, status=Status.COMPLETED)
                ]
            )
            if worker
            else SubmitBatch(credits=[Credit(id=1, x_correlation_id="s0")])
        )
        if kind == "wrong_direction":
            return encode(Dispatch(producer="p/1", credit=Credit(id=1, x_correlation_id="s0")))
        if kind == "truncated":
            return example[: self.draw(st.integers(0, len(example) - 1))]
        frame = bytearray(example)
        for _ in range(self.draw(st.integers(1, 3))):
            at = self.draw(st.integers(0, len(frame) - 1))
            frame[at] = self.draw(st.integers(0, 255))
        return bytes(frame)


def _other(producer: str) -> str:
    return "q/1" if producer == "p/1" else "p/1"


_CONFIGS = st.fixed_dictionaries(
    {
        "queue_limit": st.sampled_from([2, 100_000]),
        "worker_queue_limit": st.sampled_from([1, 10_000]),
        "max_sessions": st.sampled_from([2, 1_000_000]),
        "soft_affinity_gap": st.sampled_from([None, 0.3]),
        "spawn_affinity_slack": st.sampled_from([None, 0.5]),
        "sticky": st.sampled_from([True, True, False]),
    }
)


async def _run(ctx: zmq.Context[zmq.Socket[bytes]], data: st.DataObject, steps: int) -> Rig:
    capacities = {w: data.draw(st.integers(1, 3), label=f"capacity {w}") for w in WORKERS}
    config = data.draw(_CONFIGS, label="config")
    rig = await Rig.start(
        ctx,
        capacities,
        PRODUCERS,
        heartbeat_interval_s=1_000.0,  # no liveness verdicts from the wall clock
        lost_after_s=10_000.0,
        **config,
    )
    try:
        fuzzer = Fuzzer(rig, data)
        for _ in range(data.draw(st.integers(1, steps), label="steps")):
            fuzzer.step()
        await rig.finish()
    finally:
        await rig.close()
    return rig


@given(data=st.data())
@budget(100)
def test_router_survives_hostile_peers(
    zmq_ctx: zmq.Context[zmq.Socket[bytes]], runner: asyncio.Runner, data: st.DataObject
) -> None:
    runner.run(_run(zmq_ctx, data, steps=40))
