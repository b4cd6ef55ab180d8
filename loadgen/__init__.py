"""The load generator: ``credit-router run`` and everything it needs above the router and the
worker agent.

``run`` (local clusters, the watchdog), ``replay`` (the producer that replays agent trees on a
``RouterClient``), ``report`` (records to the report), ``workload`` (the workload formats),
``mockserver`` (an OpenAI-compatible mock), ``simulate`` (``run --simulate``), ``bench``
(``credit-router bench``), ``commands`` (their command lines). May import ``router_service``,
``worker_agent``, ``protocol`` and ``credit_common``; nothing below imports it.
"""
