"""Choose pairs by measured perplexity cost: the search, and the gated graph that scores it."""
