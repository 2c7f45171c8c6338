"""Time a pairing: decode speed on one device, on several ranks, and of exports in llama.cpp."""
