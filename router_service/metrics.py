"""Prometheus metrics of the router, read from the core and the service at scrape time.

Nothing here runs on the hot path: the core keeps plain counters and cheap histograms
(``CoreStats``), and this collector turns them into series when Prometheus scrapes, on the
event-loop thread (the HTTP server runs on the same loop), so it always sees a consistent state.
Names follow the Prometheus guide: prefix ``credit_router_``, base units, ``_total`` counters; the
only label with many values is ``worker`` (bounded by the fleet: a worker's series go when it
leaves), never a session or a credit. Outcome reasons are a bounded label
(``router_service.core.router.reason_label``). The registry also holds prometheus_client's
``ProcessCollector`` (``process_*``: CPU, memory, open files, start time).
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
from router_service.core.workers import WorkerState

if TYPE_CHECKING:
    from router_service.service import RouterService

__all__ = ["RouterCollector", "histogram_family", "labelled_counter", "make_registry"]

PREFIX = "credit_router"


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _labelled_counter(
    name: str, doc: str, label: str, values: dict[str, int]
) -> CounterMetricFamily:
    return labelled_counter(f"{PREFIX}_{name}", doc, label, values)


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    return histogram_family(f"{PREFIX}_{name}", doc, histogram)


class RouterCollector(Collector):
    """Every router series, computed from the live service on each scrape."""

    def __init__(self, service: RouterService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (prometheus_client calls this on scrape)."""
        yield from self._credits()
        yield from self._sessions()
        yield from self._workers()
        yield from self._hygiene()

    def _credits(self) -> Iterator[Metric]:
        core = self._service.core
        stats = core.stats
        yield _counter("credits_submitted", "Credits submitted by producers.", stats.submitted)
        yield _counter("credits_dispatched", "Credits sent to a worker.", stats.dispatched)
        outcomes = CounterMetricFamily(
            f"{PREFIX}_credit_outcomes",
            "Credits submitted here that ended, by status and bounded reason (none for "
            "completed); an earlier router incarnation's credits completed here are "
            "recovered_completions.",
            labels=["status", "reason"],
        )
        for status, count in sorted(stats.outcomes.items()):
            if status == "completed":
                outcomes.add_metric([status, "none"], count)
            elif count == 0:
                outcomes.add_metric([status, "none"], 0)  # the series exists from the start
        for (status, reason), count in sorted(stats.outcome_reasons.items()):
            outcomes.add_metric([status, reason], count)
        yield outcomes
        in_flight = sum(len(w.tickets) for w in core.workers.values())
        queued = len(core.queue) + sum(len(w.queue) for w in core.workers.values())
        yield _gauge("credits_in_flight", "Credits dispatched without an outcome.", in_flight)
        yield _gauge("credits_queued", "Credits waiting in the router for a worker.", queued)
        yield _histogram(
            "submit_to_dispatch_seconds",
            "Time completed credits waited in the router before dispatch.",
            stats.submit_to_dispatch_s,
        )
        yield _histogram(
            "dispatch_to_completion_seconds",
            "Time from dispatch to the worker's completion.",
            stats.dispatch_to_outcome_s,
        )
        yield _counter(
            "undelivered_dispatches",
            "Dispatch frames the transport could not hand to a worker (credits held back).",
            stats.undelivered,
        )
        yield _counter(
            "recovered_completions",
            "Completions of credits dispatched by an earlier router incarnation.",
            stats.recovered,
        )
        yield _counter(
            "adopted_credits",
            "Credits of an earlier router incarnation taken over from a worker's hello.",
            stats.adopted,
        )
        yield _counter(
            "adoptions_refused",
            "Credits a worker's first hello listed that were not adopted (beyond its capacity, "
            "or already known here).",
            stats.adoptions_refused,
        )
        yield _counter(
            "adoptions_displaced",
            "Adopted credits ended without an outcome because their producer submitted a "
            "credit with the same id.",
            stats.adoptions_displaced,
        )

    def _sessions(self) -> Iterator[Metric]:
        core = self._service.core
        stats = core.stats
        table = core.sessions
        yield _gauge("sticky_entries", "Live sticky-session entries.", len(table))
        yield _gauge("fork_aliases", "FORK descendants routed through an entry.", table.aliases)
        yield _gauge(
            "fork_refcounts_held",
            "Counts held by FORK trees (declared reservations + live children).",
            table.fork_holds,
        )
        yield _counter(
            "sticky_hits", "Credits routed to their session's worker.", stats.sticky_hits
        )
        yield _counter(
            "sticky_misses",
            "Credits that started a session on a least-loaded worker.",
            stats.sticky_misses,
        )
        yield _counter(
            "session_migrations", "Sessions re-pinned after losing their worker.", stats.migrations
        )
        yield _counter("session_rehomes", "Soft-affinity moves (cache-cold turns).", stats.rehomes)
        yield _labelled_counter(
            "session_evictions", "Sticky entries evicted, by reason.", "reason", stats.evictions
        )

    def _workers(self) -> Iterator[Metric]:
        core = self._service.core
        stats = core.stats
        by_state = {s.value: 0 for s in WorkerState if s is not WorkerState.GONE}
        load = GaugeMetricFamily(
            f"{PREFIX}_worker_in_flight", "Credits in flight per worker.", labels=["worker"]
        )
        capacity = GaugeMetricFamily(
            f"{PREFIX}_worker_capacity", "Declared capacity per worker.", labels=["worker"]
        )
        dispatched = CounterMetricFamily(
            f"{PREFIX}_worker_dispatched",
            "Credits dispatched to each worker since it joined.",
            labels=["worker"],
        )
        ended = CounterMetricFamily(
            f"{PREFIX}_worker_outcomes",
            "Outcomes of credits dispatched to each worker, by status.",
            labels=["worker", "status"],
        )
        info = GaugeMetricFamily(
            f"{PREFIX}_worker_info",
            "One series per worker: its state and what answers its credits (1).",
            labels=["worker", "state", "executor", "endpoint"],
        )
        for name, worker in core.workers.items():
            by_state[worker.state.value] += 1
            load.add_metric([name], len(worker.tickets))
            capacity.add_metric([name], worker.capacity)
            dispatched.add_metric([name], worker.dispatched)
            for status, count in sorted(worker.outcomes.items()):
                ended.add_metric([name, status], count)
            labels = worker.labels
            info.add_metric(
                [
                    name,
                    worker.state.value,
                    labels.get("executor", ""),
                    labels.get("endpoint", ""),
                ],
                1,
            )
        states = GaugeMetricFamily(f"{PREFIX}_workers", "Workers by state.", labels=["state"])
        for state, count in by_state.items():
            states.add_metric([state], count)
        yield states
        yield load
        yield capacity
        yield dispatched
        yield ended
        yield info
        yield _counter("workers_lost", "Workers lost or gone.", stats.workers_lost)
        yield _labelled_counter(
            "worker_departures",
            "Workers that left the table: worker_lost (silent, replaced) or worker_left "
            "(drained, said goodbye).",
            "reason",
            stats.departures,
        )
        yield _counter(
            "worker_suspicions", "Times a worker missed its heartbeats.", stats.suspicions
        )
        yield _counter("worker_refusals", "Hellos refused.", stats.refusals)

    def _hygiene(self) -> Iterator[Metric]:
        service = self._service
        stats = service.core.stats
        yield _counter(
            "duplicate_completions",
            "Completions for credits that already had their outcome (dropped).",
            stats.duplicate_completions,
        )
        yield _counter(
            "misdirected_completions",
            "Completions from a worker that did not hold the credit (dropped).",
            stats.misdirected_completions,
        )
        yield _counter(
            "duplicate_credits",
            "Resubmissions of credits still in progress.",
            stats.duplicate_credits,
        )
        yield _counter(
            "undeclared_forks",
            "FORK children started without a reservation.",
            stats.undeclared_forks,
        )
        yield _counter(
            "unknown_child_releases",
            "Child releases for unknown or ended children.",
            stats.unknown_child_releases,
        )
        yield _labelled_counter(
            "invalid_messages",
            "Messages dropped as invalid, by reason.",
            "reason",
            service.invalid_messages,
        )
        yield _counter("auth_failures", "Failed CURVE handshakes.", service.auth_failures)
        yield _labelled_counter(
            "peer_events",
            "Events of the peer links, by kind: refusals by code (refused_name_in_use, "
            "refused_superseded, ...), fenced incarnations, closed worker connections, "
            "duplicate completions, router-owned statuses, stale-incarnation submits, frames "
            "held for an unreachable peer.",
            "event",
            service.peer_events,
        )
        yield _counter(
            "loop_stalls", "Liveness checks skipped because the loop was late.", stats.loop_stalls
        )
        yield _gauge(
            "event_loop_lag_seconds", "How late the last periodic tick ran.", service.loop_lag_s
        )
        received = CounterMetricFamily(
            f"{PREFIX}_received_bytes", "Payload bytes received.", labels=["endpoint"]
        )
        sent = CounterMetricFamily(
            f"{PREFIX}_sent_bytes", "Payload bytes sent.", labels=["endpoint"]
        )
        for endpoint, (bytes_in, bytes_out) in service.traffic().items():
            received.add_metric([endpoint], bytes_in)
            sent.add_metric([endpoint], bytes_out)
        yield received
        yield sent
        info = GaugeMetricFamily(
            f"{PREFIX}_info", "Router build and incarnation.", labels=["version", "incarnation"]
        )
        info.add_metric([service.version, service.core.router_incarnation], 1)
        yield info


def make_registry(service: RouterService) -> CollectorRegistry:
    """A fresh registry holding the router's collector (one per service; tests get their own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(service))
    ProcessCollector(registry=registry)
    return registry
