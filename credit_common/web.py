"""HTTP endpoints on the caller's event loop (aiohttp): ``/metrics``, ``/livez``, ``/readyz``.

Shared by the router (which adds ``/status``) and the worker agent. Serving on the loop rather
than prometheus_client's thread means a scrape reads state between two events, never in the
middle of one.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

__all__ = ["Endpoints", "port_problem"]

logger = logging.getLogger(__name__)


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound for listening (e.g. "Address already in use"), or
    ``None`` when it can. Binds as aiohttp does (``SO_REUSEADDR``), then lets go: the CLIs ask
    before they start anything, so a taken port is one line, not a half-started process."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


class Endpoints:
    """aiohttp on the caller's loop: ``/metrics`` from a registry, ``/livez``, ``/readyz``.

    Subclasses say what ready means (``not_ready``) and may add routes (``routes``).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        """Add routes beyond the three common ones."""

    def not_ready(self) -> str | None:
        """Why the process is not ready, or ``None`` when it is."""
        return None

    async def start(self) -> None:
        """Bind and serve (``port`` 0 picks a free port, stored back in ``port``)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        if self.port == 0:
            # aiohttp does not expose the bound port; the runner's addresses do.
            self.port = int(self._runner.addresses[0][1])
        logger.info("http endpoints on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _livez(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop runs; that is what liveness means here.
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        reason = self.not_ready()
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")
