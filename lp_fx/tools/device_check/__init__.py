"""Check a device: the pass's correctness against its eager reference and its decode speed on one
device (CUDA when present, else the CPU) in one run that writes what it measured after every phase
(``lp-fx gpu-check``, docs/tools/gpu_check.md)."""
