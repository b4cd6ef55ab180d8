"""Many idle worker agents in one process, for the scale run of ``bench e2e``.

``python -m loadgen.bench.agents --router EP --prefix p --count N`` runs N real
``WorkerAgent``s (simulator executor) on one event loop until killed: they join, beat and
report like any worker, which is the load the router's idle CPU is measured under.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

from worker_agent.agent import WorkerAgent
from worker_agent.executor import SimExecutor

__all__ = ["main"]


async def _run(router: str, prefix: str, count: int) -> None:
    agents = [
        WorkerAgent(router=router, name=f"{prefix}-{i:04d}", executor=SimExecutor(), capacity=4)
        for i in range(count)
    ]
    await asyncio.gather(*(agent.serve() for agent in agents))


def main(argv: list[str] | None = None) -> int:
    """Run the agents until the process is killed."""
    parser = argparse.ArgumentParser(prog="loadgen.bench.agents")
    parser.add_argument("--router", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_run(args.router, args.prefix, args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
