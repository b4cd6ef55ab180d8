"""Benchmarks, reported as JSON lines (``credit-router bench ... --json``)."""
