"""The test suite; ``tests.helpers`` also serves the benchmarks."""
