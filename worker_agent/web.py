"""The worker agent's HTTP endpoints on its own loop: ``/metrics``, ``/livez``, ``/readyz``.

Ready means joined to a router and not draining: a Kubernetes readiness probe then shows a
worker that lost its router or is on its way out.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker_agent.agent import AgentState, WorkerAgent
from worker_agent.metrics import make_registry

__all__ = ["WorkerHttp"]

logger = logging.getLogger(__name__)


class WorkerHttp:
    """aiohttp application serving the agent's endpoints on ``host:port``."""

    def __init__(self, agent: WorkerAgent, host: str, port: int) -> None:
        self._agent = agent
        self._registry = make_registry(agent)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve (``port`` 0 picks a free port, stored back in ``port``)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        logger.info("http endpoints on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        agent = self._agent
        if agent.state is AgentState.JOINED and not agent.draining:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {agent.state.value}\n")
