"""The worker's token counters use the report's definitions (issue 13: the dashboard's
prefix-cache hit rate must read what ``credit-router run`` reports)."""

from __future__ import annotations

import pytest

from loadgen.replay import CreditRecord
from loadgen.report import Collector, Report
from worker_agent.executor import TokenCounts

# (prompt, cached or None when the server did not say, completion, reasoning)
RESULTS = [(1000, 0, 50, 0), (1200, 1000, 60, 10), (800, None, 40, 0), (1500, 1200, 70, 30)]


def test_prefix_cache_hit_rate_matches_the_report() -> None:
    tokens = TokenCounts()
    collector = Collector()
    for i, (prompt, cached, completion, reasoning) in enumerate(RESULTS):
        tokens.add(prompt, cached, completion, reasoning)
        collector.add(
            CreditRecord(
                credit_id=i,
                session="s",
                conversation="c",
                root="s",
                submitted_at_s=0.0,
                status="completed",
                input_tokens=prompt,
                cached_tokens=cached,
                output_tokens=completion,
            )
        )
    report = Report(
        policy="sticky", topology="t", workload="w", duration_s=1.0, collector=collector
    ).as_dict()
    # The dashboard's panel: cached / prompt{cache_reported="true"}.
    assert tokens.cached / tokens.prompt_cache_reported == pytest.approx(
        report["prefix_cache_hit_rate"]
    )
    assert tokens.prompt == report["prompt_tokens"]
    assert tokens.cached == report["cached_tokens"]
    assert tokens.reasoning == 40
    assert tokens.completion == 220
