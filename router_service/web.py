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

from credit_common.web import Endpoints
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
            # The least-loaded tie-break's count (a late joiner starts at the fleet mean);
            # ``dispatched`` is the true count since it joined.
            "sent": w.sent,
            "silent_s": round(now - w.last_seen, 3),
            "incarnation": w.incarnation,
            # What answers its credits (the worker's hello labels): sim or a real server.
            "executor": w.labels.get("executor", ""),
            "endpoint": w.labels.get("endpoint", ""),
            "dispatched": w.dispatched,
            "outcomes": dict(w.outcomes),
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
            "sessions": len(core.sessions),
            "fork_aliases": core.sessions.aliases,
            "submitted": stats.submitted,
            "outcomes": dict(stats.outcomes),
        },
        "workers": workers,
    }


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
