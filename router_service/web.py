"""The router's HTTP endpoints, served on its own event loop: ``/metrics``, ``/livez``,
``/readyz`` and ``/status``.

Serving on the loop (aiohttp) rather than prometheus_client's thread means a scrape reads the
core between two events, never in the middle of one. A scrape costs O(workers); nothing here
walks the session table.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from router_service.metrics import make_registry

if TYPE_CHECKING:
    from router_service.service import RouterService

__all__ = ["Endpoints", "StatusServer", "status"]

logger = logging.getLogger(__name__)


def status(service: RouterService) -> dict[str, Any]:
    """The JSON status document: the router, its totals, and one row per worker."""
    core = service.core
    now = service.now()
    workers = [
        {
            "name": name,
            "state": w.state.value,
            "in_flight": len(w.tickets),
            "capacity": w.capacity,
            "sessions": len(w.sessions),
            "queued": len(w.queue),
            "sent": w.sent,
            "silent_s": round(now - w.last_seen, 3),
            "incarnation": w.incarnation,
            "labels": w.labels,
        }
        for name, w in sorted(core.workers.items())
    ]
    stats = core.stats
    return {
        "router": {
            "incarnation": core.router_incarnation,
            "version": service.version,
            "uptime_s": round(time.monotonic() - service.started_at, 3),
            "ready": service.is_ready(),
            "draining": service.draining,
            "worker_endpoint": service.worker_endpoint,
            "producer_endpoint": service.producer_endpoint,
        },
        "totals": {
            "workers": len(workers),
            "producers": len(service.producers),
            "in_flight": sum(len(w.tickets) for w in core.workers.values()),
            "queued": len(core.queue) + sum(len(w.queue) for w in core.workers.values()),
            "sessions": len(core.table.entries),
            "fork_aliases": len(core.table.aliases),
            "submitted": stats.submitted,
            "outcomes": dict(stats.outcomes),
        },
        "workers": workers,
    }


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


class StatusServer(Endpoints):
    """The router's endpoints, plus ``/status``."""

    def __init__(self, service: RouterService, host: str, port: int) -> None:
        super().__init__(make_registry(service), host, port)
        self._service = service

    def routes(self, app: web.Application) -> None:
        """``/status``: the JSON status document."""
        app.router.add_get("/status", self._status)

    def not_ready(self) -> str | None:
        """Ready = bound and accepting credits (not draining)."""
        if self._service.is_ready():
            return None
        return "draining" if self._service.draining else "starting"

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(status(self._service))
