"""Prometheus metrics of a worker agent (``credit_worker_*``), read from the agent at scrape time.

Like the router's, nothing here runs per credit: the agent keeps counters and cheap histograms
(``AgentStats``) and this collector turns them into series when Prometheus scrapes, on the
agent's own loop (``worker_agent.web``). Labels are bounded: status, error kind (at most 32
distinct, see ``agent._kind``), reason; never a session or a credit.

Token counters (``credit_worker_*_tokens_total``) come from the executor, which alone reads the
server's answers (the router carries results as opaque bytes). Their definitions are the
report's: the prefix-cache hit rate is ``cached_prompt_tokens / prompt_tokens{cache_reported=
"true"}``. The registry also holds prometheus_client's ``ProcessCollector`` (``process_*``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from credit_common.histogram import Histogram
from credit_common.metrics import histogram_family, labelled_counter
from worker_agent.executor import TokenCounts

if TYPE_CHECKING:
    from worker_agent.agent import WorkerAgent

__all__ = ["WorkerCollector", "make_registry"]

PREFIX = "credit_worker"


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    return histogram_family(f"{PREFIX}_{name}", doc, histogram)


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    return labelled_counter(f"{PREFIX}_{name}", doc, label, values)


class WorkerCollector(Collector):
    """Every worker series, computed from the live agent on each scrape."""

    def __init__(self, agent: WorkerAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families."""
        agent = self._agent
        stats = agent.stats
        yield _labelled(
            "requests", "Credits executed, by completion status.", "status", stats.completions
        )
        yield _labelled("errors", "Failed credits, by kind.", "kind", stats.errors)
        yield _histogram("ttft_seconds", "Time to first token of completed credits.", stats.ttft_s)
        yield _histogram("request_duration_seconds", "Execution time of credits.", stats.duration_s)
        yield GaugeMetricFamily(
            f"{PREFIX}_in_flight", "Credits held.", value=sum(map(len, agent.in_flight().values()))
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_capacity", "Credits it executes at once.", value=agent.capacity
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_sessions", "Conversation sessions held (history).", value=len(agent.sessions)
        )
        yield CounterMetricFamily(
            f"{PREFIX}_credits_received", "Credits dispatched to it.", value=stats.credits_received
        )
        yield CounterMetricFamily(
            f"{PREFIX}_rehellos", "Hellos sent again after losing the router.", value=stats.rehellos
        )
        yield CounterMetricFamily(
            f"{PREFIX}_router_restarts", "Router restarts seen.", value=stats.router_restarts
        )
        yield _labelled(
            "invalid_frames",
            "Frames from the router that did not decode.",
            "reason",
            stats.bad_frames,
        )
        yield from _tokens(getattr(agent.executor, "tokens", None))
        info = GaugeMetricFamily(
            f"{PREFIX}_info",
            "The agent's name, incarnation, state, executor and endpoint.",
            labels=["name", "incarnation", "state", "executor", "endpoint"],
        )
        labels = agent.labels
        info.add_metric(
            [
                agent.name,
                agent.incarnation,
                agent.state.value,
                labels.get("executor", ""),
                labels.get("endpoint", ""),
            ],
            1,
        )
        yield info


def _tokens(tokens: TokenCounts | None) -> Iterator[Metric]:
    """The executor's token counters (nothing if it keeps none)."""
    if tokens is None:
        return
    prompt = CounterMetricFamily(
        f"{PREFIX}_prompt_tokens",
        "Prompt tokens of completed credits; cache_reported=true when the server said how many "
        "were cached.",
        labels=["cache_reported"],
    )
    prompt.add_metric(["true"], tokens.prompt_cache_reported)
    prompt.add_metric(["false"], tokens.prompt - tokens.prompt_cache_reported)
    yield prompt
    yield CounterMetricFamily(
        f"{PREFIX}_cached_prompt_tokens",
        "Prompt tokens the server reported served from its prefix cache.",
        value=tokens.cached,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_completion_tokens",
        "Generated tokens of completed credits (reasoning included).",
        value=tokens.completion,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_reasoning_tokens",
        "Reasoning tokens the server reported, part of the completion tokens.",
        value=tokens.reasoning,
    )


def make_registry(agent: WorkerAgent) -> CollectorRegistry:
    """A fresh registry holding the agent's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(agent))
    ProcessCollector(registry=registry)
    return registry
