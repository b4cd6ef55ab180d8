"""The peer side of a conversation with the router, as a pure state machine (sans I/O).

The worker agent and the producer client (``RouterClient``) speak the same session protocol to
the router (docs/PROTOCOL.md §5.1, §5.6, §6): say hello, wait for a welcome, beat, notice that
the router went silent or forgot us, say hello again with back-off, notice that the router
restarted (a new router incarnation), give up on a refusal or on repeated authentication
failures. This module is that protocol, once, in the shape of h11's ``Connection``: the caller
feeds it events (``received``, ``welcomed``, ``error_report``, ``refused``, ``connected``,
``auth_failed``) with the time passed in, and asks it what to send now (``due``). It never
reads a clock, never touches a socket and never awaits.

The rules (docs/PROTOCOL.md §5.6, "when to say hello again"):

1. Until welcomed, send ``Hello`` at once, then paced by a back-off with jitter
   (``rehello_initial_s`` doubling to ``rehello_max_s``).
2. Once welcomed (``READY``), any frame from the router is a heartbeat; send a ``Heartbeat``
   when nothing else left for a heartbeat interval.
3. Say hello again (``REJOINING``, same incarnation: the router keeps whatever it still holds)
   when the router was silent for ``silence_beats`` intervals; at once on an ``ErrorReport``
   whose code says the router does not know us (``hello_required``, ``unknown_worker``,
   ``unknown_producer``); and at once when the transport reports that the connection was
   re-established (the router may be a new process) — not for the report of the connection
   the welcome came over, which may be read after the welcome.
4. A welcome naming another router incarnation than the last one means the router restarted:
   ``welcomed`` returns the previous incarnation so the caller can recover what the old one
   held.
5. A ``Refusal`` is final (``REFUSED``). ``max_auth_failures`` failed CURVE handshakes in a row
   with no welcome or successful handshake in between are final too (``FAILED``): a key the
   router does not accept will not be accepted on the next try either. A *hang-up* (the far end
   closed the connection mid-handshake without saying why) is weaker evidence: it is also what
   a TCP proxy or load balancer with no router behind it does, and what a router killed
   mid-handshake does, so a streak of nothing but hang-ups is final only once it has lasted
   ``hangup_give_up_s`` (a wrong router public key looks exactly like this, and is reported
   in words on every rate-limited warning meanwhile).
"""

from __future__ import annotations

import enum
import random
from typing import Final

__all__ = [
    "REJOIN_CODES",
    "Backoff",
    "Liveness",
    "PeerSession",
    "PeerState",
]

REJOIN_CODES: Final = frozenset({"hello_required", "unknown_worker", "unknown_producer"})
"""``ErrorReport`` codes that mean "this router does not know you": say hello again at once."""


class PeerState(enum.Enum):
    """Where the peer stands with the router."""

    JOINING = "joining"
    """Hello sent, no welcome yet (first join)."""
    READY = "ready"
    """Welcomed by ``router_incarnation``."""
    REJOINING = "rejoining"
    """Was welcomed; the router went silent or forgot us; saying hello again."""
    REFUSED = "refused"
    """The router refused us (final)."""
    FAILED = "failed"
    """Authentication kept failing (final)."""
    CLOSED = "closed"
    """The caller closed the session."""


class Backoff:
    """Exponential back-off with jitter (re-hello pacing).

    Args:
        initial_s: the first delay.
        max_s: the cap.
        factor: growth per attempt.
        jitter: each delay is scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that
            a fleet of peers does not re-hello in lock-step after a router restart.
        rng: the source of randomness (seeded in tests).
    """

    def __init__(
        self,
        initial_s: float = 1.0,
        max_s: float = 10.0,
        *,
        factor: float = 2.0,
        jitter: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        if initial_s <= 0 or max_s < initial_s or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("need 0 < initial_s <= max_s, factor >= 1 and 0 <= jitter < 1")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._current = initial_s

    def next(self) -> float:
        """The delay before the next attempt; each call grows the following one."""
        delay = self._current
        self._current = min(self.max_s, self._current * self.factor)
        if self.jitter:
            delay *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return delay

    def reset(self) -> None:
        """Start again from ``initial_s`` (after a success)."""
        self._current = self.initial_s


class Liveness:
    """Heartbeat bookkeeping, by deadlines: any frame counts as a beat.

    Args:
        heartbeat_interval_s: from the welcome.
        silence_beats: the router is presumed gone after this many silent intervals.
    """

    def __init__(self, heartbeat_interval_s: float = 1.0, silence_beats: int = 3) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.silence_beats = silence_beats
        self.last_rx = 0.0
        self.last_tx = 0.0

    def restart(self, heartbeat_interval_s: float, now: float) -> None:
        """A new welcome: adopt its interval and count both directions from ``now``."""
        self.heartbeat_interval_s = heartbeat_interval_s
        self.last_rx = now
        self.last_tx = now

    def received(self, now: float) -> None:
        """Something arrived from the router."""
        self.last_rx = now

    def sent(self, now: float) -> None:
        """Something was sent to the router."""
        self.last_tx = now

    def heartbeat_due(self, now: float) -> bool:
        """Nothing was sent for a whole interval."""
        return now - self.last_tx >= self.heartbeat_interval_s

    def silent_for(self, now: float) -> float:
        """Seconds since the router was last heard."""
        return now - self.last_rx

    def router_gone(self, now: float) -> bool:
        """The router was silent for ``silence_beats`` intervals."""
        return now - self.last_rx > self.silence_beats * self.heartbeat_interval_s


HELLO: Final = "hello"
HEARTBEAT: Final = "heartbeat"


class PeerSession:
    """One peer's session with the router (see the module docstring for the rules).

    Args:
        heartbeat_interval_s: the beat until a welcome says otherwise.
        silence_beats: silent intervals after which the router is presumed gone.
        rehello_initial_s: the first re-hello delay.
        rehello_max_s: the longest re-hello delay (keep it short: a restarted router should
            have its peers back within about a second).
        max_auth_failures: failed handshakes in a row, with no welcome, before giving up.
        hangup_give_up_s: how long a streak of hang-ups only (no definite refusal among them)
            must last before it counts as final (see rule 5).
        rng: randomness for the back-off jitter (seeded in tests).
    """

    def __init__(
        self,
        *,
        heartbeat_interval_s: float = 1.0,
        silence_beats: int = 3,
        rehello_initial_s: float = 0.25,
        rehello_max_s: float = 1.0,
        max_auth_failures: int = 5,
        hangup_give_up_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        if silence_beats < 1 or max_auth_failures < 1:
            raise ValueError("silence_beats and max_auth_failures must be >= 1")
        if hangup_give_up_s < 0:
            raise ValueError("hangup_give_up_s must be >= 0")
        self.state = PeerState.JOINING
        self.router_incarnation: str | None = None
        """The incarnation of the router that last welcomed us."""
        self.liveness = Liveness(heartbeat_interval_s, silence_beats)
        self.backoff = Backoff(rehello_initial_s, rehello_max_s, rng=rng)
        self.max_auth_failures = max_auth_failures
        self.hangup_give_up_s = hangup_give_up_s
        self.auth_failures = 0
        """Failed handshakes since the last welcome or successful handshake."""
        self._streak_since: float | None = None
        """When the current streak of failed handshakes began."""
        self._streak_definite = False
        """Whether the streak holds a definite refusal (not only hang-ups)."""
        self.why: str = ""
        """Why the session is REFUSED, FAILED, or last went REJOINING (for logs)."""
        self.refusal_code: str = ""
        self.rehellos = 0
        """Hellos sent after the first welcome (re-joins)."""
        self.restarts = 0
        """Welcomes that named a new router incarnation."""
        self._next_hello_at: float | None = None
        self._hello_unsent = False
        self._auth_reasons: list[str] = []
        """The distinct reasons of the failed handshakes since the last welcome."""

    def __repr__(self) -> str:
        return f"<PeerSession {self.state.value} router={self.router_incarnation}>"

    # ------------------------------------------------------------------------- state

    @property
    def ready(self) -> bool:
        """Welcomed, and the router has not gone silent or forgotten us since."""
        return self.state is PeerState.READY

    @property
    def final(self) -> bool:
        """Refused, failed or closed: nothing more will be sent."""
        return self.state in (PeerState.REFUSED, PeerState.FAILED, PeerState.CLOSED)

    # ------------------------------------------------------------------------ events

    def start(self, now: float) -> None:
        """Begin joining: the first ``due()`` asks for a hello."""
        self.state = PeerState.JOINING
        self._next_hello_at = now

    def received(self, now: float) -> None:
        """Any frame arrived from the router (even one that fails to decode)."""
        self.liveness.received(now)

    def sent(self, now: float) -> None:
        """Something was sent to the router (it counts as our beat)."""
        self.liveness.sent(now)

    def welcomed(self, incarnation: str, heartbeat_interval_s: float, now: float) -> str | None:
        """A welcome arrived.

        Returns:
            The previous router incarnation if this welcome names another one (the router
            restarted; what the old one held must be recovered), else ``None``.
        """
        if self.final:
            return None
        previous = self.router_incarnation
        # Clamp what the router says: a zero or negative interval must not spin the loop.
        self.liveness.restart(max(0.01, heartbeat_interval_s), now)
        self.router_incarnation = incarnation
        self.state = PeerState.READY
        self.backoff.reset()
        self._end_streak()
        self._next_hello_at = None
        if previous is not None and previous != incarnation:
            self.restarts += 1
            return previous
        return None

    def error_report(self, code: str, now: float) -> bool:
        """An ``ErrorReport`` arrived. Returns whether it made us say hello again."""
        if code in REJOIN_CODES and not self.final:
            return self._rejoin(f"the router does not know us ({code})", now)
        return False

    def connected(self, now: float, *, reconnected: bool = True) -> bool:
        """The transport (re-)established its connection: the router may be a new process.

        Args:
            now: the caller's monotonic clock.
            reconnected: a connection closed since the previous one was made. ``False`` means
                this is the first connection, whose report may come after the welcome that
                came over it: no reason to say hello again.

        Returns whether a hello is now due: when welcomed and ``reconnected`` (say hello again,
        at once), or when the last hello could not be handed to the transport
        (``hello_unsent``).
        """
        if self.final:
            return False
        self._end_streak()  # the handshake succeeded: our security settings are accepted
        if self.state is PeerState.READY:
            return reconnected and self._rejoin("connection re-established", now)
        if self._hello_unsent:
            self._next_hello_at = now
            return True
        return False

    def hello_unsent(self) -> None:
        """The hello ``due()`` asked for could not be handed to the transport (no connection
        yet): send the next one as soon as the transport connects."""
        self._hello_unsent = True

    def refused(self, code: str, reason: str) -> None:
        """A ``Refusal`` arrived: final."""
        self.state = PeerState.REFUSED
        self.refusal_code = code
        self.why = reason

    def auth_failed(self, why: str, now: float, *, hangup: bool = False) -> bool:
        """A handshake failed: a CURVE key not accepted or a mechanism mismatch (definite), or
        the far end hung up mid-handshake without a reason (``hangup``: see rule 5).

        Returns whether this was one too many: the session is then ``FAILED``.
        """
        if self.final:
            return False
        self.auth_failures += 1
        if self._streak_since is None:
            self._streak_since = now
        if not hangup:
            self._streak_definite = True
        if why not in self._auth_reasons:
            # The same failure is reported in several words: a router that refuses plaintext
            # may close the connection before saying why ("Broken pipe"). Keep each.
            self._auth_reasons.append(why)
        if self.auth_failures < self.max_auth_failures:
            return False
        lasted = now - self._streak_since
        if not self._streak_definite and lasted < self.hangup_give_up_s:
            return False
        self.state = PeerState.FAILED
        self.why = f"{'; '.join(self._auth_reasons)} ({self.auth_failures} handshakes in a row"
        self.why += f" over {lasted:.0f} s)" if not self._streak_definite else ")"
        return True

    def close(self) -> None:
        """The caller is done; ``due()`` asks for nothing any more."""
        self.state = PeerState.CLOSED

    # ------------------------------------------------------------------------- polls

    def due(self, now: float, *, stalled: bool = False) -> str | None:
        """What to send now: ``"hello"``, ``"heartbeat"`` or ``None``.

        Args:
            now: the caller's monotonic clock.
            stalled: the caller's own loop was late (its tick came after more than a heartbeat
                interval): the router's frames may be waiting unread, so its silence is not
                judged this time.
        """
        state = self.state
        if state is PeerState.READY:
            if not stalled and self.liveness.router_gone(now):
                silent = self.liveness.silent_for(now)
                self._rejoin(f"router silent for {silent:.1f}s", now)
                return self._hello_if_due(now)
            if self.liveness.heartbeat_due(now):
                self.liveness.sent(now)
                return HEARTBEAT
            return None
        if state is PeerState.JOINING or state is PeerState.REJOINING:
            return self._hello_if_due(now)
        return None

    def next_deadline(self, now: float) -> float:
        """When ``due()`` may next have something to say (for the caller's timer)."""
        if self.state is PeerState.READY:
            live = self.liveness
            beat = live.last_tx + live.heartbeat_interval_s
            gone = live.last_rx + live.silence_beats * live.heartbeat_interval_s
            return max(now, min(beat, gone))
        if self._next_hello_at is not None and not self.final:
            return max(now, self._next_hello_at)
        return now + 1.0

    # ---------------------------------------------------------------------- helpers

    def _end_streak(self) -> None:
        self.auth_failures = 0
        self._auth_reasons.clear()
        self._streak_since = None
        self._streak_definite = False

    def _rejoin(self, why: str, now: float) -> bool:
        """Say hello at once (from ``READY``: start rejoining). Whether a hello is now due."""
        if self.state is PeerState.READY:
            self.state = PeerState.REJOINING
            self.why = why
            self.backoff.reset()
        elif self.state not in (PeerState.JOINING, PeerState.REJOINING):
            return False
        self._next_hello_at = now
        return True

    def _hello_if_due(self, now: float) -> str | None:
        at = self._next_hello_at
        if at is None or now < at:
            return None
        self._next_hello_at = now + self.backoff.next()
        self._hello_unsent = False
        if self.router_incarnation is not None:
            self.rehellos += 1
        self.liveness.sent(now)
        return HELLO
