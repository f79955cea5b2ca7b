"""Bounded smoke runs of the benchmark scripts: they complete and measure what they claim."""
