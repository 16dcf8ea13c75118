"""Benchmarks of the alarm engine on a real stack: `make bench` (python -m bench)."""
