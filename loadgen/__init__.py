"""The load generator: ``credit-router run`` and everything it needs above the router and the
worker agent.

``run`` (local clusters, the watchdog, the exit status), ``replay`` (the producer that replays
agent trees on a ``RouterClient``), ``schedule`` (anchored arrival times), ``report`` (records to
the report), ``artifacts`` and ``plots`` (the run directory of ``--output``, ``credit-router
report``), ``workload`` (the workload formats),
``mockserver`` (an OpenAI-compatible mock), ``simulate`` (``run --simulate``), ``bench``
(``credit-router bench``; ``bench.pacing`` in ``make bench``), ``commands`` (their command
lines). May import ``router_service``,
``worker_agent``, ``protocol`` and ``credit_common``; nothing below imports it.
"""
