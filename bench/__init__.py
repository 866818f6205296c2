"""Benchmarks: `python -m bench` (CPU suite) and `python -m bench.gpu` (accelerator)."""
