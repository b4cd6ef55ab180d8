"""The base that the router daemon, the worker agent and the load generator share.

``peer`` (the peer side of the protocol's session: hello, back-off, router incarnations),
``histogram``, ``settings`` (layered settings), ``web`` (HTTP endpoints), ``metrics``
(Prometheus helpers), ``keys`` (CurveZMQ key files), ``logs`` (logging configuration).
Imports nothing of ``router_service``, ``worker_agent`` or ``loadgen``.
"""
