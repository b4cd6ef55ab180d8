"""A later turn of a session the router never saw (docs/PROTOCOL.md §7, ``session_unknown``).

Found by the restart chaos test (tests/integration/test_restart_chaos.py): after a router
restart, the next turn of every session begun under the old incarnation was routed as a new
session to the least-loaded worker and ran there without its history, although
``allow_migration`` was false — silently elsewhere, with a ``completed`` outcome.
"""

from __future__ import annotations

from protocol import Status
from tests.router_service.core.harness import Harness


def two_workers() -> Harness:
    h = Harness()
    h.join("w0")
    h.join("w1")
    return h


def test_later_turn_of_an_unknown_session_is_rejected_not_run_fresh() -> None:
    h = two_workers()
    turn = h.send("begun-elsewhere", turn_index=1, num_turns=3)
    assert turn.id not in h.sent_to, "it ran, without its history"
    assert (h.outcome(turn).status, h.outcome(turn).reason) == (
        Status.REJECTED,
        "session_unknown",
    )
    table = h.core.table_of("p")
    assert table is None or "begun-elsewhere" not in table.entries


def test_later_turn_of_an_unknown_session_migrates_when_allowed() -> None:
    h = two_workers()
    turn = h.send("begun-elsewhere", turn_index=1, num_turns=3, allow_migration=True)
    assert turn.id in h.sent_to
    assert h.core.stats.migrations == 1
    h.complete(turn)
    nxt = h.send("begun-elsewhere", turn_index=2, num_turns=3)
    assert h.where(nxt) == h.where(turn), "from then on it is sticky like any session"


def test_first_turns_still_start_sessions() -> None:
    h = two_workers()
    first = h.send("new", num_turns=2)
    h.complete(first)
    second = h.send("new", turn_index=1, num_turns=2)
    assert h.where(second) == h.where(first)
    assert h.core.stats.migrations == 0
