"""Benchmarks: print CSV and short tables with ratios measured in one run; never assert on time."""
