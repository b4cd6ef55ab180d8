"""A thin driver around RouterCore for unit tests: a hand-advanced clock and collected effects.

Every call goes straight to the core; the harness only remembers what came out, checks the
invariants of docs/ROUTING.md §7 after each call, and asserts exactly-once outcomes.
"""

from __future__ import annotations

import itertools
from typing import Any

from protocol import PROTOCOL_VERSION, BranchMode, Completion, Credit, Outcome, Status
from router_service.core.invariants import check_invariants
from router_service.core.router import RouterCore

FORK = BranchMode.FORK
SPAWN = BranchMode.SPAWN


class Harness:
    """RouterCore plus a clock, the outcomes per credit and the dispatches per credit."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("protocol_version", PROTOCOL_VERSION)
        self.now = 0.0
        self.core = RouterCore(**kwargs)
        self.outcomes: dict[int, Outcome] = {}
        self.sent_to: dict[int, str] = {}
        self.to_worker: list[tuple[str, Any]] = []
        self.to_producer: list[tuple[str, Any]] = []
        self.first_tokens: list[Any] = []
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self.submitted = 0

    # ---------------------------------------------------------------- plumbing
    def _collect(self) -> None:
        fx = self.core.take_effects()
        for worker, producer, credits in fx.dispatch:
            assert producer == "p"
            for c in credits:
                self.sent_to[c.id] = worker
        for producer, outs in fx.outcomes.items():
            assert producer == "p"
            for o in outs:
                assert o.credit_id not in self.outcomes, f"second outcome for {o.credit_id}"
                self.outcomes[o.credit_id] = o
        self.to_worker.extend(fx.to_worker)
        self.to_producer.extend(fx.to_producer)
        for outs in fx.first_tokens.values():
            self.first_tokens.extend(outs)
        check_invariants(self.core, submitted=self.submitted, outcomes=len(self.outcomes))

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

    def submit(self, *credits: Credit) -> list[Credit]:
        # A duplicate of a credit still in progress is not a new credit (it is ignored).
        fresh = {c.id for c in credits} - self._open_ids()
        self.submitted += len(fresh)
        self.core.submit("p", list(credits), self.now)
        self._collect()
        return list(credits)

    def _open_ids(self) -> set[int]:
        return {t.credit.id for t in self.core.ledgers.get("p", {}).values()}

    def send(self, session: str, **fields: Any) -> Credit:
        """Submit one credit and return it."""
        return self.submit(self.credit(session, **fields))[0]

    def complete(
        self,
        credit: Credit,
        status: Status = Status.COMPLETED,
        worker: str | None = None,
        **kw: Any,
    ) -> None:
        name = worker or self.sent_to[credit.id]
        done = Completion(
            seq=next(self._seq), producer="p", credit_id=credit.id, status=status, **kw
        )
        self.core.complete(name, [done], self.now)
        self._collect()

    def child_release(self, child: str, worker: str | None = None) -> None:
        """The child's worker releases it (another worker may be named to test refusals)."""
        if worker is None:
            alias = self.core.table.aliases.get(child)
            worker = alias.entry.worker.name if alias is not None else ""
        self.core.child_release(worker, child, self.now)
        self._collect()

    def end_session(self, session: str) -> None:
        self.core.end_session("p", session, self.now)
        self._collect()

    def release(self, session: str, count: int = 1) -> None:
        self.core.release_reservation(session, count, self.now)
        self._collect()

    def cancel(self, *credits: Credit) -> None:
        self.core.cancel("p", [c.id for c in credits], self.now)
        self._collect()

    def outcome(self, credit: Credit) -> Outcome:
        return self.outcomes[credit.id]

    def where(self, credit: Credit) -> str:
        return self.sent_to[credit.id]
