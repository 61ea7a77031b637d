"""Benchmarks: cdcsync beside its peers, in one run, with ratios."""
