"""Win back what a pairing costs: fine-tuning through the compiled pairing, its training text, ranks."""
