"""A thin driver around RouterCore for unit tests: a hand-advanced clock and collected effects.

Every call goes straight to the core; the harness only remembers what came out, checks the
invariants of docs/ROUTING.md §7 after each call, and asserts exactly-once outcomes.
"""

from __future__ import annotations

import itertools
from typing import Any

from protocol import PROTOCOL_VERSION, BranchMode, Completion, Credit, Outcome, Status
from router_service.core.invariants import HistoryWitness, check_invariants
from router_service.core.router import RouterCore
from router_service.core.table import SessionTable

FORK = BranchMode.FORK
SPAWN = BranchMode.SPAWN


class Harness:
    """RouterCore plus a clock, the outcomes per credit and the dispatches per credit.

    Credits are producer ``"p"``'s unless a call names another ``producer``; ``outcomes`` and
    ``sent_to`` hold producer ``"p"``'s, ``by_producer`` everyone's. ``to_worker`` keeps the
    control messages, ``sends`` every item the core queued for workers, in order.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("protocol_version", PROTOCOL_VERSION)
        self.now = 0.0
        self.core = RouterCore(**kwargs)
        self.outcomes: dict[int, Outcome] = {}
        self.sent_to: dict[int, str] = {}
        self.to_worker: list[tuple[str, Any]] = []
        self.sends: list[tuple[str, Any]] = []
        self.by_producer: dict[tuple[str, int], Outcome] = {}
        self.sent_to_by: dict[tuple[str, int], str] = {}
        self.witness = HistoryWitness()
        self.to_producer: list[tuple[str, Any]] = []
        self.first_tokens: list[Any] = []
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self.submitted = 0

    # ---------------------------------------------------------------- plumbing
    @property
    def table(self) -> SessionTable:
        """Producer ``"p"``'s session table (made if it has none yet)."""
        return self.core.sessions.table("p")

    def _collect(self) -> None:
        fx = self.core.take_effects()
        self.witness.observe(self.core, fx)
        self.sends.extend(fx.to_worker)
        for worker, item in fx.to_worker:
            if isinstance(item, tuple):
                producer, credits = item
                for c in credits:
                    self.sent_to_by[producer, c.id] = worker
                    if producer == "p":
                        self.sent_to[c.id] = worker
            else:
                self.to_worker.append((worker, item))
        for producer, outs in fx.outcomes.items():
            for o in outs:
                key = (producer, o.credit_id)
                assert key not in self.by_producer, f"second outcome for {key}"
                self.by_producer[key] = o
                if producer == "p":
                    self.outcomes[o.credit_id] = o
        self.to_producer.extend(fx.to_producer)
        for outs in fx.first_tokens.values():
            self.first_tokens.extend(outs)
        check_invariants(self.core, submitted=self.submitted, outcomes=len(self.by_producer))

    def advance(self, dt: float) -> None:
        self.now += dt
        self.core.tick(self.now)
        self._collect()

    # ---------------------------------------------------------------- workers
    def join(self, name: str, capacity: int = 8, incarnation: str = "i1", **kw: Any) -> bool:
        ok = self.core.worker_hello(
            name,
            incarnation=incarnation,
            protocol_version=kw.pop("protocol_version", PROTOCOL_VERSION),
            capacity=capacity,
            labels=kw.pop("labels", {}),
            in_flight=kw.pop("in_flight", {}),
            now=self.now,
        )
        self._collect()
        return ok

    def seen(self, *names: str) -> None:
        for name in names:
            self.core.worker_seen(name, self.now)
        self._collect()

    # ---------------------------------------------------------------- credits
    def credit(self, session: str, **fields: Any) -> Credit:
        return Credit(id=next(self._ids), x_correlation_id=session, **fields)

    def submit(self, *credits: Credit, producer: str = "p") -> list[Credit]:
        # A duplicate of a credit still in progress is not a new credit (it is ignored).
        # (An adopted credit with the same id gives way to the submission: it is fresh.)
        fresh = {c.id for c in credits} - self._open_ids(producer)
        self.submitted += len(fresh)
        self.core.submit(producer, list(credits), self.now)
        self._collect()
        return list(credits)

    def _open_ids(self, producer: str = "p") -> set[int]:
        return {t.credit.id for t in self.core.ledgers.get(producer, {}).values() if not t.adopted}

    def send(self, session: str, producer: str = "p", **fields: Any) -> Credit:
        """Submit one credit and return it."""
        return self.submit(self.credit(session, **fields), producer=producer)[0]

    def complete(
        self,
        credit: Credit,
        status: Status = Status.COMPLETED,
        worker: str | None = None,
        producer: str = "p",
        **kw: Any,
    ) -> None:
        name = worker or self.sent_to_by[producer, credit.id]
        done = Completion(
            seq=next(self._seq), producer=producer, credit_id=credit.id, status=status, **kw
        )
        self.core.complete(name, [done], self.now)
        self._collect()

    def child_release(self, child: str, worker: str | None = None, producer: str = "p") -> None:
        """The child's worker releases it (another worker may be named to test refusals)."""
        if worker is None:
            table = self.core.table_of(producer)
            alias = table.aliases.get(child) if table is not None else None
            worker = alias.entry.worker.name if alias is not None else ""
        self.core.child_release(worker, producer, child, self.now)
        self._collect()

    def end_session(self, session: str, producer: str = "p") -> None:
        self.core.end_session(producer, session, self.now)
        self._collect()

    def release(self, session: str, count: int = 1, producer: str = "p") -> None:
        self.core.release_reservation(producer, session, count, self.now)
        self._collect()

    def cancel(self, *credits: Credit, producer: str = "p") -> None:
        self.core.cancel(producer, [c.id for c in credits], self.now)
        self._collect()

    def producer_gone(self, producer: str = "p") -> None:
        self.core.producer_gone(producer, self.now)
        self._collect()

    def closed(self, name: str) -> None:
        self.core.worker_closed(name, self.now)
        self._collect()

    def outcome(self, credit: Credit) -> Outcome:
        return self.outcomes[credit.id]

    def outcome_of(self, producer: str, credit_id: int) -> Outcome:
        return self.by_producer[producer, credit_id]

    def where(self, credit: Credit) -> str:
        return self.sent_to[credit.id]
