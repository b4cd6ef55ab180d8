"""credit-router's worker agent: joins a router, executes its credits, reports each exactly once.

Modules: ``transport`` (the ZeroMQ DEALER and every socket decision), ``core`` (pure state:
sessions, the completion log, back-off, liveness), ``executor`` (the ``Executor`` protocol and
the simulated GPU host), ``openai`` (``OpenAIExecutor``: generation requests over HTTP) with
``apis`` (the chat, completions and Responses API adapters), ``sse`` (the server-sent events
decoder) and ``tokenizer`` (``--tokenizer``), ``agent`` (``WorkerAgent``: the protocol's worker
conversation on one asyncio loop), ``__main__`` (the command line, signals, logging, exit
codes). The contract is ``docs/PROTOCOL.md`` §5; ``docs/WORKER.md`` describes the agent's
behaviour.
"""

from worker_agent.agent import AgentState, StopReason, WorkerAgent
from worker_agent.errors import RefusedError, TransportError, WorkerError
from worker_agent.executor import ExecResult, Executor, SimExecutor

__all__ = [
    "AgentState",
    "ExecResult",
    "Executor",
    "RefusedError",
    "SimExecutor",
    "StopReason",
    "TransportError",
    "WorkerAgent",
    "WorkerError",
]
