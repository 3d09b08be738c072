"""Benchmarks against the anchors; run with ``make bench`` (not part of the test run)."""
