"""``bench core``'s closed loop (also ``make bench-peers``'s and ``make test-compiled``'s smoke):
in both orders and both call sizes every credit is routed and completed exactly once, and the
``returns-first`` order really submits only after a round's completions."""

from __future__ import annotations

import pytest

from loadgen.bench import core
from router_service.core.router import RouterCore


@pytest.mark.parametrize("order", ["interleaved", "returns-first"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("kind", ["single_turn", "sticky_5_turn"])
def test_closed_loop_completes_every_credit_once(order: str, batch: int, kind: str) -> None:
    router = core._core(8, capacity=1000)
    credits = core._credits(kind, 2000, 64)
    assert core._closed_loop(router, credits, 64, batch, order) > 0
    assert router.stats.outcomes["completed"] == 2000
    assert router.stats.submitted == 2000
    assert not any(router.ledgers.values())


class _Spy(RouterCore):
    """Records the order of calls the loop makes."""

    calls: list[str]

    def submit(self, *args, **kw):  # type: ignore[no-untyped-def]
        self.calls.append("submit")
        return super().submit(*args, **kw)

    def complete(self, *args, **kw):  # type: ignore[no-untyped-def]
        self.calls.append("complete")
        return super().complete(*args, **kw)


def _calls(order: str) -> list[str]:
    spy = core._core(4, capacity=1000)
    spy.__class__ = _Spy
    spy.calls = []  # type: ignore[attr-defined]
    core._closed_loop(spy, core._credits("single_turn", 200, 16), 16, 1, order)
    return spy.calls  # type: ignore[attr-defined, no-any-return]


def test_returns_first_completes_a_round_before_submitting() -> None:
    interleaved, first = _calls("interleaved"), _calls("returns-first")
    # The first 16 submits fill the window; then the orders differ.
    assert interleaved[16:18] == ["complete", "submit"]
    assert first[16 : 16 + 16] == ["complete"] * 16
    assert sorted(interleaved) == sorted(first)
