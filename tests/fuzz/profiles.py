"""Hypothesis budgets for the fuzz tests: a short run in ``make test``, a long one in ``make fuzz``.

Each test asks ``budget(n)`` for its settings: ``n`` examples normally (on top of whatever
profile is active, so CI's derandomized ``ci`` profile still applies), or the ``fuzz-long``
profile's count when ``HYPOTHESIS_PROFILE=fuzz-long`` (``FUZZ_EXAMPLES`` examples per test,
5000 by default, no deadline, failures printed with a reproduction blob). ``fuzz-debug`` skips
shrinking, to see a failure at once.
"""

from __future__ import annotations

import os
from typing import Any, Final

from hypothesis import HealthCheck, Phase, settings

PROFILE_ENV: Final = "HYPOTHESIS_PROFILE"
LONG: Final = "fuzz-long"
SLOW_OK: Final = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)
"""Fuzz examples are big and sometimes rejected on purpose; that is not a test smell here."""

settings.register_profile(
    LONG,
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "5000")),
    deadline=None,
    print_blob=True,
    suppress_health_check=SLOW_OK,
)

settings.register_profile(
    "fuzz-debug",
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    print_blob=True,
)
"""No shrinking: the first failure as found (a router example can take minutes to shrink)."""


def long_run() -> bool:
    """Whether the long profile was asked for."""
    return os.environ.get(PROFILE_ENV) == LONG


def budget(examples: int, *, long_share: float = 1.0, **overrides: Any) -> settings:
    """Settings for one fuzz test.

    Args:
        examples: examples in the short run.
        long_share: the fraction of the long profile's count this test runs (for tests whose
            examples are exhaustive sweeps, a hundred times dearer than the others).
        overrides: any other settings.
    """
    overrides.setdefault("deadline", None)
    overrides.setdefault("suppress_health_check", SLOW_OK)
    if long_run():
        profile = settings.get_profile(LONG)
        count = max(examples, int(profile.max_examples * long_share))
        return settings(profile, max_examples=count, **overrides)
    return settings(max_examples=examples, **overrides)
