"""Helpers of the test suite (and the benchmarks): synthetic stores and tiny synthetic videos."""
