"""Leave the package: a pairing as a plain checkpoint (GGUF, Hugging Face folder)."""
