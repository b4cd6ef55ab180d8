"""The ``credit-router`` command: one entry point over the daemon (``serve``), the worker agent
(``worker``) and the load generator (``run``, ``bench``, ``mock-server``, ``workload``)."""
