"""Side-by-side benchmarks (see docs/PERFORMANCE.md). Run one at a time: ``python -m bench.decode``."""
