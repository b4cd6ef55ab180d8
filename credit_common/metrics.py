"""Prometheus helpers shared by the router's and the worker's collectors: families built from
plain counters and from ``credit_common.histogram.Histogram``.
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from credit_common.histogram import Histogram

__all__ = ["histogram_family", "labelled_counter"]


def labelled_counter(
    name: str, doc: str, label: str, values: dict[str, int]
) -> CounterMetricFamily:
    """A counter family with one series per key of ``values`` (``name`` is the full name)."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def histogram_family(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    """A core ``Histogram`` as a Prometheus histogram family (``name`` is the full name)."""
    return HistogramMetricFamily(name, doc, buckets=histogram.cumulative(), sum_value=histogram.sum)
