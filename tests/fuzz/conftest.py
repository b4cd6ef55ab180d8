"""Fuzz tests of the decoders and of the router service (tests/fuzz).

``make test`` runs them briefly (each test's ``budget(n)``, about 20 s in all); ``make fuzz``
runs the same tests with ``HYPOTHESIS_PROFILE=fuzz-long``: ``FUZZ_EXAMPLES`` examples per test
(5000 by default). ``make fuzz-atheris`` runs the coverage-guided decoder harness
(``atheris_decoders.py``), which is never collected by pytest.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
import zmq
from hypothesis import settings

from tests.fuzz.profiles import PROFILE_ENV

collect_ignore = ["atheris_decoders.py"]

if os.environ.get(PROFILE_ENV):
    settings.load_profile(os.environ[PROFILE_ENV])


@pytest.fixture(scope="module")
def zmq_ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """One ZeroMQ context for a module's services and sockets (a context per example is slow)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    """An event loop for synchronous Hypothesis tests to run each example's coroutine on."""
    with asyncio.Runner() as r:
        yield r
