"""Speed against quality for every budget Δ: contiguous, planned and fine-tuned pairings."""
