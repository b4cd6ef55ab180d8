"""Anchored schedules: every arrival is an absolute intended time, so no error accumulates.

A loop that sleeps the *gap* to the next arrival drifts below its rate: each iteration adds its
own overhead and the event loop's timer granularity (libuv, hence uvloop, rounds timers to whole
milliseconds) to the gap, and the sum grows with the run. Here the schedule is a sequence of
times measured from the run's start, computed from the arrival process alone; the producer waits
*until* each one (``sleep_until``) and, when it wakes late, issues at once every arrival already
due. A late wake-up then costs that arrival some lateness (which is recorded), never the
arrivals after it.

Arrival processes (``arrival_times``), at a mean of ``rate`` per second:

* ``constant`` — ``n / rate``, exactly;
* ``poisson`` — exponential gaps (a Poisson process);
* ``gamma`` — gamma-distributed gaps of shape ``burstiness`` (vLLM's ``--burstiness``): 1 is
  Poisson, below 1 burstier, above 1 more regular; the mean gap stays ``1 / rate``.

``Clock`` is ``time.monotonic``: ``loop.time()`` under uvloop is cached per loop iteration at
millisecond resolution, too coarse to measure lateness with.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from typing import Final, Literal

__all__ = ["Arrival", "Clock", "arrival_times", "monotonic", "sleep_until"]

Arrival = Literal["constant", "poisson", "gamma"]
Clock = Callable[[], float]

monotonic: Final[Clock] = time.monotonic
"""The schedule's clock (seconds, float, nanosecond resolution on Linux)."""

SPIN_S: Final = 0.000_5
"""The last stretch before a deadline is waited out by yielding to the loop (other tasks run)
instead of on a timer, whose millisecond rounding would make every wake-up late."""


def arrival_times(
    rate: float, arrival: Arrival = "poisson", *, seed: int = 0, burstiness: float = 1.0
) -> Iterator[float]:
    """Intended arrival times in seconds from the start (0 first), without end.

    Args:
        rate: mean arrivals per second (> 0).
        arrival: ``constant``, ``poisson`` or ``gamma`` (module docstring).
        seed: seeds the random gaps.
        burstiness: ``gamma``: the shape of the gap distribution (> 0).

    Raises:
        ValueError: a rate or burstiness that is not positive.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    if arrival == "constant":
        n = 0
        while True:
            yield n / rate  # a product, not a running sum: exact for any n
            n += 1
    rng = random.Random(seed)
    at = 0.0
    while True:
        yield at
        if arrival == "poisson":
            at += rng.expovariate(rate)
        else:
            at += rng.gammavariate(burstiness, 1.0 / (burstiness * rate))


async def sleep_until(deadline: float, clock: Clock = monotonic, spin_s: float = SPIN_S) -> None:
    """Return at ``deadline`` (a ``clock`` reading) or as soon after it as the loop allows.

    Sleeps on a timer until ``spin_s`` before the deadline, then yields to the loop until it
    passes. Returns at once if the deadline is already past.
    """
    remaining = deadline - clock()
    if remaining <= 0:
        return
    if remaining > spin_s:
        await asyncio.sleep(remaining - spin_s)
    while clock() < deadline:  # noqa: ASYNC110 - polling a clock, not awaiting an event
        await asyncio.sleep(0)
