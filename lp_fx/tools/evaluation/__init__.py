"""Measure what a pairing costs: perplexity, lm-evaluation-harness tasks, retention, sweeps over Δ."""
