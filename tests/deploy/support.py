"""Helpers for the deploy/ checks: paths, required tools, and the router's real metric names."""

from __future__ import annotations

import os
import re
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest
import zmq
from prometheus_client.registry import CollectorRegistry

from protocol import PROTOCOL_VERSION
from router_service.core.router import RouterCore
from router_service.metrics import make_registry
from router_service.service import RouterService

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

_METRIC = re.compile(r"\b((?:credit_router|credit_worker|process)_[a-z0-9_]+)\b")


def debian_tool(name: str) -> str:
    """A tool ``make deploy-tools`` installs; skip without it, but fail under CI (``CI`` set)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: run `make deploy-tools`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def venv_tool(name: str) -> str:
    """A console script of a dev dependency, next to this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"{name} missing: the dev extras are not installed (make install)")
        return found
    return str(path)


def _sample_names(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


@cache
def exposed_metric_names() -> frozenset[str]:
    """Every sample name the router's and a worker agent's registries can expose (counters
    with ``_total``, etc., and the process collector's ``process_*``)."""
    from worker_agent.agent import WorkerAgent
    from worker_agent.executor import SimExecutor
    from worker_agent.metrics import make_registry as make_worker_registry

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        core = RouterCore(protocol_version=PROTOCOL_VERSION, router_incarnation="names")
        service = RouterService(
            core,
            worker_endpoint="tcp://127.0.0.1:0",
            producer_endpoint="tcp://127.0.0.1:0",
            context=ctx,
        )
        names = _sample_names(make_registry(service))
        agent = WorkerAgent(router="tcp://127.0.0.1:1", name="names", executor=SimExecutor())
        names |= _sample_names(make_worker_registry(agent))
        return frozenset(names)
    finally:
        ctx.term()


def metrics_in(expr: str) -> set[str]:
    """The ``credit_router_*``, ``credit_worker_*`` and ``process_*`` names a PromQL expression
    reads."""
    return set(_METRIC.findall(expr))
