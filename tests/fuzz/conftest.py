"""Fuzz tests of the decoders and of the router service (tests/fuzz).

``make test`` runs them briefly (each test's ``budget(n)``, about 20 s in all); ``make fuzz``
runs the same tests with ``HYPOTHESIS_PROFILE=fuzz-long``: ``FUZZ_EXAMPLES`` examples per test
(5000 by default). ``make fuzz-atheris`` runs the coverage-guided decoder harness
(``atheris_decoders.py``), which is never collected by pytest.
"""

from __future__ import annotations

import os

from hypothesis import settings

from tests.fuzz.profiles import PROFILE_ENV

collect_ignore = ["atheris_decoders.py"]

if os.environ.get(PROFILE_ENV):
    settings.load_profile(os.environ[PROFILE_ENV])
