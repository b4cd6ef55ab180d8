"""The worker agent's HTTP endpoints on its own loop: ``/metrics``, ``/livez``, ``/readyz``.

Ready means joined to a router and not draining: a Kubernetes readiness probe then shows a
worker that lost its router or is on its way out.
"""

from __future__ import annotations

from credit_common.web import Endpoints
from worker_agent.agent import AgentState, WorkerAgent
from worker_agent.metrics import make_registry

__all__ = ["WorkerHttp"]


class WorkerHttp(Endpoints):
    """The agent's endpoints on ``host:port``."""

    def __init__(self, agent: WorkerAgent, host: str, port: int) -> None:
        super().__init__(make_registry(agent), host, port)
        self._agent = agent

    def not_ready(self) -> str | None:
        """Ready = joined to a router and not draining."""
        agent = self._agent
        if agent.state is AgentState.JOINED and not agent.draining:
            return None
        return "draining" if agent.draining else agent.state.value
