"""``PeerSession``'s give-up rule for failed handshakes (rule 5 of ``credit_common.peer``).

A definite refusal (a key the router does not accept, a CURVE/plaintext mismatch) is final
after ``max_auth_failures`` in a row. A bare hang-up is also what a TCP proxy with no router
behind it does, so a streak of nothing but hang-ups is final only once it has lasted
``hangup_give_up_s``. A welcome or a successful handshake ends the streak.
"""

from __future__ import annotations

from hypothesis import given, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from credit_common.peer import PeerSession, PeerState

REFUSED_KEY = "the router does not accept this CURVE key"
HUNG_UP = "the router closed the connection during the handshake (Broken pipe)"


def joining(**kw: float) -> PeerSession:
    session = PeerSession(**kw)  # type: ignore[arg-type]
    session.start(0.0)
    return session


def test_definite_refusals_are_final_after_five_in_a_row() -> None:
    session = joining()
    results = [session.auth_failed(REFUSED_KEY, 0.1 * i) for i in range(5)]
    assert results == [False, False, False, False, True]
    assert session.state is PeerState.FAILED
    assert REFUSED_KEY in session.why
    assert "5 handshakes in a row" in session.why


def test_hangups_alone_are_not_final_before_the_give_up_time() -> None:
    # What a worker started before its router, behind a proxy, sees: many hang-ups a second.
    session = joining()
    for i in range(200):
        assert not session.auth_failed(HUNG_UP, 0.1 * i, hangup=True)
    assert session.state is PeerState.JOINING
    assert session.due(20.0) == "hello"  # still trying


def test_hangups_that_last_are_final_and_say_how_long() -> None:
    session = joining(hangup_give_up_s=60.0)
    t = 0.0
    while not session.auth_failed(HUNG_UP, t, hangup=True):
        t += 0.5
        assert t <= 60.0
    assert t == 60.0
    assert session.state is PeerState.FAILED
    assert "over 60 s" in session.why


def test_a_definite_refusal_among_hangups_makes_the_streak_final_at_five() -> None:
    session = joining()
    for i in range(4):
        assert not session.auth_failed(HUNG_UP, 0.1 * i, hangup=True)
    assert session.auth_failed(REFUSED_KEY, 0.5)
    assert HUNG_UP in session.why
    assert REFUSED_KEY in session.why


def test_a_successful_handshake_ends_the_streak() -> None:
    # A router that came up behind the proxy: its handshake succeeded, so the hang-ups before
    # it were no verdict on our keys.
    session = joining(hangup_give_up_s=1.0)
    for i in range(4):
        session.auth_failed(REFUSED_KEY, 0.1 * i)
    session.connected(0.5)
    for i in range(4):
        assert not session.auth_failed(REFUSED_KEY, 1.0 + 0.1 * i)
    assert session.auth_failures == 4


@given(st.lists(st.booleans(), min_size=1, max_size=40), st.floats(0.01, 5.0))
def test_final_exactly_when_the_rule_says(hangups: list[bool], step: float) -> None:
    session = joining(hangup_give_up_s=10.0)
    for i, hangup in enumerate(hangups):
        now = i * step
        final = session.auth_failed(HUNG_UP if hangup else REFUSED_KEY, now, hangup=hangup)
        seen = hangups[: i + 1]
        expect = len(seen) >= 5 and (not all(seen) or now >= 10.0)
        assert final is expect, (i, seen, now)
        if final:
            break


class HandshakeStreaks(RuleBasedStateMachine):
    """Failures, welcomes and successful handshakes in any order; the session is final exactly
    when the current streak (since the last welcome or handshake) meets rule 5."""

    def __init__(self) -> None:
        super().__init__()
        self.session = joining(max_auth_failures=5, hangup_give_up_s=3.0)
        self.now = 0.0
        self.streak: list[tuple[float, bool]] = []
        self.final = False

    @rule(dt=st.floats(0.0, 2.0), hangup=st.booleans())
    def fail(self, dt: float, hangup: bool) -> None:
        self.now += dt
        result = self.session.auth_failed(
            HUNG_UP if hangup else REFUSED_KEY, self.now, hangup=hangup
        )
        if self.final:
            assert result is False  # final stays final; no second verdict
            return
        self.streak.append((self.now, hangup))
        definite = any(not h for _, h in self.streak)
        lasted = self.now - self.streak[0][0]
        expect = len(self.streak) >= 5 and (definite or lasted >= 3.0)
        assert result is expect
        self.final = expect

    @rule(dt=st.floats(0.0, 2.0))
    def handshake_succeeded(self, dt: float) -> None:
        self.now += dt
        self.session.connected(self.now)
        if not self.final:
            self.streak.clear()

    @rule(dt=st.floats(0.0, 2.0))
    def welcomed(self, dt: float) -> None:
        self.now += dt
        self.session.welcomed("r-1", 1.0, self.now)
        if not self.final:
            self.streak.clear()

    @invariant()
    def state_matches(self) -> None:
        assert (self.session.state is PeerState.FAILED) is self.final
        if not self.final:
            assert self.session.auth_failures == len(self.streak)


TestHandshakeStreaks = HandshakeStreaks.TestCase


def test_the_report_of_the_welcomed_connection_is_not_a_reconnect() -> None:
    # The monitor is read whenever the loop gets to it: the handshake of the connection the
    # welcome came over may be reported after the welcome. Saying hello again then would leave
    # a peer rejoining for nothing (a worker so would not report its drain until re-welcomed).
    session = joining()
    assert session.due(0.0) == "hello"
    session.welcomed("r-1", 1.0, 0.1)
    assert not session.connected(0.2, reconnected=False)
    assert session.state is PeerState.READY
    assert session.due(0.3) is None
    # A connection that closed and came back is another matter: the router may be new.
    assert session.connected(0.4, reconnected=True)
    assert session.state is PeerState.REJOINING
    assert session.due(0.4) == "hello"
